"""Timing helpers for GPU benchmarks.

pytest-benchmark reads its clock before and after a loop of calls. On a GPU those calls only
queue kernels, so the clock used there synchronizes the device first: the loop's time is then
the time the GPU spent on it. conftest.py selects this clock whenever CUDA is available.
"""

from __future__ import annotations

import time

import torch


def cuda_synchronized_perf_counter() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


class Rotating:
    """Call ``fn`` on several input sets in turn, so no set stays hot in L2 between calls."""

    def __init__(self, fn, input_sets):
        self.fn = fn
        self.input_sets = list(input_sets)
        self.calls = 0

    def __call__(self):
        inputs = self.input_sets[self.calls % len(self.input_sets)]
        self.calls += 1
        return self.fn(*inputs)


def peak_cuda_mib(fn) -> float:
    """Peak CUDA memory allocated during one call of ``fn``, above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
