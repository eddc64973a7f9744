"""Atomic checkpoints and the RNG states a resumed run needs to continue exactly."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash leaves
    either the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, empty, not a checkpoint)."""


def load(path: str | Path, device="cpu", keys=()):
    """The checkpoint at ``path``; a file that cannot be read, or lacks one of ``keys``, raises
    :class:`CorruptCheckpointError` naming it."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        missing = [k for k in keys if not isinstance(saved, dict) or k not in saved]
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch.load fails with whatever the damaged bytes trigger
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"[:200]
        raise CorruptCheckpointError(f"{path} is corrupt or incomplete ({reason})") from exc
    if missing:
        raise CorruptCheckpointError(f"{path} is not a fastpe checkpoint (it has no {', '.join(missing)})")
    return saved


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON: NaN and infinities (a metric with no user to average over) become null."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def rng_state(numpy_rng: np.random.Generator, sampler: torch.Generator | None) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": numpy_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "sampler": None if sampler is None else sampler.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, numpy_rng: np.random.Generator, sampler: torch.Generator | None) -> None:
    random.setstate(_tuples(state["python"]))
    numpy_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if sampler is not None and state.get("sampler") is not None:
        sampler.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    # random.setstate needs tuples; a round trip through some loaders gives lists.
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
