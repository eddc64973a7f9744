"""CARCA and the SASRec baseline: shapes, masking, padding, candidates without positions."""

from __future__ import annotations

import pytest
import torch

import fastpe
from fastpe.models import CARCA, SASRec, build_model

N_ITEMS, D, L = 40, 16, 8


def carca(encoding="learnt", causal=False, **kw):
    torch.manual_seed(0)
    return CARCA(N_ITEMS, D, n_blocks=2, n_heads=2, dropout=0.0, max_len=L, encoding=encoding,
                 item_features=torch.rand(N_ITEMS + 1, 5), context_dim=6, causal=causal, **kw).eval()


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (b, L), generator=g)
    items[0, :3] = 0  # left padding
    items[1, :] = 0  # a fully padded row
    items[2, :L - 1] = 0  # a single item
    ctx = torch.rand(b, L, 6, generator=g)
    cands = torch.randint(1, N_ITEMS + 1, (b, 1, 7), generator=g)
    cctx = torch.rand(b, 1, 6, generator=g)
    return items, ctx, cands, cctx


@pytest.mark.parametrize("encoding", fastpe.ENCODINGS)
@pytest.mark.parametrize("causal", [False, True])
def test_carca_shapes_finite_and_padding_does_not_leak(encoding, causal):
    model = carca(encoding, causal)
    items, ctx, cands, cctx = batch()
    with torch.no_grad():
        out = model(items, ctx, cands, cctx)
        assert out.shape == (4, 1, 7) and torch.isfinite(out).all()
        # what sits at padded positions (ids, context) must not matter: pass the mask explicitly
        padding = items == 0
        garbage = torch.where(padding, torch.randint(1, N_ITEMS + 1, items.shape), items)
        noisy_ctx = torch.where(padding[..., None], torch.rand_like(ctx) * 9, ctx)
        p1, m1 = model.encode(items, ctx)
        p2, m2 = model.encode(garbage, noisy_ctx, padding_mask=padding)
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.score(p1, m1, cands, cctx), model.score(p2, m2, cands, cctx), atol=1e-5, rtol=1e-5)
        assert (p1[padding] == 0).all()


def test_carca_padding_embedding_row_does_not_leak():
    model = carca("abs")
    items, ctx, cands, cctx = batch()
    with torch.no_grad():
        before = model(items, ctx, cands, cctx)
        model.items.embedding.weight[0].normal_()
        model.items.item_features[0].fill_(3.0)
        torch.testing.assert_close(model(items, ctx, cands, cctx), before)


def test_carca_fully_padded_batch_is_finite_with_gradients():
    model = carca("rmha-4").train()
    items = torch.zeros(3, L, dtype=torch.long)
    out = model(items, torch.rand(3, L, 6), torch.randint(1, N_ITEMS, (3, 1, 4)), torch.rand(3, 1, 6))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_candidates_are_independent_and_carry_no_position():
    model = carca("learnt")
    items, ctx, cands, cctx = batch()
    with torch.no_grad():
        out = model(items, ctx, cands, cctx)
        perm = torch.randperm(7)
        torch.testing.assert_close(model(items, ctx, cands[..., perm], cctx), out[..., perm])
        # one candidate alone scores as it does among others
        torch.testing.assert_close(model(items, ctx, cands[..., 2:3], cctx), out[..., 2:3], atol=1e-6, rtol=1e-5)


def test_bidirectional_profile_is_order_blind_without_encoding_but_not_with_one():
    items, ctx, cands, cctx = batch()
    items[3] = torch.arange(1, L + 1)
    rev = items.clone()
    rev[3] = items[3].flip(0)
    rctx = ctx.clone()
    rctx[3] = ctx[3].flip(0)
    with torch.no_grad():
        none = carca("none")
        torch.testing.assert_close(none(rev, rctx, cands, cctx)[3], none(items, ctx, cands, cctx)[3], atol=1e-5, rtol=1e-5)
        for encoding in ("learnt", "rope", "rmha-4", "rotatory", "abs+con"):  # absolute, in attention, relative
            model = carca(encoding)
            assert not torch.allclose(model(rev, rctx, cands, cctx)[3], model(items, ctx, cands, cctx)[3], atol=1e-4), encoding


@pytest.mark.parametrize("encoding", fastpe.ENCODINGS)
def test_next_slot_keeps_none_order_blind_and_lets_every_encoding_see_order(encoding):
    # The slot sits after the most recent item; without an encoding it is one more set member.
    items, ctx, cands, cctx = batch()
    items[3] = torch.arange(1, L + 1)
    rev, rctx = items.clone(), ctx.clone()
    rev[3], rctx[3] = items[3].flip(0), ctx[3].flip(0)
    model = carca(encoding, next_slot=True)
    with torch.no_grad():
        out = model(items, ctx, cands, cctx)
        assert out.shape == (4, 1, 7) and torch.isfinite(out).all()
        profile, padding = model.encode(items, ctx)
        assert profile.shape == (4, L + 1, D) and not padding[:, -1].any()
        flipped = model(rev, rctx, cands, cctx)[3]
    if encoding == "none":
        torch.testing.assert_close(flipped, out[3], atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(flipped, out[3], atol=1e-4), encoding


def test_next_slot_needs_a_bidirectional_encoder_and_a_length_within_max_len():
    with pytest.raises(ValueError, match="bidirectional"):
        carca("rope", causal=True, next_slot=True)
    model = carca("rope", next_slot=True)
    with pytest.raises(ValueError, match="max_len"):
        model.encode(torch.ones(1, L + 1, dtype=torch.long), torch.rand(1, L + 1, 6))


def test_causal_per_position_scores_do_not_see_the_future():
    model = carca("rope", causal=True)
    items, ctx, _, _ = batch()
    cands = torch.randint(1, N_ITEMS + 1, (4, L, 3))
    cctx = torch.rand(4, L, 6)
    with torch.no_grad():
        out = model(items, ctx, cands, cctx, per_position=True)
        changed = items.clone()
        changed[:, -1] = (changed[:, -1] % N_ITEMS) + 1  # the last item changes
        out2 = model(changed, ctx, cands, cctx, per_position=True)
    torch.testing.assert_close(out[:, :-1], out2[:, :-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[3, -1], out2[3, -1])


def test_per_position_needs_a_causal_encoder():
    model = carca("none", causal=False)
    items, ctx, _, _ = batch()
    with pytest.raises(ValueError, match="causal"):
        model(items, ctx, torch.ones(4, L, 2, dtype=torch.long), torch.rand(4, L, 6), per_position=True)


def test_carca_without_features_and_residual_options():
    for cross in ("mul", "add", "none"):
        model = CARCA(N_ITEMS, D, 1, 1, 0.0, L, "abs", cross_residual=cross, residual="add").eval()
        items, _, cands, _ = batch()
        assert torch.isfinite(model(items, None, cands)).all()
    with pytest.raises(ValueError, match="cross_residual"):
        CARCA(N_ITEMS, D, cross_residual="sum")
    with pytest.raises(ValueError, match="context"):
        carca()(batch()[0], None, batch()[2], None)


@pytest.mark.parametrize("encoding", ["none", "learnt", "rmha-4", "rope", "rotatory+con"])
def test_sasrec_shapes_and_padding(encoding):
    torch.manual_seed(0)
    model = SASRec(N_ITEMS, D, 2, 2, 0.0, L, encoding).eval()
    items, _, _, _ = batch()
    cands = torch.randint(1, N_ITEMS + 1, (4, L, 3))
    with torch.no_grad():
        out = model(items, None, cands, per_position=True)
        assert out.shape == (4, L, 3) and torch.isfinite(out).all()
        last = model(items, None, cands[:, -1:])
        torch.testing.assert_close(last[:, 0], out[:, -1])
        padding = items == 0
        garbage = torch.where(padding, torch.randint(1, N_ITEMS + 1, items.shape), items)
        p1, m = model.encode(items)
        p2, _ = model.encode(garbage, padding_mask=padding)
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
        # dot-product scoring with the shared item table
        e = model.items.embedding(cands[:, -1:])
        torch.testing.assert_close(last, torch.einsum("bd,btnd->btn", p1[:, -1], e), atol=1e-5, rtol=1e-5)


def test_build_model():
    assert isinstance(build_model("CARCA", 10, d_model=8, max_len=4), CARCA)
    assert isinstance(build_model("sasrec", 10, d_model=8, max_len=4), SASRec)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("bert4rec", 10)
    with pytest.raises(ValueError, match="unknown positional encoding"):
        build_model("carca", 10, encoding="alibi")


@pytest.mark.parametrize("model", [carca("learnt"), CARCA(N_ITEMS, D, 1, 1, 0.0, L, "abs").eval(),
                                   SASRec(N_ITEMS, D, 1, 1, 0.0, L, "rope").eval()])
def test_item_table_scoring_matches_direct_scoring(model):
    """Full ranking gathers per-item terms once; it must give the scores of the direct path."""
    items, ctx, _, cctx = batch()
    if model.context_dim == 0:
        ctx = cctx = None
    cands = torch.arange(1, N_ITEMS + 1).expand(4, 1, N_ITEMS)
    with torch.no_grad():
        profile, padding = model.encode(items, ctx)
        direct = model.score(profile, padding, cands, cctx)
        fast = model.score(profile, padding, cands, cctx, item_table=model.candidate_table())
    torch.testing.assert_close(fast, direct, atol=1e-5, rtol=1e-5)
