"""The plan cache: a repeated call shape reuses its plan, and a cached plan is the plan the
planner itself would make for the new tensors (same kernels, grids, constants and scalars; the
new tensors or views of them; fresh buffers of the same layout), holding no tensor itself."""

import gc
import weakref

import pytest
import torch

pytest.importorskip("triton")

from fastpe.kernels.triton import _launch  # noqa: E402
from fastpe.kernels.triton import concat, interval, rmha, rotations  # noqa: E402


def rmha_args(b=3, h=2, length=21, dh=30, dropout=0.1):
    qkv = torch.randn(b, length, 3 * h * dh).chunk(3, dim=-1)
    q, k, v = (t.view(b, length, h, dh).transpose(1, 2) for t in qkv)
    rk, rv = torch.randn(1, 9, dh), torch.randn(1, 9, dh)
    kpm = torch.rand(b, length) < 0.3
    seed = torch.zeros(1, dtype=torch.int64)
    return (q, k, v, rk, rv, kpm, None, seed, False, dropout, 0.2)


def rmha_bwd_args(b=3, h=2, length=21, dh=30):
    q, k, v, rk, rv, kpm, bias, seed, causal, p, scale = rmha_args(b, h, length, dh)
    out, lse, p_sums = torch.randn(b, h, length, dh), torch.randn(b, h, length), torch.rand(b, h, length)
    dout = torch.randn(b, length, h, dh).transpose(1, 2)
    return (dout, q, k, v, rk, rv, kpm, bias, seed, out, lse, p_sums, causal, p, scale)


def tisas_args():
    q, k, v, _rk, _rv, kpm, bias, seed, causal, p, scale = rmha_args()
    rk, rv = torch.randn(1, 257, 30), torch.randn(1, 257, 30)
    tau = torch.randint(0, 500, (3, 21), dtype=torch.int32)
    return (q, k, v, rk, rv, tau, kpm, bias, seed, causal, p, scale)


def tisas_bwd_args():
    q, k, v, rk, rv, tau, kpm, bias, seed, causal, p, scale = tisas_args()
    out, lse = torch.randn(3, 2, 21, 30), torch.randn(3, 2, 21)
    dout = torch.randn(3, 21, 2, 30).transpose(1, 2)
    return (dout, q, k, v, rk, rv, tau, kpm, bias, seed, out, lse, causal, p, scale)


def rotary_args():
    x = torch.randn(2, 13, 3 * 2 * 16).chunk(3, dim=-1)[0].view(2, 13, 2, 16)
    return (x, torch.randn(13, 8), None, False)


def rotary_bwd_args():
    x, angles, pos, inter = rotary_args()
    return (torch.randn(2, 13, 2, 16), x, angles, pos, inter, True)


def rotatory_args():
    return (torch.randn(2, 13, 24), torch.randn(13, 12), torch.randint(0, 13, (2, 13)))


def concat_args():
    return (torch.randn(2, 13, 24), torch.randn(15, 8), torch.randn(20, 32), torch.randn(20), None)


def concat_bwd_args():
    return (torch.randn(2, 13, 20), torch.randn(2, 13, 24), torch.randn(15, 8), torch.randn(20, 32), None, True)


PLANNERS = {
    "rmha_fwd": (rmha, "plan_forward", rmha_args),
    "rmha_bwd": (rmha, "plan_backward", rmha_bwd_args),
    "tisas_fwd": (interval, "plan_forward", tisas_args),
    "tisas_bwd": (interval, "plan_backward", tisas_bwd_args),
    "rotary_fwd": (rotations, "plan_rotary_forward", rotary_args),
    "rotary_bwd": (rotations, "plan_rotary_backward", rotary_bwd_args),
    "rotatory_fwd": (rotations, "plan_rotatory_forward", lambda: rotatory_args()),
    "rotatory_bwd": (rotations, "plan_rotatory_backward", lambda: (torch.randn(2, 13, 24), *rotatory_args()[1:])),
    "concat_fwd": (concat, "plan_forward", concat_args),
    "concat_bwd": (concat, "plan_backward", concat_bwd_args),
}


def canonical(result, args):
    """The result with every tensor described by its layout and origin: the data pointer when it
    lies in an argument's storage, else which buffer (in order of appearance) and where in it."""
    arg_storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    buffers = {}

    def describe(t):
        if not isinstance(t, torch.Tensor):
            return t
        storage = t.untyped_storage().data_ptr()
        if storage in arg_storages:
            origin = ("arg", t.data_ptr())
        else:
            origin = ("buffer", buffers.setdefault(storage, len(buffers)), t.data_ptr() - storage)
        return (tuple(t.shape), t.stride(), t.dtype, origin)

    *outputs, launches = result
    return [describe(t) for t in outputs] + [
        (launch.kernel.__name__, launch.grid, {k: describe(v) for k, v in launch.args.items()},
         launch.constexprs, launch.num_warps, launch.num_stages)
        for launch in launches
    ]


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_a_cached_plan_is_the_planners_plan_for_the_new_tensors(name):
    module, attr, make_args = PLANNERS[name]
    planner = getattr(module, attr)
    plan = _launch.cached(module, attr)
    first_args = make_args()
    first = plan(*first_args)
    assert (plan.misses, plan.hits) == (1, 0)
    args = make_args()  # same shapes, new tensors
    hit = plan(*args)
    assert (plan.misses, plan.hits) == (1, 1), "the repeated call shape was planned again"
    assert canonical(hit, args) == canonical(planner(*args), args)
    # fresh buffers: nothing of the first call's result is handed out again
    first_ptrs = {t.data_ptr() for t in first[:-1] if isinstance(t, torch.Tensor)}
    assert not first_ptrs & {t.data_ptr() for t in hit[:-1] if isinstance(t, torch.Tensor)}


def test_the_key_follows_shapes_strides_flags_and_config_overrides():
    plan = _launch.cached(rmha, "plan_forward")
    plan(*rmha_args())
    plan(*rmha_args(length=22))  # another shape
    args = list(rmha_args())
    args[9] = 0.0  # no dropout
    plan(*args)
    args = list(rmha_args())
    args[0] = args[0].contiguous()  # other strides
    plan(*args)
    with _launch.override("rmha_fwd", block_m=16, block_n=16):
        forced = plan(*rmha_args())
    assert plan.misses == 5 and plan.hits == 0
    assert forced[-1][0].constexprs["BLOCK_N"] == 16
    plan(*rmha_args())
    assert plan.hits == 1


def test_aliased_arguments_are_part_of_the_key():
    """q is k in one call and not in the next: the second must not reuse the first's mapping."""
    plan = _launch.cached(rmha, "plan_forward")
    q, k, v, *rest = rmha_args()
    plan(q, q, v, *rest)
    result = plan(q, k, v, *rest)
    assert plan.misses == 2
    assert result[-1][0].args["K"] is k


def test_a_plan_that_copies_an_argument_is_replanned_not_reused():
    """concat flattens x with reshape, which copies a non-viewable x: such a plan cannot be a
    template, so each call runs the planner (and still gets its copy of the new x)."""
    plan = _launch.cached(concat, "plan_forward")
    make = lambda: (torch.randn(13, 2, 24).transpose(0, 1), *concat_args()[1:])  # noqa: E731
    plan(*make())
    args = make()
    result = plan(*args)
    assert plan.hits == 0 and plan.misses == 2
    assert canonical(result, args) == canonical(concat.plan_forward(*args), args)


def test_the_cache_keeps_no_tensor_alive():
    plan = _launch.cached(rmha, "plan_backward")
    args = rmha_bwd_args()
    refs = [weakref.ref(a) for a in args if isinstance(a, torch.Tensor)]
    result = plan(*args)
    refs += [weakref.ref(t) for t in result[:-1]]
    plan(*args)
    del args, result
    gc.collect()
    assert all(r() is None for r in refs)


def test_cached_buffers_are_poisoned_like_fresh_ones(monkeypatch):
    monkeypatch.setattr(_launch, "POISON", True)
    plan = _launch.cached(rmha, "plan_forward")
    plan(*rmha_args())
    out, lse, p_sums, _launches = plan(*rmha_args())
    assert plan.hits == 1 and out.isnan().all() and lse.isnan().all() and p_sums.isnan().all()


def test_the_switch_turns_the_cache_off(monkeypatch):
    monkeypatch.setattr(_launch, "PLAN_CACHE", False)
    plan = _launch.cached(rmha, "plan_forward")
    plan(*rmha_args())
    plan(*rmha_args())
    assert plan.hits == plan.misses == 0


def test_a_replaced_planner_takes_effect_at_once(monkeypatch):
    plan = _launch.cached(rmha, "plan_forward")
    plan(*rmha_args())
    real = rmha.plan_forward

    def shorter(q, *args):
        *outputs, launches = real(q, *args)
        launches[0].args["LQ"] = 1
        return *outputs, launches

    monkeypatch.setattr(rmha, "plan_forward", shorter)
    assert plan(*rmha_args())[-1][0].args["LQ"] == 1
    monkeypatch.undo()
    assert plan(*rmha_args())[-1][0].args["LQ"] == 21


def _op_runs():
    """(name, run(seed) -> output and gradients of one forward+backward on fresh inputs, backend)."""
    from fastpe import ops

    def inputs(seed, *shapes):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*s, generator=g, dtype=torch.float64).float().requires_grad_() for s in shapes]

    def rmha_run(seed, backend):
        q, k, v, rk, rv = inputs(seed, (2, 2, 13, 16), (2, 2, 13, 16), (2, 2, 13, 16), (1, 9, 16), (1, 9, 16))
        kpm = torch.arange(13)[None, :] >= torch.tensor([[13], [9]])
        return ops.relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend=backend), (q, k, v, rk, rv)

    def tisas_run(seed, backend):
        q, k, v, rk, rv = inputs(seed, (2, 1, 13, 16), (2, 1, 13, 16), (2, 1, 13, 16), (1, 257, 16), (1, 257, 16))
        kpm = torch.arange(13)[None, :] < torch.tensor([[0], [4]])
        t = torch.randint(0, 10**6, (2, 13), generator=torch.Generator().manual_seed(seed))
        out = ops.time_interval_attention(q, k, v, rk, rv, t, key_padding_mask=kpm, backend=backend)
        return out, (q, k, v, rk, rv)

    def rotary_run(seed, backend):
        x, angles = inputs(seed, (2, 13, 2, 16), (13, 8))
        return ops.rotary(x, angles, backend=backend), (x, angles)

    def rotatory_run(seed, backend):
        x, angles = inputs(seed, (2, 13, 16), (13, 8))
        return ops.rotatory(x, angles, backend=backend), (x, angles)

    def concat_run(seed, backend):
        x, table, weight, bias = inputs(seed, (2, 13, 16), (13, 16), (16, 32), (16,))
        return ops.concat_projection(x, table, weight, bias, backend=backend), (x, table, weight, bias)

    return {"rmha": rmha_run, "tisas": tisas_run, "rotary": rotary_run, "rotatory": rotatory_run, "concat": concat_run}


@pytest.mark.parametrize("op", ["rmha", "tisas", "rotary", "rotatory", "concat"])
def test_ops_reuse_their_plans_and_stay_correct(op):
    """A repeated call shape of every Triton op plans nothing; its results (fresh inputs through
    the cached plan) match the torch backend, outputs and every gradient."""
    from fastpe.kernels.triton import _ops

    run = _op_runs()[op]
    for cache in _ops.PLAN_CACHES:
        cache.clear()
    for seed in range(2):
        out, leaves = run(seed, "triton")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        ref_out, ref_leaves = run(seed, "torch")
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, torch.ones_like(ref_out))
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
        misses = sum(c.misses for c in _ops.PLAN_CACHES)
        hits = sum(c.hits for c in _ops.PLAN_CACHES)
        assert (misses, hits) == ((2, 0) if seed == 0 else (2, 2)), "forward and backward planned once, then reused"


def test_a_plan_that_writes_into_its_buffers_is_replanned_not_reused(monkeypatch):
    """A planner that zeroes a buffer (for a kernel that accumulates into it) cannot be replayed
    by allocating an empty one: the cache must call it again."""
    real = rmha.plan_forward

    def zeroing(*args):
        out, lse, p_sums, launches = real(*args)
        lse.zero_()
        return out, lse, p_sums, launches

    monkeypatch.setattr(rmha, "plan_forward", zeroing)
    plan = _launch.cached(rmha, "plan_forward")
    plan(*rmha_args())
    _out, lse, _p_sums, _launches = plan(*rmha_args())
    assert plan.hits == 0 and plan.misses == 2
    assert (lse == 0).all()


def test_plans_are_cached_in_inference_mode():
    plan = _launch.cached(rmha, "plan_backward")
    with torch.inference_mode():
        args = rmha_bwd_args()
        plan(*args)
        args = rmha_bwd_args()
        hit = plan(*args)
        assert plan.hits == 1 and canonical(hit, args) == canonical(rmha.plan_backward(*args), args)


def test_the_key_follows_address_alignment():
    """The relative-attention planners hint the kernels with the rows' alignment (from addresses and
    strides): the same shapes and strides at an address of another alignment must not reuse a plan."""
    plan = _launch.cached(rmha, "plan_forward")
    shifted = list(rmha_args(dh=32))
    aligned = list(rmha_args(dh=32))
    aligned[0] = torch.randn(3, 2, 21, 32)
    shifted[0] = torch.randn(aligned[0].numel() + 1)[1:].view(aligned[0].shape)  # one float in: 4-byte aligned
    assert shifted[0].stride() == aligned[0].stride() and shifted[0].data_ptr() % 16 != 0
    first = plan(*aligned)[-1][0].constexprs["ALIGN"]
    second = plan(*shifted)[-1][0].constexprs["ALIGN"]
    assert plan.misses == 2 and plan.hits == 0
    assert (first, second) == (16, 4)
