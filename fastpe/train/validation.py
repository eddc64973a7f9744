"""Checks of the command-line options and of a training configuration, in one place.

Every numeric option has a rule (``NUMBER_RULES``); the command line parses each value with
:func:`option_type`, so ``--epochs 0`` is refused by argparse before anything is read, and
:func:`check_config` applies the same rules (and the rules that tie options together) to a
:class:`TrainConfig` built in code. Every message names the option and the value.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace

from fastpe.backends import BackendUnavailableError

# Errors the command line reports in one or two lines with exit status 2 (no traceback): bad
# options, bad or missing data files, a locked or corrupt output folder, a backend that cannot run
# here. Everything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, BackendUnavailableError)


class TrainingDiverged(RuntimeError):
    """The loss or the scores became NaN or infinite; the message names the epoch, step and lr."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run or study: its folder and what is kept there."""

    def __init__(self, out_dir, detail: str):
        super().__init__(f"{out_dir}: {detail}")
        self.out_dir, self.detail = out_dir, detail


# option -> (what it must be, test). Integers are parsed with int(), the rest with float().
NUMBER_RULES = {
    "d_model": ("a positive integer", lambda v: v > 0),
    "n_blocks": ("a positive integer", lambda v: v > 0),
    "n_heads": ("a positive integer", lambda v: v > 0),
    "max_len": ("a positive integer", lambda v: v > 0),
    "ffn_mult": ("a positive integer", lambda v: v > 0),
    "samples_per_user": ("a positive integer", lambda v: v > 0),
    "epochs": ("a positive integer", lambda v: v > 0),
    "batch_size": ("a positive integer", lambda v: v > 0),
    "negatives": ("a positive integer", lambda v: v > 0),
    "eval_negatives": ("a positive integer", lambda v: v > 0),
    "eval_batch_size": ("a positive integer", lambda v: v > 0),
    "warmup_steps": ("an integer >= 0", lambda v: v >= 0),
    "seed": ("an integer >= 0", lambda v: v >= 0),
    "eval_seed": ("an integer >= 0", lambda v: v >= 0),
    "full_ranking_users": ("an integer >= 0 (0: every user)", lambda v: v >= 0),
    "patience": ("an integer >= 0 (0: never stop early)", lambda v: v >= 0),
    "valid_users": ("an integer >= 0 (0: every user)", lambda v: v >= 0),
    "threads": ("an integer >= 0 (0: torch's default)", lambda v: v >= 0),
    "benchmark_steps": ("an integer >= 0", lambda v: v >= 0),
    "stop_after_epochs": ("an integer >= 0", lambda v: v >= 0),
    "lr": ("a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    "dropout": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    "clip_grad": ("a finite number >= 0 (0: no clipping)", lambda v: math.isfinite(v) and v >= 0),
    "rope_base": ("a finite number > 1", lambda v: math.isfinite(v) and v > 1),
}

# option -> the values it accepts
CHOICES = {
    "data_format": ("auto", "pairs", "sequences", "recbole"),
    "model": ("carca", "sasrec"),
    "residual": ("mul", "add"),
    "cross_residual": ("mul", "add", "none"),
    "activation": ("gelu", "relu", "leakyrelu"),
    "backend": ("auto", "torch", "triton", "cuda", "reference"),
    "target": ("auto", "all", "prefix"),
    "optimizer": ("adam", "adamw"),
    "schedule": ("constant", "cosine"),
    "amp": ("auto", "bf16", "off"),
    "compile_backend": ("inductor", "aot_eager"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(name: str, kind: type):
    what, ok = NUMBER_RULES[name]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


def option_type(name: str, kind: type):
    """The argparse ``type=`` of a configuration option: parses and applies its rule, if any."""
    return _number(name, kind) if name in NUMBER_RULES else kind


def positive_int(what: str, minimum: int = 1):
    """An argparse type for an integer option that is not a config field (e.g. --seeds, --jobs):
    at least ``minimum`` (1: a positive integer)."""
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or str(value) != text.strip().lstrip("+"):
            raise argparse.ArgumentTypeError(f"expected {kind} ({what}), got {text!r}")
        return value

    return parse


def cutoff_list(text: str) -> tuple[int, ...]:
    """``--cutoffs 5,10,20``: positive integers, each once."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct positive integers such as 5,10,20, got {text!r}")
    return values


def encoding_name(text: str) -> str:
    """A known encoding name (canonical spelling), else an argparse error listing the names."""
    from fastpe.nn.factory import ENCODINGS, _canonical

    try:
        return _canonical(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r}; expected one of {', '.join(ENCODINGS)} "
                                         "(or rmha-<k> for any clipping distance k)") from None


def encoding_list(text: str) -> list[str]:
    """``--encodings all`` or ``abs,rope,...``: every name known and listed once."""
    from fastpe.nn.factory import ENCODINGS

    if text.strip().lower() == "all":
        return list(ENCODINGS)
    names = [encoding_name(s) for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give 'all' or a comma-separated list of encodings")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} listed more than once in {text!r}")
    return names


def column_list(text: str) -> str:
    """``--columns user,item,rating,timestamp``: the role of each column of a pairs file."""
    from fastpe.data.readers import parse_columns

    try:
        return ",".join(parse_columns(text))
    except ValueError as exc:
        message = str(exc).removeprefix("columns: ")
        raise argparse.ArgumentTypeError(f"{message} (e.g. user,item,rating,timestamp)") from None


def synthetic_options(text: str) -> dict:
    """``--synthetic n_users=400,lag=2,task=walk``: known generator options; numbers, or text where
    the generator's default is text (``task``)."""
    import inspect

    from fastpe.data.synthetic import synthetic_dataset

    parameters = inspect.signature(synthetic_dataset).parameters
    known = list(parameters)
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        if key not in known:
            raise argparse.ArgumentTypeError(f"unknown option {key!r}; expected some of {', '.join(known)}")
        if isinstance(parameters[key].default, str):
            out[key] = value.strip()
            continue
        try:
            out[key] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}: expected a number, got {value!r}") from None
    return out


def check_config(cfg, encodings: list[str] | None = None, study: bool = False) -> None:
    """Raise ``ValueError`` naming the option for anything wrong with ``cfg`` that can be told
    without reading the data: the rules above, the options that depend on each other, and a
    model build for each encoding (``encodings``, default ``[cfg.encoding]``) on a toy catalogue."""
    import torch

    for name, (what, ok) in NUMBER_RULES.items():
        value = getattr(cfg, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not ok(value):
            raise ValueError(f"{flag(name)}: expected {what}, got {value!r}")
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value is None and name == "residual":
            continue
        if value not in allowed:
            raise ValueError(f"{flag(name)}: expected one of {', '.join(allowed)}, got {value!r}")
    if not cfg.cutoffs or any(not isinstance(k, int) or k <= 0 for k in cfg.cutoffs):
        raise ValueError(f"--cutoffs: expected positive integers, got {list(cfg.cutoffs)}")
    if cfg.columns is not None:
        try:
            column_list(cfg.columns)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--columns: {exc}") from None
    allowed = [f"{kind}_{m}" for kind in ("sampled", "full")
               for m in [f"{name}@{k}" for k in cfg.cutoffs for name in ("hit", "ndcg")] + ["mrr"]]
    if cfg.select_metric not in allowed:
        raise ValueError(f"--select-metric: expected one of {', '.join(allowed)} (from --cutoffs "
                         f"{','.join(map(str, cfg.cutoffs))}), got {cfg.select_metric!r}")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"--d-model {cfg.d_model} is not divisible by --n-heads {cfg.n_heads}")
    causal = cfg.causal if cfg.causal is not None else cfg.model == "sasrec"
    if cfg.target == "all" and not causal:
        raise ValueError("--target all (every position is a training target) needs a causal encoder: a bidirectional "
                         "profile sees the item it should predict; use --target prefix or --causal")
    if cfg.resume and cfg.restart:
        raise ValueError("--resume and --restart exclude each other: continue the run in --out-dir, or start it again")
    if cfg.resume and not cfg.out_dir:
        raise ValueError(f"--resume needs --out-dir, the folder of the {'study' if study else 'run'} to continue"
                         + _latest_run_hint(study))
    try:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:<index>, got {cfg.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available here (use --device cpu)")
    if cfg.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device (got {device}); on the CPU use the eager or --compile "
                         "step")
    _check_attention_memory(cfg, device)
    _check_out_dir(cfg.out_dir)
    if cfg.backend != "auto":
        from fastpe.backends import BackendUnavailableError, unavailable_reason

        reason = unavailable_reason(cfg.backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"--backend {cfg.backend}: cannot run here: {reason}")
    _check_models_build(cfg, causal, encodings or [cfg.encoding])


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (no sysconf: Windows)
        return None


def _gib(n: float) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB"


def _check_attention_memory(cfg, device) -> None:
    """On the CPU an attention step holds its scores, batch x heads x L x L float32 (PyTorch's
    attention and the torch backends materialise them, and training keeps more than one): refuse
    sizes past half the machine's memory here, not with an allocator's traceback mid-run."""
    total = _physical_memory_bytes() if device.type == "cpu" else None
    if total is None:
        return
    batch = max(cfg.batch_size, cfg.eval_batch_size)
    scores = 4 * batch * cfg.n_heads * cfg.max_len ** 2
    if 2 * scores > total:
        raise ValueError(f"--max-len {cfg.max_len} with batches of {batch} sequences and {cfg.n_heads} head(s): one "
                         f"attention step's scores take {_gib(scores)} on the CPU, more than half of this machine's "
                         f"{_gib(total)}; lower --max-len, --batch-size or --eval-batch-size")


def _check_out_dir(out_dir: str | None) -> None:
    """``--out-dir`` must be a folder this process can create, or write in: told before the data is
    read, by creating and removing a temporary folder in it or in its nearest existing parent."""
    import tempfile
    from pathlib import Path

    if not out_dir:
        return
    path = Path(out_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out-dir {out_dir}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fastpe-probe-", dir=existing))
    except OSError as exc:
        raise ValueError(f"--out-dir {out_dir}: cannot create a folder in {existing} ({exc.strerror})") from None


def _check_models_build(cfg, causal: bool, encodings: list[str]) -> None:
    # A model on a 3-item catalogue builds in milliseconds and runs every constructor check
    # (an odd head size for rope, an unknown encoding, ...) before hours of other runs.
    from fastpe.models import build_model

    for encoding in encodings:
        try:
            build_model(cfg.model, 3, d_model=cfg.d_model, n_blocks=1, n_heads=cfg.n_heads, dropout=cfg.dropout,
                        max_len=cfg.max_len, encoding=encoding, causal=causal, residual=cfg.residual or
                        ("add" if cfg.model == "sasrec" else "mul"), cross_residual=cfg.cross_residual,
                        ffn_mult=cfg.ffn_mult, activation=cfg.activation, rope_base=cfg.rope_base,
                        backend=cfg.backend)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--encoding {encoding} with --model {cfg.model} --d-model {cfg.d_model} --n-heads "
                             f"{cfg.n_heads}: {exc}") from None


def _latest_run_hint(study: bool) -> str:
    """The newest folder under ./runs that the command could continue: a run's (its last.pt) or a
    study's (its runs/ folder)."""
    from pathlib import Path

    mark = "runs" if study else "last.pt"
    runs = sorted((p for p in Path("runs").glob("*") if (p / mark).exists()), key=lambda p: p.stat().st_mtime)
    what = "study" if study else "run"
    return f" (the latest {what} here is {runs[-1]}: --resume --out-dir {runs[-1]})" if runs else ""


def check_study(cfg, encodings: list[str]) -> None:
    """:func:`check_config` for every encoding of a study."""
    check_config(replace(cfg, encoding=encodings[0]), encodings, study=True)


def check_data(split, cfg) -> list[str]:
    """Refuse data that cannot give a meaningful run, saying what is wrong with it; return the
    warnings about data that gives a run of limited meaning."""
    data = split.data
    if len(split.train_users()) == 0:
        raise ValueError(f"{data.name}: no user has 2 training interactions; nothing to train on")
    if len(split.eval_users) == 0:
        longest = max((len(s) for s in data.sequences), default=0)
        raise ValueError(f"{data.name}: every user has fewer than 3 interactions (the longest has {longest}), so no "
                         "user can be evaluated: leave-one-out needs a training, a validation and a test item per user")
    if data.n_items <= max(cfg.cutoffs):
        raise ValueError(f"{data.name}: {data.n_items} items, no more than the largest cutoff "
                         f"{max(cfg.cutoffs)}: every item would rank in the top {max(cfg.cutoffs)} and every metric "
                         "would be 1; pass smaller --cutoffs")
    warnings = []
    if data.n_items <= cfg.eval_negatives and cfg.data == "synthetic":
        # A generated catalogue is sized on purpose (the demo's 100 items): say what the columns mean.
        warnings.append(f"note: the synthetic catalogue has {data.n_items} items, no more than the "
                        f"{cfg.eval_negatives} evaluation negatives: the sampled metrics rank every item a user "
                        "has not seen, so they equal the full ranking's")
    elif data.n_items <= cfg.eval_negatives:
        warnings.append(f"warning: {data.name} has {data.n_items} items, not more than --eval-negatives "
                        f"{cfg.eval_negatives}: the 'sampled' candidates are every item a user has not seen, so the "
                        f"sampled metrics are full-ranking metrics; pass --eval-negatives {max(1, data.n_items // 2)} "
                        "or less for a sampled evaluation")
    return warnings
