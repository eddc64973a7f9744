"""Time-interval (TiSASRec) attention with backend="cuda" against the float64 reference: outputs
and every gradient (q, k, v, both interval tables, both absolute-position tables), equal
timestamps, gaps beyond K, unsorted timestamps, every mask kind, fully padded rows, odd lengths,
head sizes 30/50/90, K up to 256, dropout, determinism, operator registration. Runs on a GPU, and
on the CPU through the emulation of the kernels (see cuda_target.py); outputs start as NaN
(FASTPE_DEBUG_POISON), so an element the kernels forget to write fails."""

import contextlib

import pytest
import torch

from cuda_target import Target, ops_namespace, target  # noqa: F401  (fixture)
from fastpe._time_steps import personal_time_steps
from fastpe.ops import relative_attention, time_interval_attention
from fastpe.reference import time_interval_attention_reference, time_interval_buckets_reference
from helpers import MASK_KINDS, assert_matches_reference, make_masks, randn

NAMES = ["q", "k", "v", "rel_k", "rel_v", "pos_k", "pos_v"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tisas_inputs(device, b, h, L, dh, span=8, per_head=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(*shape):
        return randn(*shape, gen=gen, dtype=torch.float64).detach().to(device).requires_grad_()

    table = (h, span + 1, dh) if per_head else (span + 1, dh)
    return (t(b, h, L, dh), t(b, h, L, dh), t(b, h, L, dh), t(*table), t(*table),
            t(h if per_head else 1, L, dh), t(h if per_head else 1, L, dh))


def random_times(b, L, seed=0, ties=True, shuffle=False):
    """Unix seconds with gaps from minutes to months (many intervals beyond K in the user's unit),
    some repeated (equal timestamps); in time order unless shuffled."""
    gen = torch.Generator().manual_seed(seed)
    gaps = (torch.rand(b, L, generator=gen, dtype=torch.float64) * 6).exp() * 600
    if ties:
        gaps = gaps.masked_fill(torch.rand(b, L, generator=gen) < 0.2, 0.0)
    times = (1.6e9 + gaps.cumsum(dim=1)).round().long()
    if shuffle:
        times = torch.stack([row[torch.randperm(L, generator=gen)] for row in times])
    return times


def masks_on(device, kind, b, h, L, seed=0):
    m = make_masks(kind, b, h, L, L, seed=seed)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in m.items()}


def op(backend, times, **kw):
    def run(q, k, v, rk, rv, pk, pv):
        return time_interval_attention(q, k, v, rk, rv, times.to(q.device), pos_k=pk, pos_v=pv, backend=backend, **kw)
    return run


def check(inputs, times, dtype, **kw):
    assert_matches_reference(op("cuda", times, **kw), op("reference", times, **kw), inputs, dtype, NAMES)


# (b, h, L, dh, K, per-head tables): odd lengths, head sizes 30/50/90, one head, K = 256 (R = 257:
# the relative arrays span several table chunks), L over several key tiles.
SHAPES = [(2, 1, 1, 8, 8, False), (3, 1, 13, 30, 8, False), (2, 2, 50, 50, 20, True), (2, 1, 37, 90, 256, False),
          (1, 2, 70, 16, 256, True)]


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
@pytest.mark.parametrize("b,h,L,dh,span,per_head", SHAPES)
def test_matches_reference_shapes(target, dtype, b, h, L, dh, span, per_head):
    if target.emulated and dtype == torch.float16 and span == 256:
        pytest.skip("bf16 and fp32 cover K = 256 in the slow emulation")
    if dtype == torch.float64 and span == 256 and dh == 90:
        pytest.skip("float64 at K = 256, dh = 90 needs more shared memory than a GPU has (the op says so)")
    inputs = tisas_inputs(target.device, b, h, L, dh, span=span, per_head=per_head, seed=L)
    times = random_times(b, L, seed=L)
    check(inputs, times, dtype, **masks_on(target.device, "padding+causal", b, h, L, seed=L))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_matches_reference_masks(target, dtype, kind):
    b, h, L = 3, 2, 13
    inputs = tisas_inputs(target.device, b, h, L, 6, span=5, per_head=True)
    check(inputs, random_times(b, L, seed=3), dtype, **masks_on(target.device, kind, b, h, L))


@pytest.mark.parametrize("times_kind", ["equal", "beyond_span", "unsorted", "units"])
def test_timestamps(target, times_kind):
    """Equal timestamps (every bucket 0), gaps far beyond K (every off-diagonal bucket K),
    unsorted timestamps (only |t_i - t_j| counts), a fixed unit instead of the user's."""
    b, h, L, span = 3, 2, 21, 6
    inputs = tisas_inputs(target.device, b, h, L, 16, span=span)
    kw = {}
    if times_kind == "equal":
        times = torch.full((b, L), 1_700_000_000)
    elif times_kind == "beyond_span":
        times = torch.arange(L).repeat(b, 1) * 10**9 + torch.tensor([[0], [1], [2]])
        kw["time_unit"] = 1
    elif times_kind == "unsorted":
        times = random_times(b, L, seed=5, shuffle=True)
    else:
        times, kw["time_unit"] = random_times(b, L, seed=6), 3600.0
    buckets = time_interval_buckets_reference(times, None if "time_unit" not in kw else torch.full((b,), float(kw["time_unit"])),
                                              None, span)
    if times_kind == "equal":
        assert int(buckets.max()) == 0
    if times_kind == "beyond_span":
        assert bool((buckets + torch.eye(L, dtype=torch.long) * span == span).all())
    masks = masks_on(target.device, "padding", b, h, L)
    # With equal timestamps the gradient of rel_k[0] is the sum of every dS row, analytically 0:
    # what is left is the rounding of o in D_i = dO_i . o_i (as in FlashAttention's backward), up
    # to twice the usual tolerance in 16-bit.
    scale = 2.0 if times_kind == "equal" else 1.0
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches_reference(op("cuda", times, **kw, **masks), op("reference", times, **kw, **masks), inputs, dtype,
                                 NAMES, grad_tol_scale=scale)


def test_int32_and_int64_time_steps_agree(target):
    """The kernels read tau as int32 or int64 (differences taken without overflow)."""
    ops = ops_namespace(target)
    b, h, L = 2, 2, 19
    q, k, v, rk, rv, _, _ = (t.detach().float() for t in tisas_inputs(target.device, b, h, L, 8, span=7, per_head=True))
    tau = personal_time_steps(random_times(b, L, seed=8), None, None).to(target.device)
    assert int(tau.max()) < 2**31
    a = ops.time_interval_attention_fwd(q, k, v, rk, rv, tau, None, None, True, 0.0, 0.3)[0]
    c = ops.time_interval_attention_fwd(q, k, v, rk, rv, tau.int(), None, None, True, 0.0, 0.3)[0]
    assert torch.equal(a, c)
    # Extreme int64 steps: |tau_i - tau_j| does not overflow. They give the buckets (0 for equal
    # steps, K for all others) of small steps with the same pattern, hence the same output.
    pattern = torch.tensor([0, 1, 2] * (L // 3) + [0] * (L % 3), device=target.device).repeat(b, 1)
    huge = torch.tensor([-2**62, 2**62, 0], device=target.device)[pattern]
    small = pattern * 1000
    out_huge = ops.time_interval_attention_fwd(q, k, v, rk, rv, huge, None, None, False, 0.0, 0.3)[0]
    out_small = ops.time_interval_attention_fwd(q, k, v, rk, rv, small, None, None, False, 0.0, 0.3)[0]
    assert torch.isfinite(out_huge).all()
    assert torch.equal(out_huge, out_small)


def test_fully_padded_rows_are_zero_with_finite_gradients(target):
    b, h, L = 3, 2, 9
    inputs = tisas_inputs(target.device, b, h, L, 8, span=5)
    kpm = torch.zeros(b, L, dtype=torch.bool, device=target.device)
    kpm[1] = True
    kpm[2, :4] = True
    times = random_times(b, L, seed=2)
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        out = op("cuda", times, key_padding_mask=kpm)(*leaves)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        out.float().square().sum().backward()
        for name, leaf in zip(NAMES, leaves):
            assert torch.isfinite(leaf.grad).all(), name
        assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))


@pytest.mark.parametrize("per_head", [False, True])
def test_table_gradients_over_many_blocks(target, per_head):
    """Hundreds of (batch, head) blocks, each summing the table partials of all its query tiles:
    the reduction over blocks runs in segments, then the segments in order (two passes)."""
    b, h, L = 150, 2, 21
    inputs = tisas_inputs(target.device, b, h, L, 8, span=12, per_head=per_head)
    check(inputs, random_times(b, L, seed=7), torch.float32, **masks_on(target.device, "padding", b, h, L))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_emulated_thread_orders(target, order, monkeypatch):
    """A missing __syncthreads around the per-row walks of the bucket sums shows up under some order."""
    if not target.emulated:
        pytest.skip("a property of the CPU emulation")
    monkeypatch.setenv("FASTPE_EMU_ORDER", order)
    b, h, L = 2, 2, 40
    inputs = tisas_inputs(target.device, b, h, L, 16, span=40, per_head=True)
    check(inputs, random_times(b, L, seed=4), torch.float32, **masks_on(target.device, "padding+causal", b, h, L))


def test_gradients_are_bitwise_deterministic(target):
    b, h, L = (4, 2, 40) if target.emulated else (64, 2, 150)
    inputs = tisas_inputs(target.device, b, h, L, 32, span=256)
    masks = masks_on(target.device, "padding", b, h, L)
    times = random_times(b, L, seed=9)
    grad = torch.randn(b, h, L, 32, generator=torch.Generator().manual_seed(2)).to(target.device, torch.bfloat16)
    runs = []
    for _ in range(3):
        leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs]
        torch.manual_seed(11)
        op("cuda", times, dropout_p=0.1, **masks)(*leaves).backward(grad)
        runs.append([leaf.grad.clone() for leaf in leaves])
    for other in runs[1:]:
        for name, g0, g1 in zip(NAMES, runs[0], other):
            assert torch.equal(g0, g1), f"grad of {name} differs between identical runs"


def _dropout_mask(target, b, h, L, kpm, p, seed):
    """The keep mask of this seed and shape, read off the RMHA kernels (the family shares one Philox
    scheme: the mask depends on the element only): with q = k = 0 and v the identity,
    out[i, j] = M_ij / ((1-p) n_i), n_i the row's allowed keys."""
    dev = target.device
    zeros = torch.zeros(b, h, L, 8, device=dev)
    eye = torch.eye(L, device=dev).expand(b, h, L, L).contiguous()
    torch.manual_seed(seed)
    out = relative_attention(zeros, zeros, eye, torch.zeros(9, 8, device=dev), torch.zeros(9, L, device=dev),
                             key_padding_mask=kpm, dropout_p=p, backend="cuda")
    allowed = (~kpm).sum(-1).double()[:, None, None, None]
    return (out.double() * (1 - p) * allowed.to(dev)).round()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_gradients_match_a_reference_with_the_same_mask(target, dtype):
    """Every gradient against the float64 reference applying the forward's own mask: forward and
    backward (both roles) draw the same one, and it is the RMHA kernels' mask."""
    b, h, L, p, seed, span = 3, 2, 45, 0.3, 21, 30
    kpm = masks_on(target.device, "padding", b, h, L)["key_padding_mask"]
    mask = _dropout_mask(target, b, h, L, kpm, p, seed)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    inputs = tisas_inputs(target.device, b, h, L, 16, span=span)
    times = random_times(b, L, seed=1)
    buckets = time_interval_buckets_reference(times, None, kpm.cpu(), span).to(target.device)

    def fused(*t):
        torch.manual_seed(seed)
        return op("cuda", times, key_padding_mask=kpm, dropout_p=p)(*t)

    def reference(q, k, v, rk, rv, pk, pv):
        k, v = k + pk, v + pv
        _, probs = time_interval_attention_reference(q, k, v, rk[None], rv[None], times.to(q.device), None, kpm,
                                                     return_weights=True)
        dropped = probs * mask.to(probs.dtype) / (1 - p)
        return dropped @ v + torch.einsum("bhij,bijd->bhid", dropped, rv[buckets])

    assert_matches_reference(fused, reference, inputs, dtype, NAMES)


def test_dropout_is_reproducible_and_seeded_by_torch(target):
    q, k, v, rk, rv, pk, pv = (t.detach().float() for t in tisas_inputs(target.device, 2, 2, 17, 8))
    times = random_times(2, 17).to(target.device)

    def run(**kw):
        return time_interval_attention(q, k, v, rk, rv, times, backend="cuda", **kw)

    torch.manual_seed(5)
    a = run(dropout_p=0.3)
    torch.manual_seed(5)
    b = run(dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(dropout_p=0.3))
    assert not torch.allclose(a, run())


def test_opcheck_and_errors(target):
    ops = ops_namespace(target)
    b, h, L = 2, 2, 11
    q, k, v, rk, rv, _, _ = (t.detach().float() for t in tisas_inputs(target.device, b, h, L, 8, span=9, per_head=True))
    kpm = masks_on(target.device, "padding", b, h, L)["key_padding_mask"]
    tau = personal_time_steps(random_times(b, L), None, kpm.cpu()).to(target.device)
    for t in (q, k, v, rk, rv):
        t.requires_grad_()
    torch.library.opcheck(ops.time_interval_attention_fwd.default, (q, k, v, rk, rv, tau, kpm, None, True, 0.0, 0.3))
    out, lse, rng = ops.time_interval_attention_fwd(q, k, v, rk, rv, tau, kpm, None, False, 0.0, 0.3)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), rk.detach(), rv.detach(), tau, kpm, None,
            out.detach(), lse.detach(), rng, False, 0.0, 0.3)
    torch.library.opcheck(ops.time_interval_attention_bwd.default, args)
    with pytest.raises(TypeError, match="tau: expected int64 or int32"):
        ops.time_interval_attention_fwd(q, k, v, rk, rv, tau.float(), None, None, False, 0.0, 0.3)
    with pytest.raises(RuntimeError, match=r"tau: expected shape \[2, 11\]"):
        ops.time_interval_attention_fwd(q, k, v, rk, rv, tau[:, :5], None, None, False, 0.0, 0.3)
    with pytest.raises(RuntimeError, match="self-attention"):
        ops.time_interval_attention_fwd(q, k[:, :, :5], v[:, :, :5], rk, rv, tau, None, None, False, 0.0, 0.3)


def test_tf32_path(target):
    """fp32 with torch.backends.cuda.matmul.allow_tf32: TF32 tensor-core GEMMs (also for the K = 256
    interval tables), within fp16's tolerance; exact fp32 by default."""
    b, h, L, span = 2, 2, 45, 256
    inputs = tisas_inputs(target.device, b, h, L, 30, span=span)
    times = random_times(b, L, seed=12)
    masks = masks_on(target.device, "padding+causal", b, h, L)
    exact = op("cuda", times, **masks)(*[t.detach().float() for t in inputs])
    with allow_tf32():
        assert not torch.equal(op("cuda", times, **masks)(*[t.detach().float() for t in inputs]), exact)
        assert_matches_reference(op("cuda", times, **masks), op("reference", times, **masks), inputs, torch.float32, NAMES,
                                 tol=(5e-3, 5e-3))


@contextlib.contextmanager
def allow_tf32():
    """torch.backends.cuda.matmul.allow_tf32 = True, restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
