"""Time-interval (TiSASRec) attention, triton backend: the output and all five gradients against
the float64 reference written from the formula.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), where every program
instance costs milliseconds: shapes stay small, and the multi-block paths (two-pass forward over
several key blocks, several query blocks per sequence, skipped padding blocks) are reached by
forcing 16-wide blocks. The interpreter's bf16 tl.dot is wrong (an upstream bug), so these tests
use fp32 and fp16; test_ptx_emulation runs bf16 with that dot fixed (``interpreter_bf16``), and the
tests marked gpu on the hardware.
"""

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastpe._masks import combined_bias, masked_softmax  # noqa: E402
from fastpe.kernels.triton.interval import _ceil_log2  # noqa: E402
from fastpe.kernels.triton.rmha import dropout_rate  # noqa: E402
from fastpe.ops import time_interval_attention  # noqa: E402
from fastpe.ops.relative_attention import personal_time_steps, time_interval_buckets  # noqa: E402
from fastpe.reference import time_interval_buckets_reference  # noqa: E402
from helpers import TOLERANCES, assert_matches_reference, make_masks, randn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["q", "k", "v", "rel_k", "rel_v"]


def launch_cfg():
    from fastpe.kernels.triton import _launch

    return _launch


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels get starts as NaN (int: -(2**31 - 1)), outputs and scratch slots
    alike: an element left unwritten, or a table column read before it is written, shows."""
    monkeypatch.setattr(launch_cfg(), "POISON", True)


def inputs(b, h, L, dh, span, per_head=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn(b, h, L, dh, gen=gen, dtype=torch.float64) for _ in range(3))
    table = (h, span + 1, dh) if per_head else (span + 1, dh)
    rk, rv = (randn(*table, gen=gen, dtype=torch.float64) for _ in range(2))
    return [t.detach().to(DEVICE).requires_grad_() for t in (q, k, v, rk, rv)]


def times(b, L, kind, span, seed=0):
    """Timestamps [B, L]: "mixed" has equal times, gaps inside and far beyond the span, in time
    order; "unsorted" is that shuffled per row; "equal" is one time per row."""
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, span // 2 + 2, (b, L), generator=gen)
    gaps = torch.where(torch.rand(b, L, generator=gen) < 0.2, 0, gaps)  # equal timestamps
    gaps = torch.where(torch.rand(b, L, generator=gen) < 0.15, 10**6, gaps)  # far beyond the span
    t = 1_600_000_000 + gaps.cumsum(dim=1)
    if kind == "unsorted":
        t = torch.gather(t, 1, torch.argsort(torch.rand(b, L, generator=gen), dim=1))
    elif kind == "equal":
        t = torch.full((b, L), 1_600_000_000)
    return t.to(DEVICE)


def op(backend, t, **kw):
    def run(q, k, v, rk, rv):
        return time_interval_attention(q, k, v, rk, rv, t, backend=backend, **kw)
    return run


def masks_on_device(kind, b, h, L, seed=0):
    masks = make_masks(kind, b, h, L, L, seed=seed)
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in masks.items()}


def check(b, h, L, dh, span, kind="padding", dtype=torch.float32, t_kind="mixed", per_head=False, seed=0, **kw):
    masks = masks_on_device(kind, b, h, L, seed)
    t = times(b, L, t_kind, span, seed)
    assert_matches_reference(op("triton", t, **masks, **kw), op("reference", t, **masks, **kw),
                             inputs(b, h, L, dh, span, per_head, seed), dtype, NAMES)


# --------------------------------------------------------------------------------------------
# shapes, dtypes, timestamps, masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,h,L,dh,span,per_head", [(2, 2, 13, 30, 256, False), (2, 1, 20, 50, 8, True),
                                                    (1, 2, 9, 90, 40, True), (3, 1, 1, 8, 256, False)])
def test_matches_reference_shapes(dtype, b, h, L, dh, span, per_head):
    """Head sizes 30/50/90, one head, L = 1, K = 256 (the default) and small spans, left padding."""
    check(b, h, L, dh, span, "padding+causal", dtype, per_head=per_head, seed=L)


@pytest.mark.parametrize("t_kind,kind", [("mixed", "padding"), ("unsorted", "none"), ("equal", "causal"),
                                         ("unsorted", "fully_padded"), ("mixed", "padding+causal")])
def test_timestamps_and_masks(t_kind, kind):
    """Equal timestamps, gaps beyond K, times in any order; with and without padding and causal
    masking, and a fully padded sequence (output 0, finite gradients)."""
    check(3, 2, 11, 16, 12, kind, t_kind=t_kind, per_head=True, seed=3)


@pytest.mark.parametrize("kind", ["float_bias", "bool_3d", "float_padding"])
def test_attention_masks_and_bias(kind):
    check(2, 2, 10, 8, 6, kind, seed=4)


@pytest.mark.parametrize("k_per_head", [True, False])
def test_tables_shared_differently_and_another_value_head_size(k_per_head):
    """One interval table per head for keys and one for all heads for values (or the other way
    round), values of head size 24 against keys of 16: the gradients keep the tables' shapes."""
    gen = torch.Generator().manual_seed(13)
    b, h, L, span = 2, 3, 9, 12
    q, k = (randn(b, h, L, 16, gen=gen, dtype=torch.float64) for _ in range(2))
    v = randn(b, h, L, 24, gen=gen, dtype=torch.float64)
    rk = randn(*((h, span + 1, 16) if k_per_head else (span + 1, 16)), gen=gen, dtype=torch.float64)
    rv = randn(*((span + 1, 24) if k_per_head else (h, span + 1, 24)), gen=gen, dtype=torch.float64)
    t = times(b, L, "mixed", span, seed=13)
    kpm = make_masks("padding", b, h, L, L, seed=13)["key_padding_mask"].to(DEVICE)
    leaves = [x.detach().to(DEVICE).requires_grad_() for x in (q, k, v, rk, rv)]
    assert_matches_reference(op("triton", t, key_padding_mask=kpm), op("reference", t, key_padding_mask=kpm), leaves,
                             torch.float32, NAMES)


def test_time_unit_and_scale():
    check(2, 1, 12, 16, 9, "padding", time_unit=7.0, scale=0.3, seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["padding", "padding+causal"])
@pytest.mark.parametrize("key_bits", [0, 1])
def test_several_key_and_query_blocks(dtype, kind, key_bits, monkeypatch):
    """16-wide blocks over 40 positions: the forward's two passes (row statistics, then the
    normalised sums), several query blocks per sequence in the backward, tables in 16-bucket
    chunks (a query block builds and reads back only the chunks its elements use; a program's
    next block must find the others clear). The backward reads each tile's padding from the mask
    or (``key_bits``) from bits packed once per sequence. Outputs start as NaN."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    blocks = dict(block_m=16, block_n=16, table_chunk=16)
    with cfg.override("tisas_fwd", **blocks), cfg.override("tisas_bwd", **blocks, key_bits=key_bits):
        check(2, 1, 40, 16, 30, kind, dtype, seed=6)


@pytest.mark.parametrize("dh,dtype", [(30, torch.float32), (90, torch.float16)])
def test_one_key_block_backward_over_several_query_blocks(dh, dtype, monkeypatch):
    """L = 45 with the default blocks: the backward holds dk, dv of the sequence in registers (one
    key block) while it walks two or three query blocks; NaN-filled buffers, fully padded rows."""
    from fastpe.kernels.triton import interval

    cfg = interval.bwd_config(2, 1, 45, dh, dh, DEVICE)
    assert cfg["block_n"] >= 45 > cfg["block_m"]
    monkeypatch.setattr(launch_cfg(), "POISON", True)
    check(2, 1, 45, dh, 256, "fully_padded", dtype, seed=14)


def test_one_key_block_backward_with_dropout():
    b, h, L, p = 2, 1, 45, 0.2
    kpm = make_masks("padding", b, h, L, L, seed=15)["key_padding_mask"].to(DEVICE)
    t = times(b, L, "mixed", 16, seed=15)
    keep = _keep_mask(15, b, h, L, p, t, key_padding_mask=kpm)

    def kernel(*x):
        torch.manual_seed(15)
        return time_interval_attention(*x, t, dropout_p=p, backend="triton", key_padding_mask=kpm)

    def reference(*x):
        return _reference_with_keep(*x, t, keep=keep.double(), p=p, key_padding_mask=kpm)

    assert_matches_reference(kernel, reference, inputs(b, h, L, 16, 16, seed=15), torch.float32, NAMES)


@pytest.mark.parametrize("dh,dtype", [(90, torch.float32), (128, torch.float16)])
def test_wide_heads_take_one_key_block_of_up_to_128_keys(dh, dtype, monkeypatch):
    """Head sizes 65-128 with 64 < L <= 128: the forward's one 128-key block with 16-row query
    blocks (five of them at L = 75), NaN-filled buffers, left padding and a fully padded row."""
    from fastpe.kernels.triton import interval

    cfg = interval.fwd_config(2, 1, 75, dh, dh, DEVICE)
    assert (cfg["block_n"], cfg["block_m"]) == (128, 16)
    monkeypatch.setattr(launch_cfg(), "POISON", True)
    check(2, 1, 75, dh, 256, "fully_padded", dtype, seed=17)


def test_inline_ptx_only_for_compiled_kernels(monkeypatch):
    """The gathers and bucket-sum reductions as inline PTX (``_gather``, ``_red_add``; also the
    backward's accumulator rows, ``_dot_add_rows``, and the forward's approximate ``_log2``): never
    under the interpreter (no inline assembly; these tests run ``tl.load`` / ``tl.atomic_add`` /
    ``tl.log2``: the same values, the log2 to within about 2**-22), on for a CUDA card and for the
    sm_90a card planned without a GPU. ``test_ptx_emulation`` runs the PTX form under an emulation of
    its instructions, the GPU tests (``pytest -m gpu``) on the hardware. The
    backward's dq, dk, dv rows that are not 16-byte aligned (a head size of 90) are stored in column
    pairs with ``cvt.rn.bf16x2.f32`` too (rmha ``_store_rows``): ``CVT_ASM``, sm_80 and later."""
    from fastpe.kernels.triton import _launch, interval

    q = torch.zeros(2, 1, 21, 16)
    tau = torch.zeros(2, 21, dtype=torch.int32)
    rk = torch.zeros(1, 257, 16)
    out, lse, *_, (launch,) = interval.plan_forward(q, q, q, rk, rk, tau, None, None, None, False, 0.0, 0.25)
    assert launch.constexprs["PTX"] is _launch.inline_ptx(q.device)
    *_, (main, _reduction) = interval.plan_backward(out, q, q, q, rk, rk, tau, None, None, None, out, lse, False, 0.0,
                                                   0.25)
    assert main.constexprs["PTX"] is _launch.inline_ptx(q.device)
    assert main.constexprs["CVT_ASM"] is _launch.packed_cvt(q.device)
    monkeypatch.setattr(_launch, "triton_interpreter_enabled", lambda: True)
    assert not _launch.inline_ptx(torch.device("cpu"))
    assert not _launch.inline_ptx(torch.device("cuda", 0))
    monkeypatch.setattr(_launch, "triton_interpreter_enabled", lambda: False)
    assert _launch.inline_ptx(torch.device("cpu"))
    assert _launch.inline_ptx(torch.device("cuda", 0))


@pytest.mark.parametrize("dh,align", [(64, 16), (90, 4)])
def test_kernels_are_told_the_row_alignment(dh, align):
    """Head rows of 90 bf16 elements are 4-byte aligned: the planners say so (the compiled kernels
    load them as 32-bit words instead of one element at a time; the interpreter ignores the hint,
    so only the planners' numbers can be checked here)."""
    from fastpe.kernels.triton import interval

    b, h, L = 2, 2, 21
    q = torch.zeros(b, h, L, dh, dtype=torch.bfloat16)
    tau = torch.zeros(b, L, dtype=torch.int32)
    rk = torch.zeros(1, 257, dh, dtype=torch.bfloat16)
    out, lse, (fwd,) = interval.plan_forward(q, q, q, rk, rk, tau, None, None, None, False, 0.0, 0.1)
    assert fwd.constexprs["ALIGN"] == align
    *_, launches = interval.plan_backward(out, q, q, q, rk, rk, tau, None, None, None, out, lse, False, 0.0, 0.1)
    assert launches[0].constexprs["ALIGN"] == align


def test_rows_past_the_sequence_leave_the_scratch_clear():
    """A program's query block reads back (and clears) only the table chunks its valid elements
    use. Rows past the end of a partial block must add nothing: here the last block of sequence 0
    uses bucket 0 only, its rows past the end (time step 0) would add to bucket 20 (chunk 1), and
    the same program's next block (sequence 1, positions 16-31) reads chunk 1 back."""
    L, span = 40, 30
    t = 31 * torch.arange(L).repeat(2, 1)
    t[0, 1] = 20  # a pair 20 apart at positions 0, 1; every other pair 0 or > 30 apart
    t[1, 25] = t[1, 24] + 20  # positions 24, 25: bucket 20 in sequence 1's second block
    cfg = launch_cfg()
    blocks = dict(block_m=16, block_n=16, table_chunk=16, programs=2)
    with cfg.override("tisas_fwd", **blocks), cfg.override("tisas_bwd", **blocks):
        t = t.to(DEVICE)
        assert_matches_reference(op("triton", t, time_unit=1.0), op("reference", t, time_unit=1.0),
                                 inputs(2, 1, L, 16, span, seed=12), torch.float32, NAMES)


@pytest.mark.parametrize("one_key_block", [True, False])
def test_table_chunks_cover_every_bucket_a_block_uses(one_key_block, monkeypatch):
    """Time steps 7 apart (buckets 0, 7, 14, 21, 28 and the clip, K = 30) in 16-bucket chunks:
    every query block's elements use both chunks, from a block range the kernels bound by the
    time steps of its rows and keys. A chunk left out is never built (NaN-filled scratch) and its
    sums never read back. Also with one 64-key block (the forward's single-pass path, the
    backward's dk, dv in registers)."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    L, span = 40, 30
    t = (7 * torch.arange(L)).repeat(2, 1)
    blocks = dict(block_m=16, block_n=64 if one_key_block else 16, table_chunk=16)
    with cfg.override("tisas_fwd", **blocks), cfg.override("tisas_bwd", **blocks):
        t = t.to(DEVICE)
        assert_matches_reference(op("triton", t, time_unit=1.0), op("reference", t, time_unit=1.0),
                                 inputs(2, 1, L, 16, span, seed=18), torch.float32, NAMES)


@pytest.mark.parametrize("one_key_block", [True, False])
def test_padded_keys_may_read_table_chunks_nobody_built(one_key_block, monkeypatch):
    """Every element reads its bucket's table column unpredicated, padded keys too: their logits
    are masked, and the backward's dO . rv table starts at zero, so their dS = P~ (...) stays 0
    wherever their column lies. The op gives padding the first valid key's time step, so its
    buckets lie in chunks the block builds anyway; here the steps say otherwise: valid positions
    all at step 0, the right padding at 20, in the 16-bucket chunk that the first query block,
    the first its program runs, does not build. The padded positions' own rows see other buckets
    than the reference's and are left out of the comparison (their outputs, and so their dO)."""
    from fastpe.kernels.triton import interval

    L, span, valid = 40, 30, 24
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[:, valid:] = True
    steps = interval.interval_steps
    monkeypatch.setattr(interval, "interval_steps",
                        lambda tau, k: torch.where(kpm.to(tau.device), 20, steps(tau, k)).to(torch.int32))
    t = torch.full((2, L), 1000)
    cfg = launch_cfg()
    blocks = dict(block_m=16, block_n=64 if one_key_block else 16, table_chunk=16)
    with cfg.override("tisas_fwd", **blocks), cfg.override("tisas_bwd", **blocks):
        t, kpm = t.to(DEVICE), kpm.to(DEVICE)
        triton_rows, reference_rows = (
            (lambda *x, run=op(backend, t, key_padding_mask=kpm, time_unit=1.0): run(*x)[:, :, :valid])
            for backend in ("triton", "reference"))
        assert_matches_reference(triton_rows, reference_rows, inputs(2, 1, L, 16, span, seed=21), torch.float32,
                                 NAMES)


@pytest.mark.parametrize("per_head", [True, False])
def test_poisoned_buffers_are_all_written(per_head, monkeypatch):
    """Every buffer the kernels fill starts as NaN (the scratch slots and partials too): an element
    a kernel skips fails the comparison. Three programs walk tiles and sequences persistently;
    with shared tables a program's one partial row sums both heads."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    with cfg.override("tisas_fwd", programs=3), cfg.override("tisas_bwd", programs=3):
        check(4, 2, 21, 30, 256, "fully_padded", per_head=per_head, seed=7)


@pytest.mark.parametrize("key_bits", [0, 1])
def test_padded_keys_are_never_read(key_bits, monkeypatch):
    """NaN in the keys and values of padding positions (a fully padded 16-block and a partial one)
    must not reach the output or any gradient, with the backward's padding read per tile or
    packed into bits per sequence (three key blocks in four bits)."""
    cfg = launch_cfg()
    L = 37
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[0, :20] = True
    kpm[1, :3] = True
    kpm = kpm.to(DEVICE)
    q, k, v, rk, rv = inputs(2, 1, L, 16, 20, seed=8)
    t = times(2, L, "mixed", 20, seed=8)
    ref = time_interval_attention(q, k, v, rk, rv, t, key_padding_mask=kpm, backend="reference")
    dout = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, (q, k, v, rk, rv), dout)
    low = [x.detach().float() for x in (q, k, v, rk, rv)]
    for x in low[1:3]:
        x[:, 0][kpm] = float("nan")
    low = [x.requires_grad_() for x in low]
    with cfg.override("tisas_fwd", block_m=16, block_n=16), \
            cfg.override("tisas_bwd", block_m=16, block_n=16, key_bits=key_bits):
        out = time_interval_attention(*low, t, key_padding_mask=kpm, backend="triton")
        grads = torch.autograd.grad(out, low, dout.float())
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, g, r in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=atol * max(1.0, r.abs().max().item()), rtol=rtol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_fully_padded_rows_are_zero_with_finite_gradients():
    q, k, v, rk, rv = (x.detach().float() for x in inputs(2, 2, 6, 8, 256))
    leaves = [x.requires_grad_() for x in (q, k, v, rk, rv)]
    kpm = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    out = time_interval_attention(*leaves, times(2, 6, "mixed", 256), key_padding_mask=kpm, backend="triton")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))


@pytest.mark.parametrize("magnitude", [1e-7, 1e5])
def test_fixed_point_sums_follow_the_gradient_scale(magnitude):
    """The bucket sums of dS are fixed point with a per-row scale from a bound on the row: tiny and
    large upstream gradients (loss scaling) keep their relative accuracy."""
    q, k, v, rk, rv = inputs(2, 1, 12, 16, 10, seed=9)
    t = times(2, 12, "mixed", 10, seed=9)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(2, 1, 12, 16, dtype=torch.float64, generator=gen).to(DEVICE) * magnitude
    ref = torch.autograd.grad(time_interval_attention(q, k, v, rk, rv, t, backend="reference"), (q, k, v, rk, rv), dout)
    low = [x.detach().float().requires_grad_() for x in (q, k, v, rk, rv)]
    got = torch.autograd.grad(time_interval_attention(*low, t, backend="triton"), low, dout.float())
    for name, g, r in zip(NAMES, got, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-5 * r.abs().max().item(), rtol=1e-4,
                                   msg=lambda m, name=name: f"d{name}: {m}")


# --------------------------------------------------------------------------------------------
# determinism and dropout
# --------------------------------------------------------------------------------------------


def _grads(leaves_in, t, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in leaves_in]
    out = time_interval_attention(*leaves, t, backend="triton", **kw)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out))
    return out, [leaf.grad for leaf in leaves]


def test_table_gradients_are_bitwise_reproducible():
    """Two programs share the batch, each sums its sequences' table gradients in its own partial
    row; the bucket sums are integer atomics. Two runs agree bit for bit."""
    leaves = [x.float() for x in inputs(2, 2, 12, 16, 256, seed=10)]
    t = times(2, 12, "unsorted", 256, seed=10)
    kpm = make_masks("padding", 2, 2, 12, 12, seed=10)["key_padding_mask"].to(DEVICE)
    cfg = launch_cfg()
    with cfg.override("tisas_bwd", programs=2):
        _, g1 = _grads(leaves, t, key_padding_mask=kpm, dropout_p=0.0)
        _, g2 = _grads(leaves, t, key_padding_mask=kpm, dropout_p=0.0)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def _reference_with_keep(q, k, v, rk, rv, t, keep, p, key_padding_mask=None, is_causal=False):
    """The reference math with a given dropout keep mask [B, h, L, L]."""
    L = q.shape[-2]
    buckets = time_interval_buckets_reference(t, None, key_padding_mask, rk.shape[-2] - 1)
    rk_ij, rv_ij = rk[buckets], rv[buckets]  # [B, L, L, dh] (tables shared by the heads)
    scores = (q @ k.transpose(-1, -2) + torch.einsum("bhid,bijd->bhij", q, rk_ij)) / q.shape[-1] ** 0.5
    probs = masked_softmax(scores, combined_bias(key_padding_mask, None, is_causal, L, L, q.dtype, q.device))
    probs = probs * keep / (1 - dropout_rate(p))  # (the rate the kernels apply for p)
    return probs @ v + torch.einsum("bhij,bijd->bhid", probs, rv_ij)


def _keep_mask(seed, b, h, L, p, t, **kw):
    """The kernel's keep mask, read off its output with V = identity and zero tables."""
    q, k, *_ = inputs(b, h, L, 16, 4)
    dv = max(16, L)
    v = torch.eye(L, dv, dtype=torch.float32, device=DEVICE).expand(b, h, L, dv).contiguous()
    torch.manual_seed(seed)
    out = time_interval_attention(q.float(), k.float(), v, torch.zeros(5, 16, device=DEVICE),
                                  torch.zeros(5, dv, device=DEVICE), t, dropout_p=p, backend="triton", **kw)
    return out[..., :L] != 0


def test_dropout_is_reproducible_and_has_the_right_rate():
    b, h, L, p = 2, 2, 12, 0.3
    t = times(b, L, "mixed", 4)
    a = _keep_mask(7, b, h, L, p, t)
    assert torch.equal(a, _keep_mask(7, b, h, L, p, t))
    assert not torch.equal(a, _keep_mask(8, b, h, L, p, t))
    assert abs(a.float().mean().item() - (1 - p)) < 0.08  # 576 draws


@pytest.mark.parametrize("L,key_bits", [(12, 0), (40, 0), (40, 1)])
def test_dropout_backward_uses_the_forward_mask(L, key_bits):
    """Outputs and all gradients equal the float64 reference fed the kernel's own keep mask (at L = 40
    over 16-wide blocks: the two-pass forward and several query blocks in the backward)."""
    b, h, p = 2, 2, 0.25
    kpm = make_masks("padding", b, h, L, L, seed=11)["key_padding_mask"].to(DEVICE)
    kw = {"key_padding_mask": kpm, "is_causal": True}
    t = times(b, L, "unsorted", 4, seed=11)
    cfg = launch_cfg()
    with cfg.override("tisas_fwd", block_m=16, block_n=16), \
            cfg.override("tisas_bwd", block_m=16, block_n=16, key_bits=key_bits):
        keep = _keep_mask(11, b, h, L, p, t, **kw)

        def kernel(*x):
            torch.manual_seed(11)  # the same seed draws the same mask
            return time_interval_attention(*x, t, dropout_p=p, backend="triton", **kw)

        def reference(*x):
            return _reference_with_keep(*x, t, keep=keep.double(), p=p, **kw)

        assert_matches_reference(kernel, reference, inputs(b, h, L, 16, 4, seed=11), torch.float32, NAMES)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 0.99])
def test_int32_p_sums_have_headroom(p):
    """The int32 fixed point of the P~ sums: a row's total (at most 1 / (1 - p)) maps to at most
    2**30, half the int32 range (slack for fp32 rounding), and to more than 2**29 (no bit unused)."""
    from fastpe.kernels.triton.interval import _p_fixed

    largest = _p_fixed(p) / (1.0 - p)
    assert 2**29 < largest <= 2**30


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_packed_backward_sums_have_headroom(p):
    """The backward adds a bucket's dS and P~ with one int64 atomic, dS above bit PACK_SHIFT: the
    P~ part (>= 0, a row's total at most 1 / (1 - p)) must stay below 2**PACK_SHIFT, without a bit
    unused, and the dS part (below 2**FIXED_BITS) must keep the total inside int64."""
    from fastpe.kernels.triton.interval import FIXED_BITS, PACK_P_BITS, PACK_SHIFT, _p_fixed

    largest = _p_fixed(p, PACK_P_BITS) / (1.0 - p)
    assert 2 ** (PACK_P_BITS - 2) < largest <= 2 ** (PACK_P_BITS - 1) < 2**PACK_SHIFT
    assert FIXED_BITS + PACK_SHIFT <= 62


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_p_sums_at_the_int32_bound(p):
    """Equal timestamps put every element in bucket 0, so one int32 sum holds a row's whole P~:
    1 (no dropout) or, for the first causal row when its one key is kept at p = 0.5, 2 = 1 / (1 - p),
    the bound, 2**30 in fixed point. A scale one bit larger wraps to a negative sum."""
    b, h, L = 2, 2, 12
    kw = {"is_causal": True}
    t = times(b, L, "equal", 8)
    if p == 0.0:
        check(b, h, L, 16, 8, "causal", t_kind="equal", seed=13)
        return
    keep = _keep_mask(13, b, h, L, p, t, **kw)
    assert keep[..., 0, 0].any()  # some first row holds its one kept key: P~ = 2

    def kernel(*x):
        torch.manual_seed(13)
        return time_interval_attention(*x, t, dropout_p=p, backend="triton", **kw)

    def reference(*x):
        return _reference_with_keep(*x, t, keep=keep.double(), p=p, **kw)

    assert_matches_reference(kernel, reference, inputs(b, h, L, 16, 8, seed=13), torch.float32, NAMES)


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) sees the kernels as custom ops (forward and backward) and
    gives the eager results; the time steps are torch ops in the graph."""
    q, k, v, rk, rv = (x.detach().float().requires_grad_() for x in inputs(2, 1, 9, 16, 12, seed=14))
    t = times(2, 9, "unsorted", 12, seed=14)
    kpm = make_masks("padding", 2, 1, 9, 9, seed=14)["key_padding_mask"].to(DEVICE)

    def f(*x):
        return time_interval_attention(*x, t, key_padding_mask=kpm, is_causal=True, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, k, v, rk, rv)
    out_e = f(q, k, v, rk, rv)
    torch.testing.assert_close(out_c, out_e)
    leaves = (q, k, v, rk, rv)
    for gc, ge in zip(torch.autograd.grad(out_c.sum(), leaves), torch.autograd.grad(out_e.sum(), leaves)):
        torch.testing.assert_close(gc, ge)


# --------------------------------------------------------------------------------------------
# host side: time steps, errors, dispatch
# --------------------------------------------------------------------------------------------


def test_int32_time_steps_keep_every_clipped_interval():
    """Steps far beyond int32 (microsecond timestamps, unit 1), unsorted, with ties: the compressed
    int32 steps give the same buckets as the int64 ones."""
    from fastpe.kernels.triton.interval import interval_steps

    gen = torch.Generator().manual_seed(0)
    tau = torch.randint(0, 2**50, (4, 30), generator=gen)
    tau[:, 10:20] = tau[:, :1] + torch.randint(0, 300, (4, 10), generator=gen)  # near neighbours, ties
    tau[0] = 7
    for span in (0, 1, 256):
        steps = interval_steps(tau, span)
        assert steps.dtype == torch.int32
        assert torch.equal(time_interval_buckets(steps.long(), span), time_interval_buckets(tau, span))
    assert torch.equal(interval_steps(personal_time_steps(tau, torch.ones(4, dtype=torch.float64), None), 256).long(),
                       interval_steps(tau - tau.amin(dim=1, keepdim=True), 256).long())


def test_unsupported_inputs_raise_clear_errors():
    q, k, v, rk, rv = inputs(1, 1, 3, 8, 4)
    t = times(1, 3, "mixed", 4)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        time_interval_attention(q, k, v, rk, rv, t, backend="triton")  # float64
    qf = q.detach().float()
    big = torch.zeros(1026, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"time spans K <= 1024 \(tables of at most 1025 rows\), got 1026"):
        time_interval_attention(qf, qf, qf, big, big, t, backend="triton")
    bias = torch.zeros(3, 3, device=DEVICE, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask that requires grad"):
        time_interval_attention(qf, qf, qf, rk.detach().float(), rv.detach().float(), t, attn_mask=bias,
                                backend="triton")


def test_auto_keeps_torch_on_the_cpu_and_declines_large_spans(monkeypatch):
    from fastpe.backends import resolve_backend
    from fastpe.kernels.triton import unsupported_reason

    assert resolve_backend("auto", "time_interval_attention", torch.device("cpu")) == "torch"
    # on a GPU too, until a GPU run has checked and timed the kernels
    monkeypatch.setattr("fastpe.backends._auto_order", lambda op, device, klass="any": ("triton", "torch"))
    assert resolve_backend("auto", "time_interval_attention", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", "relative_attention", torch.device("cpu")) == "triton"  # (the interpreter)
    q = torch.zeros(1, 1, 3, 8)
    assert unsupported_reason("time_interval_attention", q, q, q, torch.zeros(1025, 8)) is None
    assert "K > 1024" in unsupported_reason("time_interval_attention", q, q, q, torch.zeros(1026, 8))


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,h,L,dh", [(64, 2, 50, 32), (16, 2, 200, 64), (32, 1, 75, 90), (2, 2, 300, 64)])
def test_gpu_shapes_and_dtypes(dtype, b, h, L, dh):
    atol, rtol = TOLERANCES[dtype]
    tol = (atol * 2, rtol * 2) if dtype != torch.float32 else None
    masks = masks_on_device("padding+causal", b, h, L)
    t = times(b, L, "unsorted", 256)
    assert_matches_reference(op("triton", t, **masks), op("reference", t, **masks), inputs(b, h, L, dh, 256), dtype,
                             NAMES, tol=tol)


@pytest.mark.gpu
def test_gpu_table_gradients_are_bitwise_reproducible():
    leaves = [x.to(torch.bfloat16) for x in inputs(256, 2, 50, 32, 256)]
    t = times(256, 50, "mixed", 256)
    _, g1 = _grads(leaves, t)
    _, g2 = _grads(leaves, t)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@triton.jit
def _ceil_log2_kernel(X, OUT, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(OUT + offs, _ceil_log2(tl.load(X + offs)))


def test_ceil_log2_of_the_fixed_point_bound_is_exact():
    """The backward's dS scale is 2**(FIXED_BITS - ceil(log2(bound))): the exponent read from the bits must
    equal the exact ceil(log2) (never below it, or the fixed-point sums could overflow), at powers
    of two, just above and below them, and for subnormals (-126, where the caller clamps)."""
    import math

    tiny = torch.finfo(torch.float32).tiny
    values = [1.0, 2.0, 0.5, 3.0, 1e-30, 3e38, tiny, 2.0 ** -100, 7.0 * 2.0 ** 40]
    values += [math.nextafter(2.0 ** e, math.inf) for e in (-20, 0, 5)]
    values += [math.nextafter(2.0 ** e, 0.0) for e in (-20, 1, 5)]
    x = torch.tensor(values, dtype=torch.float32)
    x = torch.cat([x, torch.tensor([tiny / 2, tiny / 1024])])  # subnormals
    x = torch.cat([x, torch.rand(64 - len(x), generator=torch.Generator().manual_seed(0)) * 1e6 + 1e-3])
    out = torch.full((64,), -999, dtype=torch.int32)
    out = out.to(DEVICE)
    _ceil_log2_kernel[(1,)](x.to(DEVICE), out, N=64)
    expected = [max(math.ceil(math.log2(v)), -126) for v in x.double().tolist()]
    assert out.cpu().tolist() == expected
