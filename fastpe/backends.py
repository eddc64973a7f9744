"""Backend names, availability checks and resolution of ``backend="auto"``.

Every fused op has one functional entry point with a ``backend=`` argument:

* ``"reference"``: plain PyTorch, obviously correct, float64-capable; the tests' oracle.
* ``"torch"``: an efficient composition of PyTorch ops; the CPU path.
* ``"triton"``: fused Triton kernels (CUDA tensors, or the CPU under ``TRITON_INTERPRET=1``).
* ``"cuda"``: the compiled CUDA extension in ``csrc/``.
* ``"auto"``: the fastest backend available for the tensor's device.

An explicitly requested backend that cannot run raises :class:`BackendUnavailableError`
saying why; it never silently falls back to another one.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
OPS = ("relative_attention", "rotary", "rotatory_add", "concat_projection", "time_interval_attention",
       "bucketed_attention")

# Ops some fused backends do not cover yet, {op: {backend: why}}: an explicit request of such a
# backend says so (before looking for the kernels, which may not even import here), and "auto"
# skips it (the torch composition when no fused backend covers the op).
NOT_FUSED_YET = {
    "bucketed_attention": {
        backend: "relative attention with given bucket ids has no fused kernels yet; use backend='torch' "
                 "(or 'auto', which picks it)"
        for backend in ("triton", "cuda")
    },
}


# Ops whose fused kernels "auto" does not pick yet: they pass their tests under the Triton
# interpreter and the CUDA emulation and compile for sm_90, but no GPU run has checked and timed
# them (benchmarks/gpu_suite.py does both). An explicit backend="triton" or "cuda" runs them.
AUTO_NOT_YET = {"time_interval_attention": ("triton", "cuda")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> str | None:
    """None when triton imports, else the reason it does not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'fastpe[triton]')"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install says so instead of hiding behind 'auto'
        return f"triton failed to import: {exc}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    reason = _triton_importable()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    return (
        f"the triton backend needs CUDA tensors (got device {device}); on the CPU it runs "
        "only under TRITON_INTERPRET=1, which is meant for testing"
    )


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """None when the compiled CUDA extension can run on ``device``, else why not."""
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors (got device {device})"
    from fastpe import _ext  # imported lazily: it may build the extension

    return _ext.unavailable_reason()


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend == "cuda":
        return cuda_unavailable_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def _load_auto_preferences(path: Path = Path(__file__).with_name("auto_preferences.json")) -> dict:
    # Written by benchmarks/gpu_suite.py from measurements (which fused backend was faster per op
    # and shape class); read once at import so that torch.compile never traces file I/O.
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("order", {})


AUTO_PREFERENCES: dict = _load_auto_preferences()
DEFAULT_FUSED_ORDER = ("cuda", "triton")


def shape_class(op: str, *args) -> str:
    """The shape class ``backend="auto"`` keys its measured preference on, from an op's arguments
    (its torch-backend signature): relative attention by key length and head size (short sequences
    and small heads are where tile sizes matter), the element-wise ops as one class."""
    if op not in AUTO_PREFERENCES:  # nothing measured: no shape guard for torch.compile / export
        return "any"
    if op == "relative_attention" and args:
        q, k = args[0], args[1]
        return attention_shape_class(k.shape[-2], q.shape[-1])
    return "any"


def attention_shape_class(key_length: int, head_dim: int) -> str:
    return f"{'L<=64' if key_length <= 64 else 'L>64'},{'dh<=64' if head_dim <= 64 else 'dh>64'}"


def _auto_order(op: str, device: torch.device, klass: str = "any") -> tuple[str, ...]:
    # The CPU has no fused path (the Triton interpreter is a test tool, never picked automatically).
    # On the GPU: the measured order for this op and shape class when there is one, else cuda first.
    if device.type != "cuda":
        return ("torch",)
    measured = AUTO_PREFERENCES.get(op, {}).get(klass)
    fused = tuple(measured) if measured else DEFAULT_FUSED_ORDER
    return (*fused, *(b for b in DEFAULT_FUSED_ORDER if b not in fused), "torch")


def resolve_backend(backend: str, op: str, device: torch.device, klass: str = "any") -> str:
    """Turn a requested backend into the one that runs, or raise saying why it cannot. ``klass``
    (see :func:`shape_class`) lets ``"auto"`` follow the measured preference for the shapes at hand."""
    name = _resolve(backend, op, device, klass)
    if name in FUSED_BACKENDS:
        fused_implementation(op, name)  # import the module now, outside the traced code
    return name


# torch.compile evaluates the resolution once while tracing and keeps the result: it depends only
# on the environment, and tracing through it (imports, environment reads) would break the graph.
# This is what torch.compiler.assume_constant_result sets; calling that would import
# torch._dynamo, and with it triton, on `import fastpe`.
resolve_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _resolve(backend: str, op: str, device: torch.device, klass: str = "any") -> str:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    not_fused = NOT_FUSED_YET.get(op, {})
    if backend in not_fused:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run: {not_fused[backend]}")
    if backend == "auto":
        for candidate in _auto_order(op, device, klass):
            if candidate in not_fused or candidate in AUTO_NOT_YET.get(op, ()):
                continue
            if unavailable_reason(candidate, device) is None and _implemented(op, candidate):
                return candidate
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run: {reason}")
    if not _implemented(op, backend):
        raise BackendUnavailableError(f"{op}: backend {backend!r} has no implementation of this op")
    return backend


FUSED_BACKENDS = ("triton", "cuda")


def _fused_module(backend: str):
    # Plain import statements, not importlib.import_module: torch.compile traces these (dynamo
    # refuses importlib), so a model using a fused backend compiles without graph breaks.
    if backend == "cuda":
        from fastpe import _ext as module
    elif backend == "triton":
        from fastpe.kernels import triton as module
    else:
        raise ValueError(f"{backend!r} is not a fused backend; expected one of {FUSED_BACKENDS}")
    return module


def _implemented(op: str, backend: str) -> bool:
    if backend in ("reference", "torch"):
        return True
    return op in getattr(_fused_module(backend), "IMPLEMENTED_OPS", ())


def fused_implementation(op: str, backend: str):
    """The function implementing ``op`` in a fused backend (imported on first use)."""
    return getattr(_fused_module(backend), op)
