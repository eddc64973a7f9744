"""Concat-projection ``Linear(concat(x, e_p))``, forward and forward+backward, against the
materialized concat, the torch composition (eager and compiled) and a plain Linear of the same
output size (the floor; the target is within 1.1x of it).

    pytest benchmarks/test_bench_concat.py --benchmark-only          # on a GPU
"""

import pytest
import torch

from baselines import CONCAT_IMPLS, concat_impl, concat_inputs
from runner import DEVICE, HAS_CUDA, INPUT_SETS, dtype_name, make_impl, run_op_benchmark

bf16, fp32 = torch.bfloat16, torch.float32
# (B, L, d, dtype)
SHAPES = [(512, 50, 64, bf16), (256, 200, 128, bf16), (128, 75, 90, fp32), (128, 50, 390, bf16)] if HAS_CUDA else [(3, 7, 8, fp32)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-L{s[1]}-d{s[2]}-{dtype_name(s[3])}")
@pytest.mark.parametrize("impl", CONCAT_IMPLS)
def test_concat_projection(benchmark, impl, shape, mode):
    b, length, d, dtype = shape
    fn = make_impl(concat_impl, impl, DEVICE)
    inputs = [concat_inputs(b, length, d, dtype, DEVICE, seed) for seed in range(INPUT_SETS)]
    run_op_benchmark(
        benchmark, fn, inputs, mode=mode, impl=impl, baseline="torch", floor="linear",
        group=f"concat-projection {mode} B={b} L={length} d={d} {dtype_name(dtype)}",
        info=dict(B=b, L=length, d=d, dtype=dtype_name(dtype), op="concat-projection"),
        flops_fwd=2 * b * length * d * d,  # the Linear of the same output size
    )
