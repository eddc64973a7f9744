"""Input checks shared by the functional ops and the modules.

Every check raises with a message that names the argument and what was wrong with it, so a
user sees "query: expected 4 dims [B, h, L, dh], got shape (2, 3)" rather than a matmul error
from deep inside a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(t: torch.Tensor, name: str, ndim: int | Sequence[int] | None = None, layout: str = "") -> None:
    """``t`` is a floating-point tensor with ``ndim`` dims (one of them, if a sequence)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    check_ndim(t, name, ndim, layout)


def check_ndim(t: torch.Tensor, name: str, ndim: int | Sequence[int] | None, layout: str = "") -> None:
    if ndim is None:
        return
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in allowed:
        want = " or ".join(str(n) for n in allowed)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected {want} dims{hint}, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    present = {k: v.dtype for k, v in tensors.items() if v is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{k} {d}" for k, d in present.items())
        raise TypeError(f"all floating-point inputs must share one dtype, got {listing}")


def check_positions(positions: torch.Tensor | None, batch: int, length: int, table_rows: int, name: str = "positions") -> None:
    """``positions`` indexes a table of ``table_rows`` rows: [L] or [B, L] integers in range."""
    if positions is None:
        if length > table_rows:
            raise ValueError(
                f"sequence length {length} exceeds the configured maximum of {table_rows} positions "
                f"(raise max_len when building the encoding)"
            )
        return
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer positions, got {type(positions).__name__}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected int64 or int32 positions, got dtype {positions.dtype}")
    if positions.dim() == 1:
        if positions.shape[0] != length:
            raise ValueError(f"{name}: expected shape [L={length}] or [B, L], got {tuple(positions.shape)}")
    elif positions.dim() == 2:
        if tuple(positions.shape) != (batch, length):
            raise ValueError(f"{name}: expected shape [L] or [B={batch}, L={length}], got {tuple(positions.shape)}")
    else:
        raise ValueError(f"{name}: expected 1 or 2 dims ([L] or [B, L]), got shape {tuple(positions.shape)}")
    if positions.numel() and not _is_tracing():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= table_rows:
            raise ValueError(
                f"{name}: values must lie in [0, {table_rows - 1}] (the configured maximum length is "
                f"{table_rows}), got range [{lo}, {hi}]"
            )


def _is_tracing() -> bool:
    # Value checks need a host sync; skip them while torch.compile / export trace the graph and
    # while a CUDA graph is being captured (a sync there aborts the capture).
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
