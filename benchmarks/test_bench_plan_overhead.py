"""Host (Python) time of one forward+backward call of each Triton op, with the plan cache and
without it, in the same run: the time the ops spend before any kernel starts.

    python3 -m pytest benchmarks/test_bench_plan_overhead.py --benchmark-only

Two groups per op at S1 (B512 h2 L50 dh32, bf16, key padding, dropout 0.1 for attention;
x [B, L, h, dh] for rotary, [B, L, d=64] for rotatory and concat-projection), CPU tensors:

* ``plan``: the forward and backward planners alone (configs, buffers, launch records);
* ``call``: the whole op through autograd (``torch.autograd.grad``), with the kernel launches
  replaced by nothing, so what is timed is everything fastpe does on the host.

``uncached`` sets ``FASTPE_PLAN_CACHE``'s switch off (every call plans); ``cached`` runs with the
cache warm, as every training step after the first does. Results: benchmarks/results/plan_overhead.md.
"""

import pytest
import torch

pytest.importorskip("triton")

from fastpe.kernels import triton as fused  # noqa: E402
from fastpe.kernels.triton import _launch, _ops  # noqa: E402

B, H, L, DH = 512, 2, 50, 32
D = H * DH
DTYPE = torch.bfloat16


def _leaf(*shape, dtype=DTYPE):
    return torch.randn(*shape).to(dtype).requires_grad_()


def rmha_problem():
    q, k, v = (_leaf(B, L, H, DH).transpose(1, 2) for _ in range(3))
    rk, rv = _leaf(1, 9, DH), _leaf(1, 9, DH)
    kpm = torch.arange(L)[None, :] < torch.randint(0, L, (B, 1))
    seed = torch.zeros(1, dtype=torch.int64)
    dropout, scale = 0.1, DH**-0.5

    def plan():
        out, lse, p_sums, _ = _ops._plan_rmha_forward(q, k, v, rk, rv, kpm, None, seed, False, dropout, scale)
        _ops._plan_rmha_backward(out, q, k, v, rk, rv, kpm, None, seed, out, lse, p_sums, False, dropout, scale)

    grad = torch.ones(B, H, L, DH, dtype=DTYPE)

    def call():
        out = fused.relative_attention(q, k, v, rk, rv, kpm, None, False, dropout, None)
        torch.autograd.grad(out, (q, k, v, rk, rv), grad)

    return plan, call


def rotary_problem():
    x, angles = _leaf(B, L, H, DH), _leaf(L, DH // 2)

    def plan():
        y, _ = _ops._plan_rotary_forward(x, angles, None, False)
        _ops._plan_rotary_backward(y, x, angles, None, False, True)

    grad = torch.ones(B, L, H, DH, dtype=DTYPE)

    def call():
        y = fused.rotary(x, angles, None, False)
        torch.autograd.grad(y, (x, angles), grad)

    return plan, call


def rotatory_problem():
    x, angles = _leaf(B, L, D), _leaf(L, D // 2)

    def plan():
        y, _ = _ops._plan_rotatory_forward(x, angles, None)
        _ops._plan_rotatory_backward(y, angles, None)

    grad = torch.ones(B, L, D, dtype=DTYPE)

    def call():
        y = fused.rotatory_add(x, angles, None)
        torch.autograd.grad(y, (x, angles), grad)

    return plan, call


def concat_problem():
    x, table, weight, bias = _leaf(B, L, D), _leaf(L, D), _leaf(D, 2 * D), _leaf(D)

    def plan():
        y, _ = _ops._plan_concat_forward(x, table, weight, bias, None)
        _ops._plan_concat_backward(y, x, table, weight, None, True, True, True, True)

    grad = torch.ones(B, L, D, dtype=DTYPE)

    def call():
        y = fused.concat_projection(x, table, weight, bias, None)
        torch.autograd.grad(y, (x, table, weight, bias), grad)

    return plan, call


PROBLEMS = {"rmha": rmha_problem, "rotary": rotary_problem, "rotatory": rotatory_problem, "concat": concat_problem}


@pytest.mark.parametrize("cache", ["uncached", "cached"])
@pytest.mark.parametrize("what", ["plan", "call"])
@pytest.mark.parametrize("op", sorted(PROBLEMS))
def test_host_overhead(benchmark, monkeypatch, op, what, cache):
    monkeypatch.setattr(_launch, "run", lambda launches: None)  # host side only: launch nothing
    monkeypatch.setattr(_launch, "PLAN_CACHE", cache == "cached")
    for plan_cache in _ops.PLAN_CACHES:
        plan_cache.clear()
    fn = dict(zip(("plan", "call"), PROBLEMS[op]()))[what]
    fn()  # warm: the first call plans (and fills the cache when it is on)
    caches = _ops.PLAN_CACHES
    misses = sum(c.misses for c in caches)
    benchmark.group = f"host overhead {op} {what} fwd+bwd S1 bf16"
    benchmark.extra_info.update(op=op, what=what, impl=cache, baseline=cache == "uncached",
                                shape=dict(B=B, h=H, L=L, dh=DH), dtype="bf16")
    benchmark(fn)
    if cache == "cached":
        assert sum(c.misses for c in caches) == misses, "a repeated call shape was planned again"
        assert sum(c.hits for c in caches) > 0
    else:
        assert sum(c.hits for c in caches) == 0
