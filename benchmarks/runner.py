"""Run one op benchmark: warm up, measure peak memory, time over rotating input sets, and
record what the report needs (group, implementation, baseline/floor flags, GB/s, TFLOP/s)."""

from __future__ import annotations

import pytest
import torch

from baselines import Unavailable
from timing import Rotating, peak_cuda_mib

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
INPUT_SETS = 3 if HAS_CUDA else 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


def make_impl(factory, *args):
    try:
        return factory(*args)
    except Unavailable as exc:
        pytest.skip(str(exc))


def run_op_benchmark(benchmark, fn, input_sets, *, mode, group, impl, baseline, floor=None, info=None,
                     bytes_fwd=None, flops_fwd=None):
    """``mode`` "fwd" (no autograd) or "fwd+bwd" (autograd.grad of every input that requires grad)."""
    if mode == "fwd":
        def call(*inputs):
            with torch.no_grad():
                return fn(*inputs)
    else:
        grad_out = torch.randn_like(fn(*input_sets[0]).detach())

        def call(*inputs):
            out = fn(*inputs)
            leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)

    result = call(*input_sets[0])  # warm-up: compiles kernels and checks the run is sane
    first = result if isinstance(result, torch.Tensor) else next(g for g in result if g is not None)
    assert torch.isfinite(first).all(), f"{impl} produced non-finite values"
    benchmark.group = group
    benchmark.extra_info.update(info or {}, impl=impl, mode=mode, baseline=impl == baseline, floor=impl == floor)
    if HAS_CUDA and not benchmark.disabled:
        benchmark.extra_info["peak_mib"] = peak_cuda_mib(lambda: call(*input_sets[0]))
    benchmark(Rotating(call, input_sets))
    if not benchmark.disabled:
        seconds = benchmark.stats.stats.median
        scale = 1 if mode == "fwd" else 3  # backward does about twice the forward's work
        if bytes_fwd:
            benchmark.extra_info["gbps"] = scale * bytes_fwd / seconds / 1e9
        if flops_fwd:
            benchmark.extra_info["tflops"] = scale * flops_fwd / seconds / 1e12
