"""RMHA-k with backend="cuda" against the float64 reference: outputs and every gradient, all
mask kinds, odd shapes, dropout, determinism, operator registration. Runs on a GPU, and on the
CPU through the emulation of the kernels (see cuda_target.py)."""

import functools

import contextlib

import pytest
import torch

from cuda_target import Target, ops_namespace, target  # noqa: F401  (fixture)
from fastpe.ops.relative_attention import relative_attention
from helpers import MASK_KINDS, assert_matches_reference, make_masks, randn

NAMES = ["q", "k", "v", "rel_k", "rel_v"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rmha_inputs(device, b, h, lq, lk, dh, dv=None, kmax=4, per_head=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = dh if dv is None else dv

    def t(*shape):
        return randn(*shape, gen=gen, dtype=torch.float64).detach().to(device).requires_grad_()

    tk = (h, 2 * kmax + 1) if per_head else (2 * kmax + 1,)
    return t(b, h, lq, dh), t(b, h, lk, dh), t(b, h, lk, dv), t(*tk, dh), t(*tk, dv)


def masks_on(device, kind, b, h, lq, lk):
    m = make_masks(kind, b, h, lq, lk)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in m.items()}


def op(backend, **kw):
    return functools.partial(_call, backend=backend, **kw)


def _call(q, k, v, rk, rv, **kw):
    return relative_attention(q, k, v, rk, rv, **kw)


def check(target, inputs, dtype, **kw):
    assert_matches_reference(op("cuda", **kw), op("reference", **kw), inputs, dtype, NAMES)


SHAPES = [(2, 2, 1, 8), (3, 1, 7, 30), (2, 3, 50, 50), (2, 2, 75, 90), (1, 2, 130, 16), (1, 2, 200, 32)]


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
@pytest.mark.parametrize("b,h,L,dh", SHAPES)
def test_matches_reference_shapes(target, dtype, b, h, L, dh):
    inputs = rmha_inputs(target.device, b, h, L, L, dh)
    check(target, inputs, dtype, **masks_on(target.device, "padding", b, h, L, L))


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_sequence(target, dtype):
    if target.emulated and dtype != torch.float32:
        pytest.skip("one dtype is enough for the slow emulation")
    b, h, L, dh = (1, 1, 512, 16) if target.emulated else (2, 2, 512, 64)
    inputs = rmha_inputs(target.device, b, h, L, L, dh)
    check(target, inputs, dtype, **masks_on(target.device, "padding+causal", b, h, L, L))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_matches_reference_masks(target, dtype, kind, per_head):
    b, h, L = 3, 2, 13
    inputs = rmha_inputs(target.device, b, h, L, L, 6, kmax=3, per_head=per_head)
    check(target, inputs, dtype, **masks_on(target.device, kind, b, h, L, L))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unequal_lengths_and_value_head_size(target, dtype):
    for lq, lk in ((5, 11), (70, 9)):
        inputs = rmha_inputs(target.device, 2, 2, lq, lk, 12, dv=20)
        check(target, inputs, dtype, **masks_on(target.device, "padding+causal", 2, 2, lq, lk))


@pytest.mark.parametrize("kmax", [0, 1, 20])
def test_clipping_distances(target, kmax):
    inputs = rmha_inputs(target.device, 2, 2, 37, 37, 8, kmax=kmax, per_head=kmax == 1)
    check(target, inputs, torch.float32)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_emulated_thread_orders(target, order, monkeypatch):
    """The emulation runs a block's threads in a configurable order between barriers; a missing
    __syncthreads gives wrong results under some order (checked by removing one)."""
    if not target.emulated:
        pytest.skip("a property of the CPU emulation")
    monkeypatch.setenv("FASTPE_EMU_ORDER", order)
    inputs = rmha_inputs(target.device, 2, 2, 40, 40, 16, per_head=True)
    for dtype in (torch.float32, torch.bfloat16):
        check(target, inputs, dtype, **masks_on(target.device, "padding+causal", 2, 2, 40, 40))


def test_strided_views(target):
    """q, k, v as [B, h, L, dh] views of [B, L, h, dh] projections (no copies in the kernel)."""
    gen = torch.Generator().manual_seed(3)
    b, L, h, dh = 2, 21, 3, 16
    base = [randn(b, L, h, dh, gen=gen, dtype=torch.float64).detach().to(target.device) for _ in range(3)]
    tables = [randn(9, dh, gen=gen, dtype=torch.float64).detach().to(target.device) for _ in range(2)]

    def run(backend, *ts):
        q, k, v = (t.transpose(1, 2) for t in ts[:3])
        return relative_attention(q, k, v, *ts[3:], backend=backend, is_causal=True)

    inputs = [t.requires_grad_() for t in base + tables]
    assert not inputs[0].transpose(1, 2).is_contiguous()
    assert_matches_reference(functools.partial(run, "cuda"), functools.partial(run, "reference"), inputs, torch.bfloat16)


def test_fully_padded_rows_are_zero_with_zero_gradients(target):
    q, k, v, rk, rv = rmha_inputs(target.device, 3, 2, 9, 9, 8)
    kpm = torch.zeros(3, 9, dtype=torch.bool, device=target.device)
    kpm[1] = True
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, rk, rv)]
        out = relative_attention(*leaves, key_padding_mask=kpm, backend="cuda")
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        out.float().square().sum().backward()
        for leaf in leaves:
            assert torch.isfinite(leaf.grad).all()
        assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))
        assert torch.equal(leaves[1].grad[1], torch.zeros_like(leaves[1].grad[1]))


@pytest.mark.parametrize("per_head", [False, True])
def test_table_gradients_over_many_blocks(target, per_head):
    """Hundreds of (batch, head) blocks: the table gradients are summed in segments, then the
    segments in order (the two-pass deterministic reduction)."""
    inputs = rmha_inputs(target.device, 150, 2, 5, 5, 8, per_head=per_head)
    check(target, inputs, torch.float32, **masks_on(target.device, "padding", 150, 2, 5, 5))


@pytest.mark.parametrize("per_head", [False, True])
def test_gradients_are_bitwise_deterministic(target, per_head):
    b, h, L = (4, 2, 40) if target.emulated else (64, 2, 150)
    inputs = rmha_inputs(target.device, b, h, L, L, 32, per_head=per_head)
    masks = masks_on(target.device, "padding", b, h, L, L)
    grad = torch.randn(b, h, L, 32, generator=torch.Generator().manual_seed(2)).to(target.device, torch.bfloat16)
    runs = []
    for _ in range(3):
        leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs]
        torch.manual_seed(11)
        relative_attention(*leaves, backend="cuda", dropout_p=0.1, **masks).backward(grad)
        runs.append([leaf.grad.clone() for leaf in leaves])
    for other in runs[1:]:
        for name, g0, g1 in zip(NAMES, runs[0], other):
            assert torch.equal(g0, g1), f"grad of {name} differs between identical runs"


def test_dropout_is_reproducible_and_seeded_by_torch(target):
    q, k, v, rk, rv = (t.detach().float() for t in rmha_inputs(target.device, 2, 2, 17, 17, 8))
    torch.manual_seed(5)
    a = relative_attention(q, k, v, rk, rv, dropout_p=0.3, backend="cuda")
    torch.manual_seed(5)
    b = relative_attention(q, k, v, rk, rv, dropout_p=0.3, backend="cuda")
    c = relative_attention(q, k, v, rk, rv, dropout_p=0.3, backend="cuda")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, relative_attention(q, k, v, rk, rv, backend="cuda"))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics_and_backward_consistency(target, p):
    """With q = k = 0 and v the identity, out[i, j] = M_ij / ((1-p) L): the output shows the mask.
    dv[j] = sum_i P~_ij dO_i must then be built from the same mask."""
    b, h, L = 2, 2, 64
    dev = target.device
    q = torch.zeros(b, h, L, L, device=dev)
    v = torch.eye(L, device=dev).expand(b, h, L, L).clone().requires_grad_()
    zeros = torch.zeros(9, L, device=dev)
    torch.manual_seed(7)
    out = relative_attention(q, q, v, zeros, zeros, dropout_p=p, backend="cuda")
    mask = out * ((1 - p) * L)
    kept = mask.round()
    torch.testing.assert_close(mask, kept, atol=1e-4, rtol=0)
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    frac = kept.mean().item()
    assert abs(frac - (1 - p)) < 4 * (p * (1 - p) / kept.numel()) ** 0.5 + 1e-3, f"kept {frac}, expected {1 - p}"
    grad = torch.randn(b, h, L, L, generator=torch.Generator().manual_seed(1)).to(dev)
    out.backward(grad)
    expected_dv = (kept / ((1 - p) * L)).transpose(-1, -2) @ grad
    torch.testing.assert_close(v.grad, expected_dv, atol=1e-5, rtol=1e-5)


def test_dropout_forward_and_backward_agree_gradcheck(target):
    """Reseeding before every call makes the op a fixed function; float64 gradcheck then checks
    that the backward regenerates exactly the forward's mask."""
    q, k, v, rk, rv = rmha_inputs(target.device, 1, 2, 5, 5, 3, kmax=2)
    masks = masks_on(target.device, "padding", 1, 2, 5, 5)

    def fn(*t):
        torch.manual_seed(123)
        return relative_attention(*t, dropout_p=0.4, backend="cuda", **masks)

    assert torch.autograd.gradcheck(fn, (q, k, v, rk, rv))


def test_opcheck(target):
    ops = ops_namespace(target)
    q, k, v, rk, rv = (t.detach().float() for t in rmha_inputs(target.device, 2, 2, 11, 11, 8, per_head=True))
    kpm = masks_on(target.device, "padding", 2, 2, 11, 11)["key_padding_mask"]
    for t in (q, k, v, rk, rv):
        t.requires_grad_()
    torch.library.opcheck(ops.relative_attention_fwd.default, (q, k, v, rk, rv, kpm, None, True, 0.0, 0.3))
    bias = torch.randn(2, 1, 11, 11, device=target.device)
    out, lse, rng = ops.relative_attention_fwd(q, k, v, rk, rv, None, bias, False, 0.0, 0.3)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), rk.detach(), rv.detach(), None, bias,
            out.detach(), lse.detach(), rng, False, 0.0, 0.3)
    torch.library.opcheck(ops.relative_attention_bwd.default, args)


def test_float_mask_requiring_grad_is_rejected(target):
    q, k, v, rk, rv = rmha_inputs(target.device, 1, 1, 4, 4, 4)
    bias = torch.zeros(4, 4, device=target.device, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        relative_attention(q, k, v, rk, rv, attn_mask=bias, backend="cuda")


def test_double_backward_says_it_is_unsupported(target):
    q, k, v, rk, rv = rmha_inputs(target.device, 1, 1, 4, 4, 4)
    out = relative_attention(q, k, v, rk, rv, backend="cuda")
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


@pytest.mark.gpu
def test_cuda_graph_replays_draw_fresh_dropout_masks_seeded_by_torch():
    """Dropout inside a captured CUDA graph reads its Philox seed and offset on the device, so each
    replay draws a new mask and torch.manual_seed before a replay reproduces it."""
    q, k, v, rk, rv = (t.detach().float() for t in rmha_inputs(torch.device("cuda"), 4, 2, 33, 33, 16))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            relative_attention(q, k, v, rk, rv, dropout_p=0.3, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = relative_attention(q, k, v, rk, rv, dropout_p=0.3, backend="cuda")
    results = []
    for seed in (1, 1, None):
        if seed is not None:
            torch.manual_seed(seed)
        graph.replay()
        results.append(out.clone())
    assert torch.isfinite(results[0]).all()
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[1], results[2])


def _dropout_mask(target, b, h, lq, lk, kpm, p, seed):
    """The keep mask M the kernels draw for this seed and shape (it depends on nothing else): with
    q = k = 0 and v the identity, out[i, j] = M_ij / ((1-p) n_i), n_i the row's allowed keys."""
    dev = target.device
    zeros_q = torch.zeros(b, h, lq, 8, device=dev)
    zeros_k = torch.zeros(b, h, lk, 8, device=dev)
    eye = torch.eye(lk, device=dev).expand(b, h, lk, lk).contiguous()
    torch.manual_seed(seed)
    out = relative_attention(zeros_q, zeros_k, eye, torch.zeros(9, 8, device=dev), torch.zeros(9, lk, device=dev),
                             key_padding_mask=kpm, dropout_p=p, backend="cuda")
    allowed = (~kpm).sum(-1).double()[:, None, None, None] if kpm is not None else torch.full((1, 1, 1, 1), float(lk))
    return (out.double() * (1 - p) * allowed.to(dev)).round()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_gradients_match_a_reference_with_the_same_mask(target, dtype):
    """Every gradient (dq, dk, dv and the tables, computed by both backward roles) against the
    float64 reference applying the forward's own mask: forward and backward draw the same one."""
    b, h, L, p, seed = 3, 2, 45, 0.3, 21
    masks = masks_on(target.device, "padding", b, h, L, L)
    kpm = masks["key_padding_mask"]
    mask = _dropout_mask(target, b, h, L, L, kpm, p, seed)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    inputs = rmha_inputs(target.device, b, h, L, L, 16)

    def fused(*t):
        torch.manual_seed(seed)
        return relative_attention(*t, key_padding_mask=kpm, dropout_p=p, backend="cuda")

    def reference(q, k, v, rk, rv):
        from fastpe._masks import relative_buckets
        from fastpe.reference import relative_attention_reference

        _, probs = relative_attention_reference(q, k, v, rk[None], rv[None], kpm, None, False, 0.0, None,
                                                return_weights=True)
        dropped = probs * mask.to(probs.dtype) / (1 - p)
        buckets = relative_buckets(L, L, 4, q.device)
        return dropped @ v + torch.einsum("bhij,ijd->bhid", dropped, rv[buckets])

    assert_matches_reference(fused, reference, inputs, dtype, NAMES)


def test_philox_known_answers(target):
    """The dropout generator is Philox4x32-10: Random123's known-answer vectors (counter, key -> out)."""
    ops = ops_namespace(target)
    cases = [
        ([0, 0, 0, 0, 0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 6, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    out = ops.philox_host(torch.tensor([c for c, _ in cases], dtype=torch.int64))
    assert out.tolist() == [e for _, e in cases]


@pytest.mark.parametrize("b,h,L,dh", [(2, 2, 37, 30), (1, 2, 130, 64)])
def test_tf32_path(target, b, h, L, dh):
    """fp32 inputs with torch.backends.cuda.matmul.allow_tf32: the block GEMMs run on the tensor
    cores in TF32 (10-bit mantissa, fp32 accumulation), within fp16's tolerance of the reference;
    without it (torch's default) they stay exact fp32 FMAs."""
    inputs = rmha_inputs(target.device, b, h, L, L, dh)
    masks = masks_on(target.device, "padding+causal", b, h, L, L)
    leaves = [t.detach().float() for t in inputs]
    exact = relative_attention(*leaves, backend="cuda", **masks)
    with allow_tf32():
        assert not torch.equal(relative_attention(*leaves, backend="cuda", **masks), exact)  # the TF32 path ran
        assert_matches_reference(op("cuda", **masks), op("reference", **masks), inputs, torch.float32, NAMES,
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
