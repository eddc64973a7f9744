"""The study protocol: every encoding over several seeds, one table.

Each run trains one (encoding, seed) with the same data, split, evaluation candidates
(``eval_seed``) and hyper-parameters, selects its checkpoint on validation and reports the test
metrics once. The study writes, under its output folder:

* ``results.md``: mean +- std per encoding and metric (test), throughput, the popularity baseline;
* ``runs.csv`` and ``runs.json``: every run's metrics and timings;
* ``plot.png``: mean and spread per encoding;
* ``curves.png``: training loss and the validation metric per epoch, every run (stability at a glance);
* ``runs/<encoding>/seed<k>/``: each run's checkpoints, history and summary.

``resume=True`` keeps finished runs (their ``summary.json``) and resumes interrupted ones.

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
from fastpe.train import distributed
from fastpe.train import validation
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
        "eval_seconds": summary["eval_seconds"], "step": summary["step"], "backend": summary["backend"],
        "device": summary["device"], "world_size": summary.get("world_size", 1),  # absent before data parallelism
        "parameters": summary["parameters"],
    })
    return row


def aggregate(rows: list[dict], encodings: list[str], cutoffs, popularity: dict | None) -> list[dict]:
    """One row per encoding: ``mean ± std`` over seeds of the test metrics and the throughput."""
    table = []
    for name in encodings:
        mine = [r for r in rows if r["encoding"] == name]
        if not mine:
            continue
        line = {"encoding": name, "runs": str(len(mine))}
        for key in metric_keys(cutoffs):
            mean, std = _mean_std([r[f"test_{key}"] for r in mine])
            # One run has no spread: print its value alone rather than a misleading "± 0".
            cell = f"{mean:.4f} ± {std:.4f}" if len(mine) > 1 else f"{mean:.4f}"
            line[key.replace("sampled_", "sampled ").replace("full_", "full ")] = cell
        mean, _ = _mean_std([r["train_seq_per_s"] for r in mine])
        line["train seq/s"] = f"{mean:.0f}"
        line["step, backend"] = f"{mine[0]['step']}, {mine[0]['backend']}"
        table.append(line)
    if popularity:
        line = {"encoding": "popularity", "runs": "-"}
        for key in metric_keys(cutoffs):
            line[key.replace("sampled_", "sampled ").replace("full_", "full ")] = f"{popularity.get(key, math.nan):.4f}"
        line["train seq/s"] = "-"
        line["step, backend"] = "-"
        table.append(line)
    return table


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
              resume: bool = False, log=print, data=None) -> dict:
    """Train every (encoding, seed); write and return the results (see the module docstring)."""
    distributed.setup(resolve_device(base.device))  # several processes: join the group the runs share
    main = distributed.is_main()
    if not main:
        log = lambda *args: None  # noqa: E731
    # The default name holds the start time: the first process's, so that all use one folder.
    out = Path(out_dir) if out_dir else distributed.from_main(
        Path("runs") / f"study-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "fastpe study") if main else None
    if lock is not None:
        lock.acquire()
    try:
        return _run_study(base, encodings, seeds, out, resume, log, data, main, lock)
    except KeyboardInterrupt as exc:
        # The interrupted run keeps its last complete epoch; --resume on the study continues it.
        raise validation.RunInterrupted(out, f"finished runs are kept in {out}; the run in progress: "
                                              f"{getattr(exc, 'detail', 'not started')}") from None
    finally:
        if lock is not None:
            lock.release()


def _run_study(base, encodings, seeds, out, resume, log, data, main, lock) -> dict:
    if lock is not None and lock.note:
        log(f"note: {lock.note}")
    started = time.perf_counter()
    data = data if data is not None else load_dataset(base.data, base.data_root, base.data_format, base.synthetic,
                                                      base.columns)
    timed = [e for e in encodings if needs_timestamps(e)]
    if timed and data.timestamps is None:  # say so before any run trains
        raise ValueError(f"encodings {', '.join(timed)} need timestamps, and the data set {data.name!r} has none")
    log(f"study: {data.describe()}; model {base.model}; {len(encodings)} encodings x {len(seeds)} seeds -> {out}")
    for note in data.notes:
        log(f"data: {note}")
    for warning in validation.check_data(leave_one_out(data), base):  # before the first run
        log(warning)
    rows, histories, popularity, reused = [], [], None, 0
    jobs = [(e, s) for e in encodings for s in seeds]
    bar = tqdm(jobs, desc="study", disable=not (base.progress and main), dynamic_ncols=True)
    for encoding, seed in bar:
        run_dir = out / "runs" / encoding / f"seed{seed}"
        summary_path = run_dir / "summary.json"
        if resume and summary_path.exists():
            summary = json.loads(summary_path.read_text())
            reused += 1
        else:
            cfg = replace(base, encoding=encoding, seed=seed, out_dir=str(run_dir), resume=resume, progress=False)
            summary = train(cfg, data, log=lambda *a: None)
        popularity = popularity or summary["popularity_test"]
        row = run_row(summary, base.cutoffs)
        rows.append(row)
        histories.append((encoding, summary["history"]))
        k = base.cutoffs[0]
        line = (f"{encoding:>12} seed {seed}: test sampled NDCG@{k} {row[f'test_sampled_ndcg@{k}']:.4f}, "
                f"full NDCG@{k} {row[f'test_full_ndcg@{k}']:.4f} (best epoch {row['best_epoch']}, "
                f"{row['train_seq_per_s']:.0f} seq/s)")
        if base.progress:
            bar.write(line)
        else:
            log(line)
    bar.close()
    wall = time.perf_counter() - started
    table = aggregate(rows, encodings, base.cutoffs, popularity)
    text = format_table(table)
    header = (f"# fastpe study: {data.name}, {base.model}\n\n"
              f"{data.describe()}. {len(encodings)} encodings x {len(seeds)} seeds (seeds {', '.join(map(str, seeds))}); "
              f"test metrics of the checkpoint selected on validation ({base.select_metric}), mean ± std over seeds. "
              f"Sampled: the positive among {base.eval_negatives} negatives, ties counted against it; full: all items"
              f"{', history excluded' if base.exclude_history else ''}.\n\n"
              f"Machine: {platform.node() or 'unknown'}, {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {base.threads or torch.get_num_threads()} threads; device {rows[0]['device'] if rows else '-'}; "
              f"wall time {wall:.0f} s{_reuse_note(reused, len(jobs), rows)}.\n\n")
    config = {k: v for k, v in base.to_dict().items() if k not in ("encoding", "seed", "out_dir", "resume", "progress")}
    result = {"data": data.name, "dataset": data.describe(), "model": base.model, "encodings": encodings, "seeds": seeds,
              "config": config, "wall_seconds": wall, "popularity_test": popularity, "runs": rows, "table": table}
    if main:
        atomic_write_text(header + text + "\n\nConfiguration: `" + json.dumps(config) + "`\n", out / "results.md")
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
