"""RMHA-k, triton backend: outputs and every gradient against the float64 reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), where every program
instance costs milliseconds: shapes stay small, and the multi-block code paths (online softmax
over several key blocks, key blocks left of, on and right of the band |j - i| < k, skipped
padding blocks, the split backward) are reached by forcing small blocks. The interpreter's
bf16 tl.dot is wrong (an upstream bug), so these tests use fp32 and fp16; test_ptx_emulation runs
bf16 with that dot fixed (``interpreter_bf16``), and the GPU tests on the hardware.
"""

import functools

import pytest
import torch

pytest.importorskip("triton")

from fastpe._masks import combined_bias, masked_softmax, relative_buckets  # noqa: E402
from fastpe.kernels.triton.rmha import dropout_rate  # noqa: E402
from fastpe.ops.relative_attention import relative_attention  # noqa: E402
from helpers import MASK_KINDS, TOLERANCES, assert_matches_reference, make_masks, randn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["q", "k", "v", "rel_k", "rel_v"]


def launch_cfg():
    from fastpe.kernels.triton import _launch

    return _launch


def rmha_inputs(b, h, lq, lk, dh, kmax=4, per_head=False, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = dh if dv is None else dv
    q = randn(b, h, lq, dh, gen=gen, dtype=torch.float64)
    k = randn(b, h, lk, dh, gen=gen, dtype=torch.float64)
    v = randn(b, h, lk, dv, gen=gen, dtype=torch.float64)
    ks = (h, 2 * kmax + 1, dh) if per_head else (2 * kmax + 1, dh)
    vs = (h, 2 * kmax + 1, dv) if per_head else (2 * kmax + 1, dv)
    rk, rv = randn(*ks, gen=gen, dtype=torch.float64), randn(*vs, gen=gen, dtype=torch.float64)
    return [t.detach().to(DEVICE).requires_grad_() for t in (q, k, v, rk, rv)]


def masks_on_device(kind, b, h, lq, lk):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in make_masks(kind, b, h, lq, lk).items()}


def op(backend, **kw):
    return functools.partial(_call, backend=backend, **kw)


def _call(q, k, v, rk, rv, **kw):
    return relative_attention(q, k, v, rk, rv, **kw)


def backward_constexprs(b, h, L, dh, dtype=torch.float32):
    """The constexprs of the backward's main launch as planned for a self-attention shape."""
    from fastpe.kernels.triton import rmha

    q = torch.zeros(b, h, L, dh, dtype=dtype, device=DEVICE)
    tables = torch.zeros(1, 9, dh, dtype=dtype, device=DEVICE)
    row = q[..., 0].float()
    *_grads, (main, *_rest) = rmha.plan_backward(q, q, q, q, tables, tables, None, None, None, q, row, row,
                                                 False, 0.0, 0.1)
    return main.constexprs


def check(b, h, lq, lk, dh, kind="padding", dtype=torch.float32, **kw):
    inputs = rmha_inputs(b, h, lq, lk, dh, **kw)
    masks = masks_on_device(kind, b, h, lq, lk)
    assert_matches_reference(op("triton", **masks), op("reference", **masks), inputs, dtype, NAMES)


# --------------------------------------------------------------------------------------------
# shapes, dtypes, masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,h,L,dh,per_head",
    [(2, 2, 1, 8, False), (3, 1, 7, 30, True), (2, 2, 20, 50, False), (1, 2, 33, 90, True)],
)
def test_matches_reference_shapes(dtype, b, h, L, dh, per_head):
    check(b, h, L, L, dh, "padding", dtype, per_head=per_head)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_matches_reference_masks(kind):
    check(3, 2, 13, 13, 6, kind, kmax=3, per_head=kind.endswith("padding"))


MULTI_BLOCK_CASES = {  # (forward config, backward config, mask kind); test_ptx_emulation runs them too
    "split": (dict(block_m=16, block_n=16), dict(mode="split", block_m=16, block_n=16), "padding+causal"),
    "fused-multi-query-block": (dict(block_m=32, block_n=16, diag=1), dict(mode="fused", block_m=16), "float_bias"),
    "split-unequal-blocks": (dict(block_m=16, block_n=16), dict(mode="split", block_m=32, block_n=16, b_per_prog=1),
                             "bool_3d"),
}


@pytest.mark.parametrize("fwd,bwd,kind", list(MULTI_BLOCK_CASES.values()), ids=list(MULTI_BLOCK_CASES))
def test_multi_block_paths(fwd, bwd, kind):
    """Online softmax over several key blocks, query blocks split over programs, both backward modes
    (the forward's band tiles by column with an additive float mask in the second)."""
    cfg = launch_cfg()
    with cfg.override("rmha_fwd", **fwd), cfg.override("rmha_bwd", **bwd):
        check(2, 2, 33, 33, 30, kind, kmax=2, per_head=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["padding", "padding+causal"])
@pytest.mark.parametrize("diag,kmax,left_float", [(1, 2, -1), (1, 2, 0), (0, 2, -1), (1, 9, -1)],
                         ids=["by-column", "by-column-left-predicates", "gathered", "wide-band-gathered"])
def test_key_blocks_left_of_on_and_right_of_the_band(dtype, kind, diag, kmax, left_float, monkeypatch):
    """16-wide blocks over 70 positions: the forward visits key blocks wholly left of the band
    (bucket 0), blocks meeting it and blocks wholly right of it (bucket 2k); the split backward sums
    the buckets over several key blocks. Band tiles of the forward: by tile column (``diag``: the
    inner buckets' q . rk and logits kept per column) or gathered per tile; with k = 9 the 17 inner
    diagonals are wider than a key block, so the planner gathers even when asked for columns. By
    column, the bucket 0 sums take the left-of-band mask as a float tile (the default without
    dropout) or as predicates (``left_float=0``). Outputs start as NaN."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    with cfg.override("rmha_fwd", block_m=16, block_n=16, diag=diag, left_float=left_float), \
            cfg.override("rmha_bwd", mode="split", block_m=16, block_n=16):
        check(2, 1, 70, 70, 16, kind, dtype, kmax=kmax)


@pytest.mark.parametrize("kind", ["padding", "padding+causal"])
def test_band_tiles_by_column_with_no_inner_buckets(kind, monkeypatch):
    """k = 0: no inner buckets, and bucket 0 is bucket 2k (a key at j = i is both left and right of
    the band; its bucket sum is added once). float32 only: there drk is the sum of every dS, zero
    up to rounding, which fp16 outputs round past the tolerance in either forward."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    with cfg.override("rmha_fwd", block_m=16, block_n=16, diag=1), \
            cfg.override("rmha_bwd", mode="split", block_m=16, block_n=16):
        check(2, 1, 70, 70, 16, kind, torch.float32, kmax=0)


@pytest.mark.parametrize("kind,bwd_mode", [("padding", "split"), ("padding+causal", "fused")])
def test_band_tiles_of_64_keys_gather_column_pairs(kind, bwd_mode, monkeypatch):
    """fp16 (the interpreter's bf16 ``tl.dot`` is wrong; both 16-bit types take the same path): a
    64-wide key block meeting the band gathers its inner buckets (forward: of P~; backward: of P~
    and dS) from column pairs. 16-row query blocks over 150 positions with k = 4 put the band at
    every offset in a key block: inside it, across its start and across its end into the next
    one. Outputs start as NaN."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    with cfg.override("rmha_fwd", block_m=16, block_n=64, diag=0), \
            cfg.override("rmha_bwd", mode=bwd_mode, block_m=16, block_n=64):
        check(2, 1, 150, 150, 16, kind, torch.float16, kmax=4)


@pytest.mark.parametrize("bwd_mode,bwd_block_m,diag,key_bits",
                         [("split", 16, 1, 0), ("fused", 16, 0, 0), ("fused", 64, 1, 0),
                          ("split", 16, 1, 1), ("fused", 16, 0, 1), ("fused", 64, 1, 1)],
                         ids=["split", "fused-buffer", "fused-direct",
                              "split-key-bits", "fused-buffer-key-bits", "fused-direct-key-bits"])
def test_fully_padded_key_blocks_are_skipped_for_every_left_padding_length(bwd_mode, bwd_block_m, diag, key_bits,
                                                                           monkeypatch):
    """One sequence per left-padding length 0..17 over 16-wide key blocks of 33 positions. Keys and
    values of every fully padded block are NaN: a kernel that reads such a block (instead of
    skipping it) turns outputs or gradients into NaN. Outputs start as NaN too. Every backward
    mode: split, and the one pass over several key blocks, with dk, dv in the per-program buffer
    (16-row query blocks) or written per key block (one 64-row query block holds every query; the
    skipped blocks' dk, dv are written as zeros after the tiles). The forward's band tiles: by tile
    column (``diag``) in two of them, gathered in one. Which keys a tile holds: read from the
    padding mask per tile, or (``key_bits``) from bits packed once per sequence (three key blocks
    in four bits: the unused one must read as no keys)."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    L, pads = 33, list(range(18))
    b = len(pads)
    kpm = (torch.arange(L)[None, :] < torch.tensor(pads)[:, None]).to(DEVICE)
    q, k, v, rk, rv = rmha_inputs(b, 1, L, L, 8, kmax=2)
    ref = relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend="reference")
    dout = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, (q, k, v, rk, rv), dout)
    dead = torch.zeros(b, L, dtype=torch.bool)
    for row, pad in enumerate(pads):
        dead[row, : pad // 16 * 16] = True  # the positions of fully padded 16-blocks
    low = [t.detach().float() for t in (q, k, v, rk, rv)]
    for t in low[1:3]:
        t[:, 0][dead.to(DEVICE)] = float("nan")
    low = [t.requires_grad_() for t in low]
    with cfg.override("rmha_fwd", block_m=16, block_n=16, diag=diag, key_bits=key_bits), \
            cfg.override("rmha_bwd", mode=bwd_mode, block_m=bwd_block_m, block_n=16, key_bits=key_bits):
        out = relative_attention(*low, key_padding_mask=kpm, backend="triton")
        grads = torch.autograd.grad(out, low, dout.float())
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, g, r in zip(NAMES, grads, ref_grads):  # dk, dv of skipped blocks: written as 0
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("L", [129, 200, 256])
def test_one_pass_backward_up_to_256_keys(L, monkeypatch):
    """The backward that holds a whole sequence in one key block (dq written once per query block)
    at lengths between 129 and 256, with NaN-poisoned outputs."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    with cfg.override("rmha_bwd", mode="fused", block_m=64):
        check(1, 1, L, L, 16, "padding+causal", kmax=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["padding", "padding+causal"])
@pytest.mark.parametrize("block_m", [16, 64], ids=["buffer", "direct"])
def test_one_pass_backward_over_several_key_blocks_dh90(dtype, kind, block_m, monkeypatch):
    """The one-pass backward with 16-wide key blocks over 37 positions and dh = 90 (64 + 32), band
    and off-band tiles, two sequences per program. 16-row query blocks: dk, dv accumulate in the
    per-program buffer over the query blocks (zeroed again per sequence); one 64-row query block:
    each key block's dk, dv are written after its tile. Outputs start as NaN."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    with cfg.override("rmha_bwd", mode="fused", block_m=block_m, block_n=16, b_per_prog=2):
        check(3, 1, 37, 37, 90, kind, dtype, kmax=2)


def test_wide_head_backward_takes_128_row_blocks_on_8_warps(monkeypatch):
    """Heads of 65-128 columns over several key blocks: one-pass backward with 128-row query blocks
    (8 warps need 128 rows: over 64 both warpgroups would compute the same score tile), and 4 warps
    where the blocks are shorter. The default plan at L = 75, dh = 90 (one query block past the
    queries, two key blocks), fp32, NaN-filled outputs, left padding and a fully padded row."""
    from fastpe.kernels.triton import rmha

    cfg = rmha.bwd_config(3, 1, 75, 75, 90, 90, torch.device(DEVICE), torch.float32)
    assert (cfg["mode"], cfg["block_m"], cfg["block_n"], cfg["num_warps"]) == ("fused", 128, 64, 8)
    planned = backward_constexprs(3, 1, 75, 90)
    assert planned["KV_DIRECT"] and not planned["KV_IN_REGS"]  # one query block: dk, dv per key block
    for lq, lk in [(50, 50), (512, 512)]:  # one 64-key block; split mode (few sequences)
        short = rmha.bwd_config(1, 1, lq, lk, 90, 90, torch.device(DEVICE), torch.float32)
        assert short["block_m"] < 128 and short["num_warps"] == 4
    monkeypatch.setattr(launch_cfg(), "POISON", True)
    check(3, 1, 75, 75, 90, "fully_padded", torch.float32, kmax=4)


@pytest.mark.parametrize("lq,lk,mode", [(5, 40, "fused"), (40, 5, "split"), (21, 40, "split"), (40, 21, "fused")])
def test_unequal_query_and_key_lengths(lq, lk, mode):
    cfg = launch_cfg()
    with cfg.override("rmha_fwd", block_m=16, block_n=16), cfg.override("rmha_bwd", mode=mode, block_m=16, block_n=16):
        check(2, 2, lq, lk, 8, "padding+causal")


@pytest.mark.parametrize("kmax", [0, 20])
def test_clipping_distance_zero_and_large(kmax):
    check(2, 1, 25, 25, 8, "padding", kmax=kmax)


@pytest.mark.parametrize("k_per_head", [True, False])
def test_tables_shared_differently(k_per_head):
    """One table per head for rel_k and one for all heads for rel_v, or the other way round."""
    q, k, v, rk, rv = rmha_inputs(2, 3, 9, 9, 8, per_head=True)
    rk, rv = (rk, rv[0]) if k_per_head else (rk[0], rv)
    inputs = [t.detach().requires_grad_() for t in (q, k, v, rk, rv)]
    masks = masks_on_device("padding", 2, 3, 9, 9)
    assert_matches_reference(op("triton", **masks), op("reference", **masks), inputs, torch.float32, NAMES)
    from fastpe.kernels.triton import rmha

    # the kernels' own gradients have the tables' shapes (autograd would silently sum a wrong one)
    f = [t.detach().float() for t in inputs]
    rk3, rv3 = (t if t.dim() == 3 else t[None] for t in f[3:])
    out, lse, p_sums, launches = rmha.plan_forward(*f[:3], rk3, rv3, None, None, None, False, 0.0, 0.3)
    cfg = launch_cfg()
    cfg.run(launches)
    *grads, launches = rmha.plan_backward(out, *f[:3], rk3, rv3, None, None, None, out, lse, p_sums, False, 0.0, 0.3)
    cfg.run(launches)
    assert [g.shape for g in grads] == [t.shape for t in (*f[:3], rk3, rv3)]


@pytest.mark.parametrize("scale", [0.3, -0.3])
@pytest.mark.parametrize("diag", [0, 1])
def test_value_head_size_differs_and_custom_scale(scale, diag):
    """(A negative scale takes the forward path that scales the logits before their max; with
    ``diag`` its band tile keeps the inner logits scaled, with a positive one unscaled.)"""
    inputs = rmha_inputs(2, 2, 11, 11, 20, dv=36)
    masks = masks_on_device("padding+causal", 2, 2, 11, 11)
    with launch_cfg().override("rmha_fwd", diag=diag):
        assert_matches_reference(op("triton", scale=scale, **masks), op("reference", scale=scale, **masks), inputs,
                                 torch.float32, NAMES)


def test_non_contiguous_inputs():
    """q, k, v as transposed views of [B, L, h, dh] projections (the usual layout)."""
    b, h, L, dh = 2, 2, 9, 16
    gen = torch.Generator().manual_seed(1)
    base = [randn(b, L, h, dh, gen=gen, dtype=torch.float64, requires_grad=False) for _ in range(3)]
    rk, rv = (randn(9, dh, gen=gen, dtype=torch.float64) for _ in range(2))

    def fn(backend):
        def run(q0, k0, v0, rk, rv):
            return relative_attention(q0.transpose(1, 2), k0.transpose(1, 2), v0.transpose(1, 2), rk, rv, backend=backend)
        return run

    inputs = [t.to(DEVICE).requires_grad_() for t in (*base, rk, rv)]
    assert_matches_reference(fn("triton"), fn("reference"), inputs, torch.float32, NAMES)


def test_fully_padded_rows_are_zero_with_finite_gradients():
    q, k, v, rk, rv = rmha_inputs(2, 2, 6, 6, 4)
    kpm = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rk, rv)]
    out = relative_attention(*[t.float() for t in leaves], key_padding_mask=kpm, backend="triton")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))


def test_poisoned_buffers_are_all_written(monkeypatch):
    """Every buffer the kernels fill starts as NaN: an element a kernel skips fails the comparison."""
    cfg = launch_cfg()
    monkeypatch.setattr(cfg, "POISON", True)
    check(3, 2, 21, 21, 30, "padding+causal", per_head=True, kmax=2)
    with cfg.override("rmha_fwd", block_m=16, block_n=16), cfg.override("rmha_bwd", mode="split", block_m=16, block_n=16):
        check(3, 2, 21, 19, 30, "fully_padded", kmax=2)


def test_poison_switch_catches_an_unwritten_element(monkeypatch):
    """The poison check can fail: a kernel that skips its last query row is caught."""
    cfg = launch_cfg()
    from fastpe.kernels.triton import rmha

    monkeypatch.setattr(cfg, "POISON", True)
    real = rmha.plan_forward

    def skipping_last_row(q, *args):
        *outputs, launches = real(q, *args)
        launches[0].args["LQ"] = q.shape[2] - 1  # the kernel now believes the sequence is shorter
        return *outputs, launches

    monkeypatch.setattr(rmha, "plan_forward", skipping_last_row)
    q, k, v, rk, rv = rmha_inputs(1, 1, 5, 5, 8)
    out = relative_attention(q.float(), k.float(), v.float(), rk.float(), rv.float(), backend="triton")
    assert torch.isnan(out[0, 0, -1]).all() and not torch.isnan(out[0, 0, :-1]).any()


# --------------------------------------------------------------------------------------------
# determinism and dropout
# --------------------------------------------------------------------------------------------


def _grads(inputs, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = relative_attention(*leaves, backend="triton", **kw)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out))
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_table_gradients_are_bitwise_reproducible(mode):
    inputs = [t.float() for t in rmha_inputs(2, 2, 18, 18, 16, kmax=2)]
    masks = masks_on_device("padding", 2, 2, 18, 18)
    cfg = launch_cfg()
    with cfg.override("rmha_bwd", mode=mode, block_m=16, block_n=16, b_per_prog=2):  # 2 partial rows per head (split)
        _, g1 = _grads(inputs, **masks)
        _, g2 = _grads(inputs, **masks)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def _reference_with_keep(q, k, v, rk, rv, keep, p, key_padding_mask=None, attn_mask=None, is_causal=False):
    """The reference math with a given dropout keep mask [B, h, Lq, Lk]."""
    lq, lk = q.shape[-2], k.shape[-2]
    rk = rk if rk.dim() == 3 else rk[None]
    rv = rv if rv.dim() == 3 else rv[None]
    buckets = relative_buckets(lq, lk, (rk.shape[-2] - 1) // 2, q.device)
    scores = (torch.einsum("bhid,bhjd->bhij", q, k) + torch.einsum("bhid,hijd->bhij", q, rk[:, buckets])) / q.shape[-1] ** 0.5
    probs = masked_softmax(scores, combined_bias(key_padding_mask, None, is_causal, lq, lk, q.dtype, q.device))
    probs = probs * keep / (1 - dropout_rate(p))  # (the rate the kernels apply for p)
    return torch.einsum("bhij,bhjd->bhid", probs, v) + torch.einsum("bhij,hijd->bhid", probs, rv[:, buckets])


def _keep_mask(seed, b, h, lq, lk, p, **kw):
    """The kernel's keep mask, read off its output with V = identity and zero tables."""
    q, k, _v, _rk, _rv = rmha_inputs(b, h, lq, lk, 16)
    dv = max(16, lk)
    v = torch.eye(lk, dv, dtype=torch.float32, device=DEVICE).expand(b, h, lk, dv).contiguous()
    torch.manual_seed(seed)
    out = relative_attention(q.float(), k.float(), v, torch.zeros(3, 16, device=DEVICE), torch.zeros(3, dv, device=DEVICE),
                             dropout_p=p, backend="triton", **kw)
    return out[..., :lk] != 0


def test_dropout_is_reproducible_and_has_the_right_rate():
    b, h, L, p = 2, 2, 12, 0.3
    a = _keep_mask(7, b, h, L, L, p)
    assert torch.equal(a, _keep_mask(7, b, h, L, L, p))
    assert not torch.equal(a, _keep_mask(8, b, h, L, L, p))
    assert abs(a.float().mean().item() - (1 - p)) < 0.08  # 576 draws


def test_dropout_rates_are_multiples_of_a_256th():
    assert dropout_rate(0.0) == 0.0
    assert dropout_rate(0.25) == 0.25
    assert dropout_rate(0.3) == 77 / 256  # 76.8 -> 77
    assert dropout_rate(0.2) == 51 / 256  # 51.2 -> 51
    assert dropout_rate(1e-6) == 1 / 256  # a requested dropout never vanishes
    assert dropout_rate(0.998) == 255 / 256
    with pytest.raises(ValueError, match="rounds to 1"):
        dropout_rate(0.999)


def test_dropout_draws_of_one_philox_call_are_independent():
    """One Philox call draws sixteen bytes for rows i, i + 8 and keys 8t + 2q + {0, 1}: a byte
    served twice, or a word to both rows, would make those elements agree always. At p = 1/2,
    elements whose draws are independent agree half the time (about 16k pairs per offset: the
    fraction's standard deviation is 0.004)."""
    b, h, L, p = 2, 2, 128, 0.5
    keep = _keep_mask(3, b, h, L, L, p)
    assert abs(keep.float().mean().item() - 0.5) < 0.01
    for rows, cols in ((8, 0), (0, 1), (0, 8), (0, 16), (0, 24), (8, 1), (8, 8), (16, 0), (0, 32)):
        same = keep[..., : L - rows, : L - cols] == keep[..., rows:, cols:]
        assert abs(same.float().mean().item() - 0.5) < 0.03, (rows, cols)


def test_dropout_mask_does_not_depend_on_the_block_size():
    """Each key's draw is fixed by (row, key), not by the tile that draws it: the forward and the
    backward may tile differently."""
    b, h, L, p = 2, 1, 70, 0.3
    cfg = launch_cfg()
    masks = []
    for block in (16, 32, 64):
        with cfg.override("rmha_fwd", block_m=16, block_n=block):
            masks.append(_keep_mask(5, b, h, L, L, p))
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("mode,L,block,dtype,kmax,causal", [
    ("split", 12, 16, torch.float32, 2, True), ("fused", 12, 16, torch.float32, 2, True),
    ("split", 40, 16, torch.float32, 2, True), ("fused", 40, 16, torch.float32, 2, True),
    ("split", 40, 32, torch.float32, 2, True), ("split", 40, 32, torch.float32, 2, False),
    ("split", 40, 32, torch.float32, 0, True), ("fused", 70, 64, torch.float32, 2, True),
    ("fused", 70, 64, torch.float16, 2, True), ("fused-direct", 40, 16, torch.float16, 2, True)])
def test_dropout_backward_uses_the_forward_mask(mode, L, block, dtype, kmax, causal):
    """Outputs and all gradients equal the float64 reference fed the kernel's own keep mask (at L = 40
    with k = 2 over 16-wide blocks: key blocks off the band, and blocks meeting it, whose inner
    buckets are gathered from the dropped tile; 32- and 64-wide key blocks draw a tile's keys from
    whole 32-key Philox spans, 16-wide ones from half of one; in fp16 the 64-wide band tiles gather
    their inner buckets from column pairs of the dropped tile; "fused-direct": one 64-row query block
    writing each key block's dk, dv, dv scaled by 1 / (1 - p) per key block; the forward keeps its
    band tiles by tile column over 16- and 32-wide key blocks, the kept logits of the inner
    elements, and gathers over 64-wide ones; over 16-wide ones its bucket 0 sums take the
    left-of-band mask as a float tile, not the predicates of the dropout default; with k = 0 there
    are no inner buckets to keep; not causal, the inner buckets right of the diagonal count too)."""
    b, h, p = 2, 2, 0.25
    bwd_block_m = 64 if mode == "fused-direct" else 16
    mode = mode.removesuffix("-direct")
    kw = {"key_padding_mask": masks_on_device("padding", b, h, L, L)["key_padding_mask"], "is_causal": causal}
    cfg = launch_cfg()
    with cfg.override("rmha_fwd", block_m=16, block_n=block, diag=int(block < 64), left_float=int(block == 16)), \
            cfg.override("rmha_bwd", mode=mode, block_m=bwd_block_m, block_n=block):
        keep = _keep_mask(11, b, h, L, L, p, **kw)
        inputs = rmha_inputs(b, h, L, L, 16, kmax=kmax, per_head=True)

        def kernel(*t):
            torch.manual_seed(11)  # the same seed draws the same mask
            return relative_attention(*t, dropout_p=p, backend="triton", **kw)

        def reference(*t):
            return _reference_with_keep(*t, keep=keep.double(), p=p, **kw)

        assert_matches_reference(kernel, reference, inputs, dtype, NAMES)


def test_dropout_seed_comes_from_torch_generator():
    q, k, v, rk, rv = (t.float() for t in rmha_inputs(1, 1, 6, 6, 8))
    torch.manual_seed(0)
    a = relative_attention(q, k, v, rk, rv, dropout_p=0.5, backend="triton")
    torch.randn(1, device=DEVICE)  # advancing the generator changes the mask
    b = relative_attention(q, k, v, rk, rv, dropout_p=0.5, backend="triton")
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_unsupported_inputs_raise_clear_errors():
    q, k, v, rk, rv = rmha_inputs(1, 1, 3, 3, 8)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        relative_attention(q, k, v, rk, rv, backend="triton")  # float64
    big = torch.zeros(1, 1, 3, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head sizes up to 256"):
        relative_attention(big, big, big, torch.zeros(9, 264, device=DEVICE), torch.zeros(9, 264, device=DEVICE), backend="triton")
    qf = q.float()
    with pytest.raises(ValueError, match="k <= 64"):
        relative_attention(qf, qf, qf, torch.zeros(131, 8, device=DEVICE), torch.zeros(131, 8, device=DEVICE), backend="triton")
    bias = torch.zeros(3, 3, device=DEVICE, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask that requires grad"):
        relative_attention(qf, qf, qf, rk.float(), rv.float(), attn_mask=bias, backend="triton")


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,h,L,dh", [(64, 2, 50, 32), (16, 2, 200, 64), (32, 1, 75, 90), (2, 2, 512, 64), (4, 3, 130, 130)])
def test_gpu_shapes_and_dtypes(dtype, b, h, L, dh):
    inputs = rmha_inputs(b, h, L, L, dh)
    masks = masks_on_device("padding+causal", b, h, L, L)
    atol, rtol = TOLERANCES[dtype]
    assert_matches_reference(op("triton", **masks), op("reference", **masks), inputs, dtype, NAMES,
                             tol=(atol * 2, rtol * 2) if dtype != torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,L,dh,direct", [(128, 1, 75, 90, True), (8, 2, 200, 64, False)], ids=["direct", "buffer"])
def test_gpu_one_pass_backward_over_several_key_blocks(dtype, b, h, L, dh, direct):
    """The one-pass backward's two multi-key-block paths compiled for the card (the shape tests
    above take the split backward where the card has more SMs than twice their (batch, head)
    pairs): one 128-row query block storing each key block's dk, dv (L = 75, dh 90), and several
    query blocks over the per-program fp32 buffer (L = 200); padding and causal."""
    cfg = launch_cfg()
    inputs = rmha_inputs(b, h, L, L, dh)
    masks = masks_on_device("padding+causal", b, h, L, L)
    atol, rtol = TOLERANCES[dtype]
    with cfg.override("rmha_bwd", mode="fused"):
        planned = backward_constexprs(b, h, L, dh, dtype)
        assert planned["FUSED_DQ"] and planned["KV_DIRECT"] == direct and not planned["KV_IN_REGS"]
        assert_matches_reference(op("triton", **masks), op("reference", **masks), inputs, dtype, NAMES,
                                 tol=(atol * 2, rtol * 2))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_gpu_masks_bf16(kind):
    inputs = rmha_inputs(8, 2, 77, 77, 48, per_head=True)
    masks = masks_on_device(kind, 8, 2, 77, 77)
    assert_matches_reference(op("triton", **masks), op("reference", **masks), inputs, torch.bfloat16, NAMES)


@pytest.mark.gpu
@pytest.mark.parametrize("b,h,L", [(512, 2, 50), (8, 2, 300)])
def test_gpu_table_gradients_are_bitwise_reproducible(b, h, L):
    inputs = [t.to(torch.bfloat16) for t in rmha_inputs(b, h, L, L, 32)]
    masks = masks_on_device("padding", b, h, L, L)
    _, g1 = _grads(inputs, dropout_p=0.0, **masks)
    _, g2 = _grads(inputs, dropout_p=0.0, **masks)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def test_row_alignment_hint():
    """The bytes every head row starts at a multiple of (the kernels' vector width hint)."""
    from fastpe.kernels.triton.rmha import _row_alignment

    def heads(b, length, h, dh, dtype, parts=3):
        qkv = torch.zeros(b, length, parts * h * dh, dtype=dtype).chunk(parts, dim=-1)
        return [t.view(b, length, h, dh).transpose(1, 2) for t in qkv]

    assert _row_alignment(*heads(4, 10, 2, 64, torch.bfloat16)) == 16
    assert _row_alignment(*heads(4, 10, 1, 90, torch.bfloat16)) == 4  # 180-byte k offset, 540-byte rows
    assert _row_alignment(*heads(4, 10, 1, 45, torch.float16)) == 2  # odd row stride: one element
    assert _row_alignment(*heads(4, 10, 1, 90, torch.float32)) == 8
    x = torch.zeros(4, 2, 10, 64, dtype=torch.bfloat16)
    assert _row_alignment(x, x[..., 1:]) == 2  # a view one element in
    assert _row_alignment(x.transpose(-1, -2)) == 0  # columns not contiguous: no hint
    assert _row_alignment(torch.zeros(1, 1, 1, 90, dtype=torch.bfloat16)) == 16  # one row: only the address counts


def test_compiled_only_paths_use_inline_ptx_only_in_compiled_kernels(monkeypatch):
    """The backward's dk, dv read-modify-written in the per-program fp32 rows (rmha
    ``_dot_add_rows``) and stored directly (``_store_rows``) with inline PTX in the dot's own
    layout, and the forward's log2-sum-exp with the approximate ``lg2`` (``_log2``): never under
    the interpreter (these tests run ``tl.load`` / ``tl.store`` / ``tl.log2``: the same values, the
    log2 to within about 2**-22), on for the sm_90a card planned without a GPU
    (``_launch.inline_ptx``, as for the time-interval kernels). ``test_ptx_emulation`` runs them under
    an emulation of their instructions, ``pytest -m gpu`` on the hardware."""
    from fastpe.kernels.triton import _launch
    from fastpe.kernels.triton.rmha import plan_backward, plan_forward

    q, k, v, rk, rv = (t.detach().half() for t in rmha_inputs(1, 1, 20, 20, 16, per_head=True))
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])

    def planned():
        [fwd] = plan_forward(q, k, v, rk, rv, None, None, None, False, 0.0, 0.25)[-1]
        bwd = plan_backward(q, q, k, v, rk, rv, None, None, None, out, lse, lse, False, 0.0, 0.25)[-1][0]
        return fwd.constexprs["PTX"], bwd.constexprs["PTX"]

    compiled = not _launch.triton_interpreter_enabled()
    assert planned() == (compiled, compiled) and _launch.inline_ptx(q.device) is compiled
    monkeypatch.setattr(_launch, "triton_interpreter_enabled", lambda: False)
    assert planned() == (True, True)


def test_band_tiles_by_column_are_planned_only_where_the_inner_diagonals_fit_a_key_block():
    """The forward's band tiles by tile column (``DIAG``) need the 2k - 1 inner diagonals at most a
    key block wide (each inner element in one tile column); asked for more, the planner gathers.
    By default it takes columns up to 16 score elements per thread and from three key blocks (B256
    h2 L200: 64 x 32 tiles on 4 warps; L = 75: 128 x 32 on 8 warps), not for a 64 x 64 tile on 4
    warps (L = 50) nor over two key blocks (L = 64 in 32-key blocks)."""
    from fastpe.kernels.triton import _launch
    from fastpe.kernels.triton.rmha import plan_forward

    def diag(L, kmax, **knobs):
        q, k, v, rk, rv = (t.detach().half() for t in rmha_inputs(2, 1, L, L, 16, kmax=kmax, per_head=True))
        with _launch.override("rmha_fwd", **knobs):
            [fwd] = plan_forward(q, k, v, rk, rv, None, None, None, False, 0.0, 0.25)[-1]
        return fwd.constexprs["DIAG"]

    assert diag(70, 8, block_m=16, block_n=16, diag=1) and not diag(70, 9, block_m=16, block_n=16, diag=1)
    assert not diag(70, 2, block_m=16, block_n=16, diag=0)
    assert diag(200, 4, block_m=64, block_n=32, num_warps=4) and not diag(50, 4, block_m=64, block_n=64, num_warps=4)
    assert diag(75, 4, block_m=128, block_n=32, num_warps=8) and diag(65, 4, block_m=64, block_n=32, num_warps=4)
    assert not diag(64, 4, block_m=64, block_n=32, num_warps=4)


def test_left_of_band_mask_is_a_float_tile_by_default_without_dropout_only():
    """By-column band tiles take the left-of-band mask as a float tile (``LEFT_FLOAT``: fewer
    instructions, more registers) without dropout; with it, and without by-column tiles, not; the
    ``left_float`` knob forces it either way."""
    from fastpe.kernels.triton import _launch
    from fastpe.kernels.triton.rmha import plan_forward

    def left_float(L, dropout_p=0.0, **knobs):
        q, k, v, rk, rv = (t.detach().half() for t in rmha_inputs(2, 1, L, L, 16, per_head=True))
        seed = torch.zeros(1, dtype=torch.int64, device=q.device) if dropout_p else None
        with _launch.override("rmha_fwd", block_m=64, block_n=32, num_warps=4, **knobs):
            [fwd] = plan_forward(q, k, v, rk, rv, None, None, seed, False, dropout_p, 0.25)[-1]
        return fwd.constexprs["LEFT_FLOAT"]

    assert left_float(200) and not left_float(200, 0.1) and not left_float(200, diag=0)
    assert left_float(200, 0.1, left_float=1) and not left_float(200, left_float=0)


def test_key_bits_are_planned_from_four_key_blocks_up_to_32():
    """Packing a sequence's padding into bits per program (``KEY_BITS``: the bits per column, a
    power of two) pays from four key blocks (B256 h2 L200: seven 32-key blocks forward, four
    64-key blocks backward), not over three (L = 75) nor one (L = 50); an int32 holds 32 blocks;
    without a padding mask there is nothing to pack; the ``key_bits`` knob forces it either way."""
    from fastpe.kernels.triton import _launch
    from fastpe.kernels.triton.rmha import plan_backward, plan_forward

    def key_bits(L, dh=64, padded=True, block_n=0, **knobs):
        q, k, v, rk, rv = (t.detach().half() for t in rmha_inputs(2, 1, L, L, dh, per_head=True))
        kpm = torch.zeros(2, L, dtype=torch.bool, device=q.device) if padded else None
        sizes = dict(block_n=block_n) if block_n else {}
        with _launch.override("rmha_fwd", **sizes, **knobs), _launch.override("rmha_bwd", **sizes, **knobs):
            out, lse, p_sums, [fwd] = plan_forward(q, k, v, rk, rv, kpm, None, None, False, 0.0, 0.25)
            bwd = plan_backward(q, q, k, v, rk, rv, kpm, None, None, out, lse, p_sums, False, 0.0, 0.25)[-1][0]
        return fwd.constexprs["KEY_BITS"], bwd.constexprs["KEY_BITS"]

    assert key_bits(200)[0] == 8 and key_bits(75, dh=90) == (0, 0) and key_bits(50, dh=32) == (0, 0)
    assert key_bits(200, padded=False) == (0, 0)
    assert key_bits(512, block_n=16) == (32, 32) and key_bits(513, block_n=16) == (0, 0)
    assert key_bits(75, dh=90, key_bits=1)[0] == 4 and key_bits(200, key_bits=0) == (0, 0)


def test_packed_conversions_need_sm80_and_a_compiled_kernel(monkeypatch):
    """The band gathers' inline ``cvt.rn.{bf16x2,f16x2}.f32`` (rmha ``_round_pack``), and the stores
    of 16-bit rows that are not 16-byte aligned in column pairs (``_store_rows``): never under the
    interpreter (these tests run the portable forms, the same bits), never before sm_80 (the
    instruction does not exist there), and on for the sm_90a card planned without a GPU."""
    from fastpe.kernels.triton import _launch
    from fastpe.kernels.triton.rmha import plan_forward

    q, k, v, rk, rv = (t.detach().half() for t in rmha_inputs(1, 1, 20, 20, 16, per_head=True))
    [launch] = plan_forward(q, k, v, rk, rv, None, None, None, False, 0.0, 0.25)[-1]
    assert launch.constexprs["CVT_ASM"] is _launch.packed_cvt(q.device)
    monkeypatch.setattr(_launch, "triton_interpreter_enabled", lambda: True)
    assert not _launch.packed_cvt(torch.device("cpu"))
    monkeypatch.setattr(_launch, "triton_interpreter_enabled", lambda: False)
    assert _launch.packed_cvt(torch.device("cpu"))
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert _launch.packed_cvt(torch.device("cuda", 0)) is expected
