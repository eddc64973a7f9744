"""``fastpe train`` and ``fastpe study``: options generated from :class:`TrainConfig`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from fastpe.nn.factory import ENCODINGS
from fastpe.train import validation
from fastpe.train.config import TrainConfig
from fastpe.train.presets import DEFAULT_PRESET, PRESETS, deviations_text, get_preset, preset_help

# Without --data and --preset the commands run on the built-in synthetic set with the small "demo"
# settings, so that the whole study (every encoding, 2 seeds) finishes in about 3 minutes on a
# 2-core CPU. One thread: at this size a second thread gains nothing and suffers most when the CPU
# is shared.
SYNTHETIC_PRESET = PRESETS[DEFAULT_PRESET].config

PRESET_NOTE = (f"On the synthetic data (no --data) without --preset, options not given take the values of the "
               f"'{DEFAULT_PRESET}' preset instead of the defaults shown below: "
               + ", ".join(f"{k}={v}" for k, v in SYNTHETIC_PRESET.items()) + ".")

HELP = {
    "data": "'synthetic' (default), ml-100k, beauty, sports, beauty-pairs, wikipedia, or a path",
    "data_root": "folder holding the named data sets (default $FASTPE_DATA_ROOT, else ../shared/data)",
    "data_format": "how to read a --data path (auto: from the suffix and the lines)",
    "columns": "pairs files: the role of each column, from user, item, timestamp, rating, skip (rating and skip are "
               "ignored), e.g. user,item,rating,timestamp for MovieLens u.data (default: 'user item', or a header line "
               "naming the columns)",
    "synthetic": "options of the synthetic generator, e.g. n_users=400,n_items=300,lag=2",
    "use_attributes": "feed item attributes to CARCA", "use_context": "feed time features to CARCA",
    "model": "the recommender",
    "encoding": "positional encoding: " + ", ".join(ENCODINGS) + " (or rmha-<k> for any clipping distance k)",
    "rope_base": "RoPE frequency base: 1000, the study's value for histories of tens of items (the "
                 "RotaryMultiheadAttention module alone defaults to 10000, the RoPE paper's value for long texts)",
    "causal": "causal self-attention (default: CARCA bidirectional, SASRec causal)",
    "device": "auto (CUDA when available), cpu, cuda or cuda:<index>",
    "residual": "self-attention residual: mul or add (default: CARCA mul, SASRec add)",
    "cross_residual": "CARCA cross-attention residual: mul, add or none",
    "next_slot": "CARCA: append a learned slot for the item to predict after the most recent item, so that "
                 "encodings acting only inside self-attention (rope, rmha-k) reach the readout",
    "backend": "fastpe backend: auto (fused kernels on GPU), torch, triton, cuda, reference",
    "target": "training targets: all (every position; causal only), prefix (one held-out next item), auto",
    "samples_per_user": "training examples per user and epoch",
    "warmup_steps": "linear learning-rate warm-up steps", "schedule": "after warm-up: constant or cosine",
    "negatives": "sampled negatives per training target", "eval_negatives": "negatives per user in sampled evaluation",
    "eval_seed": "seed of the evaluation candidates (shared by every run)", "cutoffs": "comma-separated k of Hit/NDCG@k",
    "full_ranking": "also rank against all items at the end",
    "full_ranking_users": "rank against all items for at most this many users, a fixed random subset (0: all)", "exclude_history": "full ranking leaves out history items",
    "select_metric": "validation metric for early stopping and checkpoint selection",
    "patience": "epochs without improvement before stopping (0: never)",
    "valid_users": "evaluate validation on at most this many users per epoch (0: all)",
    "amp": "auto (bf16 on CUDA), bf16 or off", "compile": "torch.compile the training step",
    "compile_backend": "torch.compile backend: inductor (generates kernels) or aot_eager (traces only)",
    "cuda_graphs": "capture the whole training step in a CUDA graph (CUDA only)",
    "threads": "torch CPU threads (0: torch's default)",
    "benchmark_steps": "after training, time this many steps in each step mode (eager, compiled, graphed)",
    "progress": "progress bars (default: on when stderr is a terminal)",
    "out_dir": "output folder (default runs/<command>-<timestamp>)",
    "resume": "continue the run in --out-dir (needs --out-dir)",
    "restart": "discard the run in --out-dir (checkpoints, metrics, summary) and start it again",
    "stop_after_epochs": "stop after this many epochs (testing resumption)",
}
OPTIONAL_TYPES = {"causal": bool, "residual": str, "data_root": str, "out_dir": str, "columns": str}
# Options whose default is not a plain value: the help text says it.
DEFAULT_IN_HELP = {"data", "data_root", "out_dir", "causal", "residual", "cutoffs", "progress", "columns"}


def add_config_options(parser: argparse.ArgumentParser, skip=()) -> None:
    """One option per :class:`TrainConfig` field; every value is checked as it is parsed
    (:mod:`fastpe.train.validation`), so a bad one stops the command before anything is read."""
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = OPTIONAL_TYPES.get(f.name, type(default))
        help_text = HELP.get(f.name, "")
        shown = "" if f.name in DEFAULT_IN_HELP else f" (default {default})"
        if f.name == "synthetic":
            parser.add_argument(flag, type=validation.synthetic_options, default=None, help=help_text)
        elif f.name == "cutoffs":
            parser.add_argument(flag, type=validation.cutoff_list, default=None, help=help_text + " (default 10)")
        elif f.name == "encoding":
            parser.add_argument(flag, type=validation.encoding_name, default=None, help=help_text + shown)
        elif f.name == "columns":
            parser.add_argument(flag, type=validation.column_list, default=None, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text + shown)
        elif f.name in validation.CHOICES:
            parser.add_argument(flag, choices=validation.CHOICES[f.name], default=None, help=help_text + shown)
        else:
            parser.add_argument(flag, type=validation.option_type(f.name, kind), default=None, help=help_text + shown)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also FASTPE_DEBUG=1)")


def preset_name(args: argparse.Namespace) -> str | None:
    """The preset in force: ``--preset``, else the demo on the synthetic data, else none."""
    name = getattr(args, "preset", None)
    if name is None and (getattr(args, "data", None) or "synthetic") == "synthetic":
        name = DEFAULT_PRESET
    return name


def given_options(args: argparse.Namespace, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace, skip=()) -> TrainConfig:
    given = given_options(args, skip)
    name = preset_name(args)
    values = dict(get_preset(name).config) if name else {}
    if "synthetic" in given:
        given["synthetic"] = {**values.get("synthetic", {}), **given["synthetic"]}
    values.update(given)
    values.setdefault("progress", sys.stderr.isatty())  # bars on a terminal, not in CI logs
    return TrainConfig(**values)


def add_preset_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), default=None, metavar="NAME",
                        help="start from a named configuration; options given override it. " + preset_help())


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate one configuration", description=PRESET_NOTE)
    add_preset_option(p)
    add_config_options(p)
    p.set_defaults(run=run_train)


def add_study(sub) -> None:
    p = sub.add_parser("study", help="every encoding over several seeds: results table, CSV, JSON and plot",
                       description=PRESET_NOTE)
    p.add_argument("--encodings", type=validation.encoding_list, default=None,
                   help="'all' or a comma-separated list, each name once (default all)")
    p.add_argument("--seeds", type=validation.positive_int("the number of seeds"), default=None,
                   help="number of seeds, 0..N-1 (default 2 on synthetic data, 3 otherwise)")
    p.add_argument("--jobs", type=validation.positive_int("0: fill the machine", minimum=0), default=0,
                   help="runs trained at once, one process each: threads split among them on a CPU (each run gets "
                        "--threads, default cores / jobs), one GPU each on a multi-GPU machine. Default 0: fill the "
                        "machine (one run per GPU; on a CPU cores / --threads, or 1 without --threads). With "
                        "--executor ray and no --address: the CPUs of the local Ray instance (0: all)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this machine (default); ray: each run a Ray task (pip install 'fastpe[ray]')")
    p.add_argument("--address", default=None,
                   help="with --executor ray: the Ray cluster to join (e.g. head:6379 or auto; default a local instance)")
    add_preset_option(p)
    add_config_options(p, skip=STUDY_SKIPS)
    p.set_defaults(run=run_study_command)


STUDY_SKIPS = ("encoding", "seed", "stop_after_epochs")


def run_train(args) -> int:
    from fastpe.train import distributed
    from fastpe.train.trainer import train

    cfg = config_from_args(args)
    validation.check_config(cfg)
    if cfg.resume and not (Path(cfg.out_dir) / "last.pt").exists():
        raise FileNotFoundError(f"--resume: {Path(cfg.out_dir) / 'last.pt'} does not exist, there is no run to "
                                "continue (without --resume a new run starts there)")
    summary = train(cfg)
    if args.preset and distributed.is_main() and not summary.get("interrupted"):  # a paper's configuration
        (Path(summary["out_dir"]) / "preset.md").write_text(deviations_text(args.preset, given_options(args)) + "\n")
    if not distributed.is_main():  # several processes (torchrun): the first one reports
        return 0
    if summary.get("interrupted"):
        print(f"stopped after epoch {summary['epoch']} (--stop-after-epochs); --resume continues it: "
              f"{Path(summary['out_dir'])}")
        return 0
    keys = [k for k in summary["test"]]
    rope = f" (base {summary['rope_base']:g})" if summary.get("rope_base") else ""
    print(f"{summary['dataset']}; {cfg.model} + {cfg.encoding}{rope}, best epoch {summary['best_epoch']} of "
          f"{summary['epochs_run']}, {summary['train_seq_per_s']:.0f} train seq/s ({summary['step']}, "
          f"backend {summary['backend']}, {summary['device']})")
    from fastpe.demo import format_table

    rows = [{"": name, **{k: source.get(k, float("nan")) for k in keys}}
            for name, source in (("valid", summary["valid"]), ("test", summary["test"]),
                                 ("popularity (test)", summary["popularity_test"]))]
    print(format_table(rows))
    users = summary["users"]
    print(f"users: {users['evaluated']} evaluated, {users['not_evaluated']} not evaluated (fewer than 3 interactions)")
    print("throughput (seq/s): " + json.dumps(summary["throughput_seq_per_s"]))
    print(f"outputs: {Path(summary['out_dir'])}")
    return 0


def run_study_command(args) -> int:
    from fastpe.nn.factory import ENCODINGS
    from fastpe.train import distributed
    from fastpe.train.study import run_study

    cfg = config_from_args(args, skip=STUDY_SKIPS)
    encodings = args.encodings or list(ENCODINGS)
    if args.address and args.executor != "ray":
        raise ValueError("--address is for --executor ray")
    validation.check_study(cfg, encodings)  # every encoding before the first run
    seeds = args.seeds if args.seeds is not None else (2 if cfg.data == "synthetic" else 3)
    jobs = args.jobs
    if jobs == 0 and args.executor == "local":
        from fastpe.train.executors import auto_jobs

        jobs = 1 if distributed.launched() else auto_jobs(cfg, len(encodings) * seeds)
    name = preset_name(args)
    notes = deviations_text(name, given_options(args, STUDY_SKIPS)) if name else ""
    result = run_study(cfg, encodings, list(range(seeds)), cfg.out_dir, resume=cfg.resume,
                       jobs=jobs, executor=args.executor, address=args.address, notes=notes)
    if not distributed.is_main():
        return 0
    print(f"\n{result['dataset']}; {cfg.model}; test metrics, mean ± std over {seeds} seeds; wall time "
          f"{result['wall_seconds']:.0f} s")
    print(result["text"])
    print(result["reading"])
    print(f"outputs: {result['out_dir']}/ (results.md, runs.csv, runs.json, plot.png, curves.png)")
    return 0
