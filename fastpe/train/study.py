"""The study protocol: every encoding over several seeds, one table.

Each run trains one (encoding, seed) with the same data, split, evaluation candidates
(``eval_seed``) and hyper-parameters, selects its checkpoint on validation and reports the test
metrics once. The study writes, under its output folder:

* ``results.md``: mean +- std per encoding and metric (test), throughput, the popularity baseline;
* ``runs.csv`` and ``runs.json``: every run's metrics and timings;
* ``plot.png``: mean and spread per encoding;
* ``curves.png``: training loss and the validation metric per epoch, every run (stability at a glance);
* ``runs/<encoding>/seed<k>/``: each run's checkpoints, history and summary.

``resume=True`` keeps finished runs (their ``summary.json``), resumes interrupted ones, and trains on the
runs that stopped at a smaller epoch limit without converging (a study extended with more ``--epochs``).

Runs train one after another, in a local pool of ``jobs`` processes, or as Ray tasks
(:mod:`fastpe.train.executors`); the table is the same whichever finishes first. Under the table
the study prints a reading: which encodings beat ``none`` by more than two standard errors of the
difference of the means, and how many runs converged (best validation epoch before the last, or
early stopping). On the synthetic walk task it adds the best values a model that sees order and one
that does not can reach (:func:`fastpe.data.synthetic.walk_ceilings`).

Under ``torchrun`` with several processes every run trains data parallel in the one process
group; only the first process logs and writes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastpe.data import leave_one_out, load_dataset
from fastpe.demo import format_table
from fastpe.nn.factory import needs_timestamps
from fastpe.train import distributed, executors, validation
from fastpe.train.checkpoint import atomic_write_text, json_text
from fastpe.train.config import TrainConfig
from fastpe.train.lock import FolderLock
from fastpe.train.trainer import resolve_device, train


def parse_encodings(spec: str) -> list[str]:
    """``all`` or a comma-separated list; an unknown or repeated name raises ``ValueError``."""
    try:
        return validation.encoding_list(spec)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--encodings: {exc}") from None


def metric_keys(cutoffs) -> list[str]:
    return [f"{kind}_{m}@{k}" for kind in ("sampled", "full") for k in cutoffs for m in ("hit", "ndcg")]


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _number(value) -> float:
    return math.nan if value is None else value


def run_row(summary: dict, cutoffs) -> dict:
    row = {"encoding": summary["encoding"], "seed": summary["seed"]}
    for key in metric_keys(cutoffs):  # null in a summary.json (no user to average over) reads as NaN
        row[f"test_{key}"] = _number(summary["test"].get(key))
    for key in metric_keys(cutoffs):
        row[f"valid_{key}"] = _number(summary["valid"].get(key))
    row.update({
        "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
        "train_seq_per_s": summary["train_seq_per_s"], "train_seconds": summary["train_seconds"],
        "eval_seconds": summary["eval_seconds"], "cpu_seconds": summary.get("cpu_seconds", math.nan),
        "step": summary["step"], "backend": summary["backend"],
        "device": summary["device"], "world_size": summary.get("world_size", 1),  # absent before data parallelism
        "parameters": summary["parameters"],
    })
    return row


def aggregate(rows: list[dict], encodings: list[str], cutoffs, popularity: dict | None,
              references: dict[str, dict] | None = None) -> list[dict]:
    """One row per encoding: ``mean ± std`` over seeds of the test metrics and the throughput;
    then the popularity baseline and any ``references`` (name -> metrics, e.g. ceilings)."""
    table = []
    # Metrics no run computed (full ranking switched off) get no column.
    keys = [key for key in metric_keys(cutoffs) if not rows or any(not math.isnan(r[f"test_{key}"]) for r in rows)]
    for name in encodings:
        mine = [r for r in rows if r["encoding"] == name]
        if not mine:
            continue
        line = {"encoding": name, "runs": str(len(mine))}
        for key in keys:
            mean, std = _mean_std([r[f"test_{key}"] for r in mine])
            # One run has no spread: print its value alone rather than a misleading "± 0".
            cell = f"{mean:.4f} ± {std:.4f}" if len(mine) > 1 else f"{mean:.4f}"
            line[key.replace("sampled_", "sampled ").replace("full_", "full ")] = cell
        mean, _ = _mean_std([r["train_seq_per_s"] for r in mine])
        line["train seq/s"] = f"{mean:.0f}"
        line["step, backend"] = f"{mine[0]['step']}, {mine[0]['backend']}"
        table.append(line)
    for name, metrics in {**({"popularity": popularity} if popularity else {}), **(references or {})}.items():
        line = {"encoding": name, "runs": "-"}
        for key in keys:
            line[key.replace("sampled_", "sampled ").replace("full_", "full ")] = f"{metrics.get(key, math.nan):.4f}"
        line["train seq/s"] = "-"
        line["step, backend"] = "-"
        table.append(line)
    return table


def converged(row: dict) -> bool:
    """Best validation epoch before the last one run (early stopping included): the run had stopped
    improving. A best epoch at the last epoch means it might still improve with more epochs."""
    return 0 < row["best_epoch"] < row["epochs_run"]


def reading(rows: list[dict], encodings: list[str], metric: str, baseline: str = "none") -> str:
    """One line: which encodings beat ``baseline`` on test ``metric`` by more than two standard
    errors of the difference of the means (each mean's error: std / sqrt(seeds)), and how many
    runs converged."""
    done = sum(converged(r) for r in rows)
    tail = f"{done} of {len(rows)} runs converged (best validation epoch before the last, or early stopping)."

    def values(name):
        return [r[f"test_{metric}"] for r in rows if r["encoding"] == name and not math.isnan(r[f"test_{metric}"])]
    base = values(baseline)
    others = [e for e in encodings if e != baseline and values(e)]
    if not base or not others:
        return f"Reading: no `{baseline}` runs to compare with; {tail}"
    if len(base) < 2 or any(len(values(e)) < 2 for e in others):
        return f"Reading: one seed per encoding gives no standard error (use --seeds 2 or more); {tail}"
    base_mean, base_std = _mean_std(base)
    above, not_above = [], []
    for name in others:
        mean, std = _mean_std(values(name))
        error = math.sqrt(std ** 2 / len(values(name)) + base_std ** 2 / len(base))
        gap = mean - base_mean
        (above if gap > 2 * error else not_above).append(f"{name} ({gap:+.3f} ± {error:.3f})")
    return (f"Reading (test {metric}, difference to `{baseline}` ± its standard error over the seeds): "
            f"beyond 2 standard errors: {', '.join(above) or 'none'}; not: {', '.join(not_above) or 'none'}. {tail}")


def ceilings(base: TrainConfig, data, cutoffs) -> dict[str, dict]:
    """On the synthetic walk task, the best test metrics with and without order (else nothing)."""
    if base.data != "synthetic" or base.synthetic.get("task") != "walk":
        return {}
    from fastpe.data import leave_one_out
    from fastpe.data.synthetic import walk_ceilings
    from fastpe.train.evaluate import prepare_stage

    split = leave_one_out(data)
    stage = prepare_stage(split, "test", base.max_len, base.eval_negatives, base.eval_seed)
    best = walk_ceilings(base.synthetic, split, stage, cutoffs, base.full_ranking, base.exclude_history)
    return {f"ceiling, {name}": metrics for name, metrics in best.items()}


def plot(rows: list[dict], encodings: list[str], cutoffs, popularity: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cutoffs[0] if 10 not in cutoffs else 10
    metrics = [f"sampled_ndcg@{k}", f"full_ndcg@{k}", f"sampled_hit@{k}", f"full_hit@{k}"]
    metrics = [m for m in metrics if any(not math.isnan(r[f"test_{m}"]) for r in rows)]
    names = [e for e in encodings if any(r["encoding"] == e for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for x, name in enumerate(names):
            values = [r[f"test_{metric}"] for r in rows if r["encoding"] == name]
            mean, std = _mean_std(values)
            ax.bar(x, mean, color="tab:blue", alpha=0.6)
            ax.errorbar(x, mean, yerr=std, color="black", capsize=3)
            ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
        if popularity and metric in popularity:
            ax.axhline(popularity[metric], color="tab:red", linestyle="--", label="popularity")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"test {metric}", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(histories: list[tuple[str, list[dict]]], encodings: list[str], select_metric: str, path: Path,
                title: str) -> None:
    """Training loss and validation ``select_metric`` per epoch: one line per run, one colour per
    encoding, one line style per seed (the k-th run of an encoding in ``histories``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(encodings)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for encoding, history in histories:
        epochs = [h["epoch"] for h in history]
        k = seen[encoding] = seen.get(encoding, -1) + 1
        line = {"color": colours[encoding], "linestyle": styles[k % len(styles)], "linewidth": 1,
                "marker": None if k < len(styles) else "o", "markersize": 2}
        axes[0].plot(epochs, [h["loss"] for h in history], label=f"{encoding} #{k + 1}", **line)
        axes[1].plot(epochs, [_number(h.get(f"valid_{select_metric}")) for h in history], **line)
    axes[0].set_title("training loss", fontsize=10)
    axes[1].set_title(f"validation {select_metric}", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=6, ncol=2, title="encoding #seed", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reuse_note(reused: int, total: int, rows: list[dict]) -> str:
    # A resumed study's wall time covers only the runs it trained: say how the rest were obtained.
    if not reused:
        return ""
    run_seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in rows)
    return (f" ({reused} of {total} runs reused from an earlier invocation; training and evaluation of all runs "
            f"took {run_seconds:.0f} s)")


def run_study(base: TrainConfig, encodings: list[str], seeds: list[int], out_dir: str | Path | None = None,
              resume: bool = False, log=print, data=None, jobs: int = 1, executor: str = "local",
              address: str | None = None, notes: str = "") -> dict:
    """Train every (encoding, seed); write and return the results (see the module docstring).

    ``jobs`` > 1 trains that many runs at once in local processes; ``executor="ray"`` runs them as
    Ray tasks (``address``: an existing cluster, default a local instance). ``notes`` (markdown, e.g.
    a preset's deviations from its paper) go into ``results.md`` under the table."""
    if executor not in executors.EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(executors.EXECUTORS)}, got {executor!r}")
    if jobs < (1 if executor == "local" else 0):
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    distributed.setup(resolve_device(base.device))  # several processes: join the group the runs share
    main = distributed.is_main()
    if (jobs > 1 or executor == "ray") and distributed.world_size() > 1:
        raise ValueError("--jobs and --executor ray run whole runs in parallel; under torchrun every run already "
                         "trains data parallel: use one or the other")
    if not main:
        log = lambda *args: None  # noqa: E731
    # The data before the folder: a data error leaves no empty study folder behind.
    started = time.perf_counter()
    data = data if data is not None else load_dataset(base.data, base.data_root, base.data_format, base.synthetic,
                                                      base.columns)
    timed = [e for e in encodings if needs_timestamps(e)]
    if timed and data.timestamps is None:  # say so before any run trains
        raise ValueError(f"encodings {', '.join(timed)} need timestamps, and the data set {data.name!r} has none")
    # The default name holds the start time: the first process's, so that all use one folder.
    out = Path(out_dir) if out_dir else distributed.from_main(
        Path("runs") / f"study-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "fastpe study") if main else None
    if lock is not None:
        lock.acquire()
    try:
        return _run_study(base, encodings, seeds, out, resume, log, data, main, lock, jobs, executor, address,
                          notes, started)
    except KeyboardInterrupt as exc:
        # The interrupted run keeps its last complete epoch; --resume on the study continues it.
        raise validation.RunInterrupted(out, f"finished runs are kept in {out}; the run in progress: "
                                              f"{getattr(exc, 'detail', 'not started')}") from None
    finally:
        if lock is not None:
            lock.release()


def _finished_summary(run_dir: Path, epochs: int) -> dict | None:
    """The summary of a run that needs no more training, else None. A run that stopped at its epoch
    limit without converging trains on when the study is resumed with more ``--epochs`` (from its
    ``last.pt``), so a long study can be extended as often as the machine allows."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if summary.get("stopped_early") or summary.get("epochs_run", 0) >= epochs:
        return summary
    return None


def _run_study(base, encodings, seeds, out, resume, log, data, main, lock, jobs, executor, address, notes,
               started) -> dict:
    if lock is not None and lock.note:
        log(f"note: {lock.note}")
    where = (f"Ray ({address or 'local instance'})" if executor == "ray" else
             f"{jobs} processes" if jobs > 1 else "one process")
    log(f"study: {data.describe()}; model {base.model}; {len(encodings)} encodings x {len(seeds)} seeds -> {out} "
        f"({where})")
    for note in data.notes:
        log(f"data: {note}")
    for warning in validation.check_data(leave_one_out(data), base):  # before the first run
        log(warning)
    pairs = [(e, s) for e in encodings for s in seeds]
    summaries: dict[int, dict] = {}
    todo, configs = [], []
    for index, (encoding, seed) in enumerate(pairs):
        run_dir = out / "runs" / encoding / f"seed{seed}"
        summary = _finished_summary(run_dir, base.epochs) if resume else None
        if summary is not None:
            summaries[index] = summary
        else:
            todo.append(index)
            configs.append(replace(base, encoding=encoding, seed=seed, out_dir=str(run_dir), resume=resume,
                                   progress=False))
    reused = len(summaries)
    if executor == "ray":
        finished = executors.run_ray(configs, data, address, jobs)
    elif jobs > 1:
        finished = executors.run_local(configs, data, jobs)
    else:
        finished = executors.run_sequential(configs, data, train)
    bar = tqdm(total=len(pairs), initial=reused, desc="study", disable=not (base.progress and main),
               dynamic_ncols=True)
    k = 10 if 10 in base.cutoffs else base.cutoffs[0]
    for position, summary in finished:
        index = todo[position]
        summaries[index] = summary
        summary_path = Path(configs[position].out_dir) / "summary.json"
        if main and not summary_path.exists():  # a run on another machine: keep its summary here
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(summary, indent=2), summary_path)
        row = run_row(summary, base.cutoffs)
        full = row[f"test_full_ndcg@{k}"]
        line = (f"{row['encoding']:>12} seed {row['seed']}: test sampled NDCG@{k} {row[f'test_sampled_ndcg@{k}']:.4f}"
                + ("" if math.isnan(full) else f", full NDCG@{k} {full:.4f}")
                + f" (best epoch {row['best_epoch']} of {row['epochs_run']}, {row['train_seq_per_s']:.0f} seq/s)")
        bar.update(1)
        if base.progress:
            bar.write(line)
        else:
            log(line)
    bar.close()
    ordered = [summaries[i] for i in sorted(summaries)]
    rows = [run_row(summary, base.cutoffs) for summary in ordered]
    histories = [(summary["encoding"], summary["history"]) for summary in ordered]
    popularity = ordered[0]["popularity_test"] if ordered else None
    references = ceilings(base, data, base.cutoffs) if main else {}
    wall = time.perf_counter() - started
    table = aggregate(rows, encodings, base.cutoffs, popularity, references)
    text = format_table(table)
    select = base.select_metric if f"test_{base.select_metric}" in (rows[0] if rows else {}) else f"sampled_ndcg@{k}"
    read = reading(rows, encodings, select)
    header = (f"# fastpe study: {data.name}, {base.model}\n\n"
              f"{data.describe()}. {len(encodings)} encodings x {len(seeds)} seeds (seeds {', '.join(map(str, seeds))}); "
              f"test metrics of the checkpoint selected on validation ({base.select_metric}), mean ± std over seeds. "
              f"Sampled: the positive among {base.eval_negatives} negatives, ties counted against it"
              + (f"; full: all items{', history excluded' if base.exclude_history else ''}" if base.full_ranking
                 else "") + ".\n\n"
              f"Machine: {platform.node() or 'unknown'}, {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {base.threads or torch.get_num_threads()} threads; device {rows[0]['device'] if rows else '-'}; "
              f"wall time {wall:.0f} s ({where}){_reuse_note(reused, len(pairs), rows)}; CPU time of the runs "
              f"{sum(r['cpu_seconds'] for r in rows):.0f} s (all threads: with one thread per run, their time on idle cores).\n\n")
    config = {k: v for k, v in base.to_dict().items() if k not in ("encoding", "seed", "out_dir", "resume", "progress")}
    result = {"data": data.name, "dataset": data.describe(), "model": base.model, "encodings": encodings, "seeds": seeds,
              "config": config, "wall_seconds": wall, "popularity_test": popularity, "references": references,
              "runs": rows, "table": table, "reading": read, "notes": notes}
    if main:
        atomic_write_text(header + text + "\n\n" + read + "\n\n" + (notes + "\n\n" if notes else "")
                          + "Configuration: `" + json.dumps(config) + "`\n",
                          out / "results.md")
        if rows:
            with open(out / "runs.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        atomic_write_text(json_text(result), out / "runs.json")
        if rows:
            plot(rows, encodings, base.cutoffs, popularity, out / "plot.png",
                 f"{data.name}, {base.model}: test metrics over {len(seeds)} seeds")
            plot_curves(histories, encodings, base.select_metric, out / "curves.png",
                        f"{data.name}, {base.model}: every run, per epoch")
    distributed.barrier()
    result["text"] = text
    result["out_dir"] = str(out)
    return result
