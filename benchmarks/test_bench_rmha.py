"""RMHA-4 (relative keys and values, clipped distance 4), forward and forward+backward, at the
study's shapes, against every baseline in the same run.

    pytest benchmarks/test_bench_rmha.py --benchmark-only          # on a GPU

Baseline (speedup column): ``torch``, the best plain PyTorch composition. Floor (the target is
within 1.5x of it): ``sdpa_no_pos_masked``, SDPA without positional terms with the same padding
mask. ``flex_keys_only`` is FlexAttention with a relative-KEY score_mod: it cannot express the
relative-value term, so it does less work than RMHA-4. Without a GPU a tiny shape runs once as a
smoke test.
"""

import pytest
import torch

from baselines import RMHA_IMPLS, rmha_impl, rmha_inputs
from runner import DEVICE, HAS_CUDA, INPUT_SETS, dtype_name, make_impl, run_op_benchmark

bf16, fp32 = torch.bfloat16, torch.float32
# (B, h, L, dh, dtype): the study's range (B 128-512, L 35-200, d 64-390, 1-3 heads)
SHAPES = [
    (512, 2, 50, 32, bf16),
    (512, 2, 50, 32, fp32),
    (256, 2, 200, 64, bf16),
    (128, 1, 75, 90, bf16),
    (256, 3, 35, 130, bf16),
] if HAS_CUDA else [(3, 2, 9, 8, fp32)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-h{s[1]}-L{s[2]}-dh{s[3]}-{dtype_name(s[4])}")
@pytest.mark.parametrize("impl", RMHA_IMPLS)
def test_rmha4(benchmark, impl, shape, mode):
    b, h, length, dh, dtype = shape
    fn = make_impl(rmha_impl, impl, DEVICE)
    inputs = [rmha_inputs(b, h, length, dh, dtype, DEVICE, seed) for seed in range(INPUT_SETS)]
    run_op_benchmark(
        benchmark, fn, inputs, mode=mode, impl=impl, baseline="torch", floor="sdpa_no_pos_masked",
        group=f"rmha-4 {mode} B={b} h={h} L={length} dh={dh} {dtype_name(dtype)}",
        info=dict(B=b, h=h, L=length, dh=dh, dtype=dtype_name(dtype), op="rmha-4"),
        flops_fwd=4 * b * h * length * length * dh,  # QK^T and PV, the same nominal count for all
    )
