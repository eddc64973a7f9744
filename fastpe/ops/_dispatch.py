"""Pick the function that runs an op for a requested backend."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastpe.backends import fused_implementation, resolve_backend


def implementation(op: str, backend: str, device: torch.device, reference: Callable, composed: Callable) -> Callable:
    name = resolve_backend(backend, op, device)
    if name == "reference":
        return reference
    if name == "torch":
        return composed
    return fused_implementation(op, name)
