"""Time-interval (TiSASRec) attention, K = 256, causal with left padding, forward and
forward+backward, against every baseline in the same run.

    pytest benchmarks/test_bench_tisas.py --benchmark-only          # on a GPU

Baseline (speedup column): ``torch``, the chunked PyTorch composition. Floor (the goal is to be no
slower): ``sdpa_no_pos_masked``, SDPA without positions or intervals with the same padding and
causal mask. ``materialized`` is what TiSASRec's public implementations do (``[B, L, L, dh]``
interval keys and values; the interval matrix is computed outside the timed call, as their data
sampler does). Without a GPU a tiny shape runs once as a smoke test.
"""

import pytest
import torch

from baselines import TISAS_IMPLS, tisas_impl, tisas_inputs
from runner import DEVICE, HAS_CUDA, INPUT_SETS, dtype_name, make_impl, run_op_benchmark

bf16, fp32 = torch.bfloat16, torch.float32
# (B, h, L, dh, dtype): TiSASRec's settings (one head, L 50 / 200, d 50 / 64) and the study's S1-S3
SHAPES = [
    (128, 1, 50, 50, bf16),
    (128, 1, 200, 64, bf16),
    (512, 2, 50, 32, bf16),
    (256, 2, 200, 64, bf16),
    (128, 1, 75, 90, bf16),
] if HAS_CUDA else [(3, 1, 9, 8, fp32)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-h{s[1]}-L{s[2]}-dh{s[3]}-{dtype_name(s[4])}")
@pytest.mark.parametrize("impl", TISAS_IMPLS)
def test_tisas(benchmark, impl, shape, mode):
    b, h, length, dh, dtype = shape
    fn = make_impl(tisas_impl, impl, DEVICE)
    inputs = [tisas_inputs(b, h, length, dh, dtype, DEVICE, seed) for seed in range(INPUT_SETS)]
    run_op_benchmark(
        benchmark, fn, inputs, mode=mode, impl=impl, baseline="torch", floor="sdpa_no_pos_masked",
        group=f"tisas-256 {mode} B={b} h={h} L={length} dh={dh} {dtype_name(dtype)}",
        info=dict(B=b, h=h, L=length, dh=dh, dtype=dtype_name(dtype), op="tisas-256"),
        flops_fwd=4 * b * h * length * length * dh,  # QK^T and PV, the same nominal count for all
    )
