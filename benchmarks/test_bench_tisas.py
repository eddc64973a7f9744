"""Time-interval (TiSASRec) attention, forward and forward+backward on the GPU, at the issue's
shapes (K = 256 interval buckets, absolute-position tables, left padding, causal), against the
torch composition and SDPA without positions in the same run.

    pytest benchmarks/test_bench_tisas.py --benchmark-only          # on a GPU

Baseline (speedup column): ``torch``, the efficient PyTorch composition (no [B, L, L, d]
tensors). Floor (goal: no slower): ``sdpa_no_pos_masked``, SDPA without any positional term
with the same padding and causal mask. Without a GPU a tiny shape runs once as a smoke test.
"""

import pytest
import torch
import torch.nn.functional as F

from baselines import FUSED, check_fused
from runner import DEVICE, HAS_CUDA, INPUT_SETS, dtype_name, make_impl, run_op_benchmark
from fastpe.ops import time_interval_attention

bf16, fp32 = torch.bfloat16, torch.float32
SPAN = 256
# (B, h, L, dh, dtype): the shapes (B=128, L=200, d=64) and (B=128, L=50, d=50)
SHAPES = [(128, 1, 200, 64, bf16), (128, 1, 50, 50, bf16), (128, 1, 200, 64, fp32)] if HAS_CUDA else \
    [(3, 1, 9, 8, fp32)]
IMPLS = ("torch", "sdpa_no_pos_masked", *FUSED)


def tisas_impl(name, device):
    if name == "sdpa_no_pos_masked":
        def sdpa(q, k, v, rk, rv, pk, pv, t, kpm):
            length = q.shape[2]
            causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & ~kpm[:, None, None, :])
        return sdpa
    if name in FUSED:
        check_fused(name, "time_interval_attention", device)

    def run(q, k, v, rk, rv, pk, pv, t, kpm):
        return time_interval_attention(q, k, v, rk, rv, t, pos_k=pk, pos_v=pv, key_padding_mask=kpm, is_causal=True,
                                       backend=name)
    return run


def tisas_inputs(b, h, length, dh, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    lengths = torch.randint(max(1, length // 4), length + 1, (b,), generator=gen)
    kpm = (torch.arange(length)[None, :] < (length - lengths)[:, None]).to(device)  # left padding
    gaps = ((torch.rand(b, length, generator=gen, dtype=torch.float64) * 6).exp() * 600).round().long()
    times = (1_600_000_000 + gaps.cumsum(1)).to(device)
    return (t(b, h, length, dh), t(b, h, length, dh), t(b, h, length, dh), t(SPAN + 1, dh), t(SPAN + 1, dh),
            t(length, dh), t(length, dh), times, kpm)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-h{s[1]}-L{s[2]}-dh{s[3]}-{dtype_name(s[4])}")
@pytest.mark.parametrize("impl", IMPLS)
def test_tisas(benchmark, impl, shape, mode):
    b, h, length, dh, dtype = shape
    fn = make_impl(tisas_impl, impl, DEVICE)
    inputs = [tisas_inputs(b, h, length, dh, dtype, DEVICE, seed) for seed in range(INPUT_SETS)]
    run_op_benchmark(
        benchmark, fn, inputs, mode=mode, impl=impl, baseline="torch", floor="sdpa_no_pos_masked",
        group=f"tisas K={SPAN} {mode} B={b} h={h} L={length} dh={dh} {dtype_name(dtype)}",
        info=dict(B=b, h=h, L=length, dh=dh, dtype=dtype_name(dtype), op="tisas"),
        flops_fwd=4 * b * h * length * length * dh,
    )
