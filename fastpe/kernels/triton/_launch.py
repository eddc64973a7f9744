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
import threading
from typing import Any

import torch

from fastpe.backends import triton_interpreter_enabled

# Debug switch: fill every buffer a kernel is supposed to write with NaN first, so that an
# element a kernel forgets to write shows up as NaN in the output (tests turn it on).
POISON = os.environ.get("FASTPE_TRITON_POISON", "0") not in ("", "0")

# Memoize plans by call shape (see `cached`); FASTPE_PLAN_CACHE=0 re-plans every call.
PLAN_CACHE = os.environ.get("FASTPE_PLAN_CACHE", "1") not in ("", "0")

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


def _allocated(out: torch.Tensor) -> torch.Tensor:
    if POISON:
        out.fill_(float("nan") if out.dtype.is_floating_point else -(2**31 - 1))
    allocations = getattr(_recording, "allocations", None)
    if allocations is not None:  # a plan being recorded for the cache (see `cached`)
        # inference tensors keep no version counter: there the no-writes rule is trusted, not checked
        allocations.append((out, None if out.is_inference() else out._version))
    return out


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer (NaN-filled when POISON is on, so unwritten elements are caught)."""
    return _allocated(torch.empty(shape, dtype=dtype, device=device))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`empty` with the strides of ``x`` when it is dense (transposed views stay so)."""
    return _allocated(torch.empty_like(x))


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


def packed_cvt(device: torch.device) -> bool:
    """Whether kernels may convert float32 pairs with PTX ``cvt.rn.{bf16x2,f16x2}.f32`` (sm_80 and
    later): on a CUDA device its compute capability; never under the interpreter (no inline
    assembly); planned without a GPU (static report, compile check) the assumed sm_90a card."""
    if triton_interpreter_enabled():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def inline_ptx(device: torch.device) -> bool:
    """Whether kernels may use inline PTX for plain per-element memory instructions (predicated
    ``ld.global``, ``red.global.add``, in every PTX version): on a CUDA device, and for the sm_90a
    card planned without a GPU (static report, compile check); never under the interpreter."""
    return not triton_interpreter_enabled() and device.type in ("cuda", "cpu")


def approximate_math(device: torch.device) -> bool:
    """Whether kernels may call libdevice's approximate functions (``fast_cosf``, ``fast_sinf``):
    compiled kernels only (the interpreter has no libdevice)."""
    return not triton_interpreter_enabled()


def run_alignment(t: torch.Tensor, dim: int = -1) -> int:
    """Bytes (a power of two, at most 16) dividing the address where every contiguous run of ``t``
    along ``dim`` starts: kernels pass it to ``tl.multiple_of`` so that rows of odd widths (a head
    or model size of 90: 180-byte rows, 4-byte aligned) load as vectors, where Triton itself only
    assumes 16-byte alignment or none. 0 (no hint) when ``t`` is not contiguous along ``dim``."""
    dim = dim % t.dim()
    if t.stride(dim) != 1 and t.shape[dim] > 1:
        return 0
    size = t.element_size()
    align = 16
    others = [abs(st) * size for d, (n, st) in enumerate(zip(t.shape, t.stride())) if d != dim and n > 1]
    for v in [t.data_ptr()] + others:
        if v:
            align = min(align, v & -v)
    return align


def offset_alignment(nbytes: int) -> int:
    """Bytes (a power of two, at most 16) dividing a byte offset that a kernel adds to aligned
    runs (a run starting ``KA`` columns in): a hint must be the smaller of this and the runs'."""
    return min(16, nbytes & -nbytes) if nbytes else 16


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


# ----------------------------------------------------------------------------------------------
# plan cache: a repeated call shape costs no re-planning
# ----------------------------------------------------------------------------------------------

_recording = threading.local()


class _Uncacheable(Exception):
    """The plan holds a tensor the cache cannot rebuild from the arguments and its allocations."""


class _PlanTemplate:
    """What a planner decided for one call shape, without any tensor: the buffers it allocated
    (shape, strides, dtype), where each tensor of its result and launches comes from (an
    argument, a buffer, or a view of one), and the launches' kernels, grids and scalars."""

    def __init__(self, args, allocations, result):
        if any(version is not None and a._version != version for a, version in allocations):
            # the planner wrote into a buffer (zeroed it, say): a fresh empty one would not be the same
            raise _Uncacheable("a buffer written by the planner")
        allocations = [a for a, _version in allocations]
        self.allocations = [(a.shape, a.stride(), a.dtype, a.device) for a in allocations]
        arg_tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self._args = arg_tensors
        self._allocs = allocations
        *outputs, launches = result
        self.outputs = [self._source(t) for t in outputs]
        self.launches = []
        for launch in launches:
            # the scalar arguments as they are; for each tensor argument, where it comes from
            scalars = {name: value for name, value in launch.args.items() if not isinstance(value, torch.Tensor)}
            tensors = [(name, self._source(value)) for name, value in launch.args.items() if isinstance(value, torch.Tensor)]
            self.launches.append((launch.kernel, launch.grid, scalars, tensors, launch.constexprs, launch.num_warps, launch.num_stages))
        del self._args, self._allocs  # keep no tensor (no pointers, no memory) in the cache

    def _source(self, t):
        if t is None:
            return None
        for j, a in enumerate(self._allocs):
            if t is a:
                return ("alloc", j)
        for i, a in self._args:
            if t is a:
                return ("arg", i)
        storage = t.untyped_storage().data_ptr()
        if storage == 0:
            raise _Uncacheable("a view of an empty tensor")
        bases = [("alloc", j, a) for j, a in enumerate(self._allocs) if a.untyped_storage().data_ptr() == storage]
        bases += [("arg", i, a) for i, a in self._args if a.untyped_storage().data_ptr() == storage]
        if len(bases) != 1:
            # a tensor the planner made itself (a copy), or a view of arguments sharing storage
            raise _Uncacheable(f"{len(bases)} candidate bases for a view")
        kind, index, base = bases[0]
        if base.element_size() != t.element_size():
            raise _Uncacheable("a view with another element size")
        if t.shape == base.shape and t.stride() == base.stride() and t.storage_offset() == base.storage_offset():
            return ("cast", kind, index, t.dtype)  # the same elements read as another dtype (a bool mask as uint8)
        return ("view", kind, index, tuple(t.shape), t.stride(), t.storage_offset() - base.storage_offset(), t.dtype)

    def bind(self, args):
        """The planner's result for new tensors of the same call shape: fresh buffers, new pointers."""
        buffers = [_allocated(torch.empty_strided(shape, stride, dtype=dtype, device=device))
                   for shape, stride, dtype, device in self.allocations]

        def resolve(src):
            if src is None:
                return None
            if src[0] == "alloc":
                return buffers[src[1]]
            if src[0] == "arg":
                return args[src[1]]
            if src[0] == "cast":
                return (buffers if src[1] == "alloc" else args)[src[2]].view(src[3])
            _view, kind, index, shape, stride, offset, dtype = src
            base = buffers[index] if kind == "alloc" else args[index]
            if base.dtype != dtype:
                base = base.view(dtype)
            return base.as_strided(shape, stride, base.storage_offset() + offset)

        launches = []
        for kernel, grid, scalars, tensors, constexprs, num_warps, num_stages in self.launches:
            launch_args = dict(scalars)
            for name, src in tensors:
                launch_args[name] = resolve(src)
            launches.append(Launch(kernel, grid, launch_args, constexprs, num_warps, num_stages))
        return (*[resolve(src) for src in self.outputs], launches)


_UNCACHEABLE = object()
# torch.backends.cuda.matmul.allow_tf32 costs several microseconds per read; its getter does not
_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)


class cached:  # noqa: N801  (used as a function wrapper)
    """Memoize the planner ``module.name`` (a ``plan_*`` function) by call shape.

    A planner maps (shapes, strides, dtypes, device, flags) to configs, grids and launch
    records; its tensors are only passed through or allocated. The first call with a given key
    runs the planner and records a template of its result (no tensors, no pointers); later calls
    allocate the same buffers and fill the template with the new tensors. The key holds no tensor
    data: shapes, strides, dtypes, devices, which tensor arguments are the same object, the scalar
    arguments, and the global state planners read (TF32 switch, config overrides, interpreter).
    Safe under CUDA graph capture (buffers are allocated on every call, from the current pool)
    and torch.compile (the ops call the planners inside opaque custom ops, on real tensors).
    Planners must allocate through :func:`empty` / :func:`empty_like` and must not read tensor
    data. A plan the template cannot reproduce (a tensor the planner made otherwise, a copy, a
    buffer it wrote into) is re-planned on every call of that key, so it stays correct.
    """

    def __init__(self, module, name: str, maxsize: int = 256):
        # The planner is looked up on every call (and is part of the key), so that replacing
        # ``module.name`` (a test's monkeypatch, a tuning session) takes effect at once.
        self.module, self.name = module, name
        self.maxsize = maxsize
        self.templates: dict = {}
        self.hits = self.misses = 0

    @property
    def planner(self):
        return getattr(self.module, self.name)

    def key(self, planner, args) -> tuple:
        parts = [planner]
        seen = {}
        device = None
        for a in args:
            if isinstance(a, torch.Tensor):
                # (the address modulo 16: planners may specialize on row alignment, as Triton does)
                parts.append((a.shape, a.stride(), a.dtype, a.data_ptr() % 16, seen.setdefault(id(a), len(seen))))
                if device is None:
                    device = a.device  # the planners allocate on their first tensor's device
            elif a is None or isinstance(a, (bool, int, float, str)):
                parts.append((type(a), a))
            else:
                raise TypeError(f"{self.name}: cannot key a plan on {type(a).__name__}")
        overrides = tuple(sorted((op, tuple(sorted(k.items()))) for op, k in _OVERRIDES.items())) if _OVERRIDES else ()
        return (tuple(parts), device, _allow_tf32(), overrides, triton_interpreter_enabled())

    def __call__(self, *args):
        planner = getattr(self.module, self.name)
        if not PLAN_CACHE:
            return planner(*args)
        key = self.key(planner, args)
        template = self.templates.get(key)
        if template is not None and template is not _UNCACHEABLE:
            self.hits += 1
            return template.bind(args)
        self.misses += 1
        if template is _UNCACHEABLE:
            return planner(*args)
        outer = getattr(_recording, "allocations", None)
        _recording.allocations = allocations = []
        try:
            result = planner(*args)
        finally:
            _recording.allocations = outer
        if outer is not None:
            outer.extend(allocations)
        try:
            template = _PlanTemplate(args, allocations, result)
        except _Uncacheable:
            template = _UNCACHEABLE
        if len(self.templates) >= self.maxsize:
            self.templates.pop(next(iter(self.templates)))  # the oldest key
        self.templates[key] = template
        return result

    def clear(self) -> None:
        self.templates.clear()
        self.hits = self.misses = 0
