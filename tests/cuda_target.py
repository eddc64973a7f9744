"""Where the tests of ``backend="cuda"`` run: on a GPU ("gpu", marked ``gpu``, skipped without
one), or on the CPU through the emulation of the CUDA kernels ("emulated", see
cuda_emulation.py). Both go through the public API with ``backend="cuda"``; for "emulated" the
backend's device check is patched to accept CPU tensors and its operator namespace is pointed at
the emulation's. Every test runs with FASTPE_DEBUG_POISON=1: outputs start as NaN, so
an element a kernel forgets to write fails.

With a GPU present the emulated variants are skipped (they cost minutes of the scarce GPU
machine time) unless FASTPE_EMULATION_TESTS=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import fastpe
import fastpe.backends
from fastpe import _ext

TARGETS = [pytest.param("emulated", id="emulated"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


@dataclass
class Target:
    name: str
    device: torch.device

    @property
    def emulated(self) -> bool:
        return self.name == "emulated"


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    monkeypatch.setenv("FASTPE_DEBUG_POISON", "1")
    if request.param == "gpu":
        reason = _ext.unavailable_reason()
        if reason is not None:
            pytest.fail(f"the cuda backend is unavailable on this GPU machine: {reason}")
        return Target("gpu", torch.device("cuda"))
    if torch.cuda.is_available() and os.environ.get("FASTPE_EMULATION_TESTS", "0") in ("", "0"):
        pytest.skip("a GPU is present: the emulated variants are skipped (FASTPE_EMULATION_TESTS=1 runs them)")
    from cuda_emulation import NAMESPACE, emulated_ops

    emulated_ops()
    real = fastpe.backends.cuda_unavailable_reason
    monkeypatch.setattr(fastpe.backends, "cuda_unavailable_reason", lambda d: None if d.type == "cpu" else real(d))
    monkeypatch.setattr(_ext, "_NAMESPACE", NAMESPACE)
    return Target("emulated", torch.device("cpu"))


def ops_namespace(target: Target):
    """The namespace of the GPU build's ops or of the emulation's."""
    return getattr(torch.ops, _ext._NAMESPACE)
