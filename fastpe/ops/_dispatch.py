"""Pick the function that runs an op for a requested backend."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastpe.backends import _fused_module, fused_implementation, resolve_backend, shape_class

# op -> the backend that ran it last in this process, recorded on eager calls (traced code is not
# recorded), so that a run reports what actually ran rather than what was asked for.
RAN: dict[str, str] = {}


def _ran(op: str, name: str) -> None:
    if not torch.compiler.is_compiling():
        RAN[op] = name


def implementation(op: str, backend: str, device: torch.device, reference: Callable, composed: Callable,
                   args: tuple = ()) -> Callable:
    """The function for ``op``. With ``backend="auto"``, ``args`` (the call's arguments) pick the
    measured backend order for their shape class, and let a fused backend decline shapes it does
    not take (e.g. Triton's head-size limit): the torch composition runs them instead. An
    explicitly requested backend is never replaced."""
    name = resolve_backend(backend, op, device, shape_class(op, *args) if backend == "auto" else "any")
    if name == "reference":
        _ran(op, name)
        return reference
    if name == "torch":
        _ran(op, name)
        return composed
    declines = getattr(_fused_module(name), "unsupported_reason", None)
    if backend == "auto" and declines is not None and declines(op, *args) is not None:
        _ran(op, "torch")
        return composed
    _ran(op, name)
    return fused_implementation(op, name)
