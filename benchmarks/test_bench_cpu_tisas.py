"""TiSASRec time-interval attention forward+backward on the CPU: the ``torch`` backend against the
materialising formulation of TiSASRec's public implementations (the interval matrix embedded into
``[B, L, L, d]`` key and value tensors), measured in the same run.

    pytest benchmarks/test_bench_cpu_tisas.py --benchmark-only

One head (TiSASRec's default), K = 256, absolute-position key/value tables, causal mask and left
padding. The baseline receives the ``[B, L, L]`` interval matrix precomputed (as TiSASRec's data
sampler hands it to the model); the torch backend computes the buckets from ``t [B, L]`` inside the
timed call. One thread: the project's 2-core machine is shared, and two OpenMP threads on an
oversubscribed machine time their barriers rather than the work. Peak memory is measured after the
same workload ran once at B=2 in the same process, so that the libraries' first-use buffers (about
20 MiB, the same for both) are not counted as the workload's. Targets (issue 12): >= 3x faster and
>= 10x less peak memory. Results: benchmarks/results/cpu_tisas.md.
"""

import pytest
import torch

from cpu_memory import peak_extra_mib

SHAPES = [dict(B=128, L=200, d=64, K=256), dict(B=128, L=50, d=50, K=256)]
THREADS = 1

SETUP = """
import torch
from fastpe.ops import time_interval_attention
from fastpe.reference import time_interval_attention_materialized, time_interval_buckets_reference
g = torch.Generator().manual_seed(0)
B, L, d, K = {B}, {L}, {d}, {K}
q, k, v = (torch.randn(B, 1, L, d, generator=g).requires_grad_() for _ in range(3))
rk, rv = (torch.randn(1, K + 1, d, generator=g).requires_grad_() for _ in range(2))
pk, pv = (torch.randn(L, d, generator=g).requires_grad_() for _ in range(2))
t = 1_600_000_000 + (torch.rand(B, L, generator=g, dtype=torch.float64) * 12).exp().mul(60).cumsum(1).round().long()
kpm = torch.arange(L)[None, :] < torch.randint(0, L, (B, 1), generator=g)
buckets = time_interval_buckets_reference(t, None, kpm, K)
"""

RUNS = {
    "materialized": "time_interval_attention_materialized(q, k + pk, v + pv, rk, rv, buckets, kpm, True).sum().backward()",
    "torch": ("time_interval_attention(q, k, v, rk, rv, t, pos_k=pk, pos_v=pv, key_padding_mask=kpm, is_causal=True, "
              "backend='torch').sum().backward()"),
}


def make_inputs(shape):
    scope = {}
    exec(SETUP.format(**shape), scope)
    return scope


def fwd_bwd(impl, scope):
    for name in ("q", "k", "v", "rk", "rv", "pk", "pv"):
        scope[name].grad = None
    exec(RUNS[impl], scope)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{B}-L{L}-d{d}-K{K}".format(**s))
@pytest.mark.parametrize("impl", ["materialized", "torch"])
def test_tisas_cpu_fwd_bwd(benchmark, impl, shape):
    torch.set_num_threads(THREADS)
    benchmark.group = "tisas cpu fwd+bwd B={B} h=1 L={L} d={d} K={K} fp32".format(**shape)
    benchmark.extra_info.update(shape, dtype="float32", impl=impl, baseline=impl == "materialized", threads=THREADS)
    if not benchmark.disabled:
        warm_up = SETUP.format(**dict(shape, B=2)) + "\n" + RUNS[impl] + "\n"
        benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(warm_up + SETUP.format(**shape), RUNS[impl], THREADS)
    scope = make_inputs(shape if not benchmark.disabled else dict(shape, B=2))
    benchmark.pedantic(fwd_bwd, args=(impl, scope), rounds=5, warmup_rounds=1)
