"""Launch plumbing shared by the Triton kernels: launch records, config overrides, allocation.

Every kernel call goes through a :class:`Launch` record built by a ``plan_*`` function. The
same records are executed by the ops and compiled for sm_90 by
:mod:`fastpe.kernels.triton.compile_check`, so the compile check covers exactly the
configurations the ops ship.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import torch

from fastpe.backends import triton_interpreter_enabled

# Debug switch: fill every buffer a kernel is supposed to write with NaN first, so that an
# element a kernel forgets to write shows up as NaN in the output (tests turn it on).
POISON = os.environ.get("FASTPE_TRITON_POISON", "0") not in ("", "0")

# Config overrides for tests and tuning sessions: {op name: {knob: value}} (see `override`).
_OVERRIDES: dict[str, dict[str, Any]] = {}


@contextlib.contextmanager
def override(op: str, **knobs):
    """Force config knobs of one op's planner, e.g. ``override("rmha_bwd", mode="split", block_m=16)``.

    Meant for tests (to reach the multi-block code paths with tiny shapes) and GPU tuning runs.
    """
    previous = _OVERRIDES.get(op)
    _OVERRIDES[op] = {**(previous or {}), **knobs}
    try:
        yield
    finally:
        if previous is None:
            _OVERRIDES.pop(op, None)
        else:
            _OVERRIDES[op] = previous


def knobs(op: str, **defaults):
    """``defaults`` with any active overrides of ``op`` applied."""
    forced = _OVERRIDES.get(op)
    if forced:
        unknown = set(forced) - set(defaults)
        if unknown:
            raise ValueError(f"unknown config knobs for {op}: {sorted(unknown)}; known: {sorted(defaults)}")
        defaults.update(forced)
    return defaults


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer (NaN-filled when POISON is on, so unwritten elements are caught)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -(2**31 - 1))
    return out


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`empty` with the strides of ``x`` when it is dense (transposed views stay so)."""
    out = torch.empty_like(x)
    if POISON:
        out.fill_(float("nan"))
    return out


def check_int32_indexing(op: str, *tensors: torch.Tensor) -> None:
    """The kernels index with 32-bit offsets: refuse tensors they would address wrongly."""
    for t in tensors:
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)
        if extent >= 2**31:
            raise ValueError(
                f"{op}: the triton backend indexes with 32-bit offsets and supports tensors spanning fewer "
                f"than 2**31 elements, got shape {tuple(t.shape)}; split the batch or use backend='torch'"
            )


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pad16(n: int) -> int:
    return max(16, (int(n) + 15) // 16 * 16)


def split_pow2(n: int) -> tuple[int, int]:
    """Split a feature size into two power-of-two chunks ``(a, b)`` with ``a + b >= n``.

    The chunks cover ``n`` padded to a multiple of 16 whenever that is a sum of two powers of
    two (16, 32, 48, 64, 80, 96, 128, 144, 160, 192, 256: every head size seen in practice,
    e.g. 30 -> 32, 50 -> 64, 90 -> 64 + 32, 130 -> 128 + 16); other sizes round the second
    chunk up. ``b`` is 0 when one chunk suffices.
    """
    padded = pad16(n)
    a = 1 << (padded.bit_length() - 1)
    rest = padded - a
    return a, (next_pow2(rest) if rest else 0)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# What the planners assume about the card when they do not run on one: the H100/H200 the
# benchmarks use (132 SMs). Under the interpreter the planners pretend one SM, which keeps
# test grids small (every program instance costs milliseconds there).
ASSUMED_SMS = 132


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    if triton_interpreter_enabled():
        return 1
    return ASSUMED_SMS


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 follows torch's TF32 switch (off by default), as matmul does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@dataclasses.dataclass
class Launch:
    """One kernel launch: the kernel, its grid, runtime arguments and compile-time constants."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 1

    def __call__(self) -> None:
        if any(g == 0 for g in self.grid):
            return
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def run(launches) -> None:
    for launch in launches:
        launch()
