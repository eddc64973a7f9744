"""``fastpe train`` and ``fastpe study``: options generated from :class:`TrainConfig`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from fastpe.train.config import TrainConfig

# Without --data the commands run on the built-in synthetic set with these small settings, so that
# the whole study (every encoding, 2 seeds) finishes in a few minutes on a 2-core CPU.
# One thread: at this size a second thread gains nothing and suffers most when the CPU is shared.
SYNTHETIC_PRESET = {
    "d_model": 32, "n_blocks": 1, "max_len": 16, "epochs": 12, "lr": 5e-3, "dropout": 0.1,
    "samples_per_user": 10, "warmup_steps": 20, "threads": 1,
}

PRESET_NOTE = ("On the synthetic data (no --data) options not given take these values instead of the defaults "
               "shown below: " + ", ".join(f"{k}={v}" for k, v in SYNTHETIC_PRESET.items()) + ".")

HELP = {
    "data": "'synthetic' (default), ml-100k, beauty, sports, beauty-pairs, wikipedia, or a path",
    "data_root": "folder holding the shared data sets (default $FASTPE_DATA_ROOT or ../shared/data)",
    "data_format": "auto, pairs, sequences or recbole",
    "synthetic": "options of the synthetic generator, e.g. n_users=400,n_items=300,lag=2",
    "use_attributes": "feed item attributes to CARCA", "use_context": "feed time features to CARCA",
    "model": "carca or sasrec", "encoding": "positional encoding (fastpe.ENCODINGS)",
    "causal": "causal self-attention (default: CARCA bidirectional, SASRec causal)",
    "residual": "self-attention residual: mul (CARCA's default) or add (SASRec's default)",
    "cross_residual": "CARCA cross-attention residual: mul, add or none",
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
    "progress": "progress bars", "out_dir": "output folder (default runs/<timestamp>)",
    "resume": "continue the run in --out-dir", "stop_after_epochs": "stop after this many epochs (testing resumption)",
}
OPTIONAL_TYPES = {"causal": bool, "residual": str, "data_root": str, "out_dir": str}


def _parse_synthetic(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--synthetic: expected key=value, got {part!r}")
        out[key.strip()] = float(value) if "." in value else int(value)
    return out


def add_config_options(parser: argparse.ArgumentParser, skip=()) -> None:
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = OPTIONAL_TYPES.get(f.name, type(default))
        help_text = HELP.get(f.name, "")
        if f.name == "synthetic":
            parser.add_argument(flag, type=_parse_synthetic, default=None, help=help_text)
        elif f.name == "cutoffs":
            parser.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",") if x.strip()), default=None,
                                help=help_text + " (default 10)")
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default {default})")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (default {default})")


def config_from_args(args: argparse.Namespace, skip=()) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name not in skip and getattr(args, f.name, None) is not None}
    values = dict(SYNTHETIC_PRESET) if given.get("data", "synthetic") == "synthetic" else {}
    if "synthetic" in given:
        given["synthetic"] = {**values.get("synthetic", {}), **given["synthetic"]}
    values.update(given)
    values.setdefault("progress", sys.stderr.isatty())  # bars on a terminal, not in CI logs
    return TrainConfig(**values)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate one configuration", description=PRESET_NOTE)
    add_config_options(p)
    p.set_defaults(run=run_train)


def add_study(sub) -> None:
    p = sub.add_parser("study", help="every encoding over several seeds: results table, CSV, JSON and plot",
                       description=PRESET_NOTE)
    p.add_argument("--encodings", default="all", help="'all' or a comma-separated list (default all)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1 (default 2 on synthetic data, 3 otherwise)")
    add_config_options(p, skip=("encoding", "seed", "stop_after_epochs"))
    p.set_defaults(run=run_study_command)


def run_train(args) -> int:
    from fastpe.train import distributed
    from fastpe.train.trainer import train

    cfg = config_from_args(args)
    summary = train(cfg)
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
    print("throughput (seq/s): " + json.dumps(summary["throughput_seq_per_s"]))
    print(f"outputs: {Path(summary['out_dir'])}")
    return 0


def run_study_command(args) -> int:
    from fastpe.train import distributed
    from fastpe.train.study import parse_encodings, run_study

    cfg = config_from_args(args, skip=("encoding", "seed", "stop_after_epochs"))
    seeds = args.seeds if args.seeds is not None else (2 if cfg.data == "synthetic" else 3)
    result = run_study(cfg, parse_encodings(args.encodings), list(range(seeds)), cfg.out_dir, resume=cfg.resume)
    if not distributed.is_main():
        return 0
    print(f"\n{result['dataset']}; {cfg.model}; test metrics, mean ± std over {seeds} seeds; wall time "
          f"{result['wall_seconds']:.0f} s")
    print(result["text"])
    print(f"outputs: {result['out_dir']}/ (results.md, runs.csv, runs.json, plot.png, curves.png)")
    return 0
