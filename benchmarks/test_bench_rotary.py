"""Rotary (RoPE with learnable angles) and Rotatory (add, rotate), forward and forward+backward
with angle gradients, against eager and compiled PyTorch and a same-size clone (the bandwidth
floor; the target is forward+backward within 3x of it).

    pytest benchmarks/test_bench_rotary.py --benchmark-only          # on a GPU
"""

import pytest
import torch

from baselines import ROTARY_IMPLS, rotary_impl, rotary_inputs
from runner import DEVICE, HAS_CUDA, INPUT_SETS, dtype_name, make_impl, run_op_benchmark

bf16, fp32 = torch.bfloat16, torch.float32
# (op, shape, dtype): rotary x [B, L, h, dh]; rotatory x [B, L, d]
CASES = [
    ("rotary", (512, 50, 2, 32), bf16),
    ("rotary", (256, 200, 2, 64), bf16),
    ("rotary", (128, 75, 1, 90), fp32),
    ("rotatory-add", (512, 50, 64), bf16),
    ("rotatory-rotate", (512, 50, 64), bf16),
    ("rotatory-add", (128, 75, 90), fp32),
] if HAS_CUDA else [("rotary", (3, 7, 2, 6), fp32), ("rotatory-add", (3, 7, 6), fp32), ("rotatory-rotate", (3, 7, 6), fp32)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{dtype_name(c[2])}")
@pytest.mark.parametrize("impl", ROTARY_IMPLS)
def test_rotary(benchmark, impl, case, mode):
    op, shape, dtype = case
    fn = make_impl(rotary_impl, impl, DEVICE, op)
    inputs = [rotary_inputs(shape, dtype, DEVICE, seed) for seed in range(INPUT_SETS)]
    x = inputs[0][0]
    run_op_benchmark(
        benchmark, fn, inputs, mode=mode, impl=impl, baseline="torch", floor="clone",
        group=f"{op} {mode} {'x'.join(map(str, shape))} {dtype_name(dtype)}",
        info=dict(shape=list(shape), dtype=dtype_name(dtype), op=op),
        bytes_fwd=2 * x.numel() * x.element_size(),  # read x, write y
    )
