"""RMHA-4 forward+backward on the CPU: the ``torch`` backend against the direct port that
materializes ``[B, h, L, L, dh]`` (the baseline, measured in the same run).

    pytest benchmarks/test_bench_cpu_rmha.py --benchmark-only

Target (issue 2): at B=64, h=2, L=200, dh=32 float32 the torch backend is >= 3x faster and uses
>= 5x less peak memory. Results: benchmarks/results/cpu.md.
"""

import pytest
import torch

from cpu_memory import peak_extra_mib
from fastpe.ops import relative_attention
from fastpe.reference import relative_attention_direct_port

SHAPE = dict(B=64, h=2, L=200, dh=32)

SETUP = """
from fastpe.ops import relative_attention
from fastpe.reference import relative_attention_direct_port
g = torch.Generator().manual_seed(0)
B, h, L, dh = {B}, {h}, {L}, {dh}
q, k, v = (torch.randn(B, h, L, dh, generator=g).requires_grad_() for _ in range(3))
rk, rv = (torch.randn(1, 9, dh, generator=g).requires_grad_() for _ in range(2))
kpm = torch.arange(L)[None, :] < torch.randint(0, L, (B, 1), generator=g)
"""

RUNS = {
    "direct_port": "relative_attention_direct_port(q, k, v, rk, rv, kpm).sum().backward()",
    "torch": "relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend='torch').sum().backward()",
}


def make_inputs(B, h, L, dh):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, dh, generator=g).requires_grad_() for _ in range(3))
    rk, rv = (torch.randn(1, 9, dh, generator=g).requires_grad_() for _ in range(2))
    kpm = torch.arange(L)[None, :] < torch.randint(0, L, (B, 1), generator=g)
    return q, k, v, rk, rv, kpm


def fwd_bwd(impl, q, k, v, rk, rv, kpm):
    for t in (q, k, v, rk, rv):
        t.grad = None
    if impl == "direct_port":
        out = relative_attention_direct_port(q, k, v, rk, rv, kpm)
    else:
        out = relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend=impl)
    out.sum().backward()


@pytest.mark.parametrize("impl", ["direct_port", "torch"])
def test_rmha4_cpu_fwd_bwd(benchmark, impl):
    torch.set_num_threads(2)
    inputs = make_inputs(**SHAPE)
    benchmark.group = "rmha-4 cpu fwd+bwd B=64 h=2 L=200 dh=32 fp32"
    benchmark.extra_info.update(SHAPE, dtype="float32", impl=impl, baseline=impl == "direct_port")
    if not benchmark.disabled:
        benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(SETUP.format(**SHAPE), RUNS[impl])
    benchmark.pedantic(fwd_bwd, args=(impl, *inputs), rounds=5, warmup_rounds=1)
