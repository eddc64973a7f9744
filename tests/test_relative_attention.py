"""RMHA-k: the torch backend against the float64 reference, outputs and every gradient."""

import functools

import pytest
import torch

import fastpe
from fastpe.ops.relative_attention import relative_attention
from fastpe.reference import relative_attention_direct_port
from helpers import MASK_KINDS, assert_matches_reference, make_masks, randn


def rmha_inputs(b, h, lq, lk, dh, kmax=4, per_head=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = randn(b, h, lq, dh, gen=gen, dtype=torch.float64)
    k = randn(b, h, lk, dh, gen=gen, dtype=torch.float64)
    v = randn(b, h, lk, dh, gen=gen, dtype=torch.float64)
    shape = (h, 2 * kmax + 1, dh) if per_head else (2 * kmax + 1, dh)
    return q, k, v, randn(*shape, gen=gen, dtype=torch.float64), randn(*shape, gen=gen, dtype=torch.float64)


def op(backend, **kw):
    return functools.partial(_call, backend=backend, **kw)


def _call(q, k, v, rk, rv, **kw):
    return relative_attention(q, k, v, rk, rv, **kw)


NAMES = ["q", "k", "v", "rel_k", "rel_v"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "b,h,L,dh",
    [(2, 2, 1, 8), (3, 1, 7, 30), (2, 3, 50, 50), (2, 2, 75, 90), (1, 2, 200, 32)],
)
def test_torch_matches_reference_shapes(dtype, b, h, L, dh):
    inputs = rmha_inputs(b, h, L, L, dh)
    masks = make_masks("padding", b, h, L, L)
    assert_matches_reference(op("torch", **masks), op("reference", **masks), inputs, dtype, NAMES)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_torch_matches_reference_masks(kind, per_head):
    b, h, L = 3, 2, 13
    inputs = rmha_inputs(b, h, L, L, 6, kmax=3, per_head=per_head)
    masks = make_masks(kind, b, h, L, L)
    assert_matches_reference(op("torch", **masks), op("reference", **masks), inputs, torch.float32, NAMES)


def test_unequal_query_and_key_lengths():
    inputs = rmha_inputs(2, 2, 5, 11, 8)
    masks = make_masks("padding+causal", 2, 2, 5, 11)
    assert_matches_reference(op("torch", **masks), op("reference", **masks), inputs, torch.float64, NAMES)


def test_clipping_distance_zero_and_large():
    for kmax in (0, 20):
        inputs = rmha_inputs(2, 1, 9, 9, 4, kmax=kmax)
        assert_matches_reference(op("torch"), op("reference"), inputs, torch.float64, NAMES)


def test_gradcheck_torch_backend():
    q, k, v, rk, rv = rmha_inputs(2, 2, 5, 5, 3, kmax=2)
    masks = make_masks("padding+causal", 2, 2, 5, 5)
    assert torch.autograd.gradcheck(lambda *t: relative_attention(*t, backend="torch", **masks), (q, k, v, rk, rv))


def test_gradcheck_reference_with_fully_padded_row():
    q, k, v, rk, rv = rmha_inputs(2, 1, 4, 4, 3, kmax=1)
    masks = make_masks("fully_padded", 2, 1, 4, 4)
    assert torch.autograd.gradcheck(lambda *t: relative_attention(*t, backend="reference", **masks), (q, k, v, rk, rv))


def test_fully_padded_rows_are_zero_with_zero_gradients():
    q, k, v, rk, rv = rmha_inputs(2, 2, 6, 6, 4)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True
    for backend in ("torch", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rk, rv)]
        out = relative_attention(*leaves, key_padding_mask=kpm, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        out.sum().backward()
        for leaf in leaves:
            assert torch.isfinite(leaf.grad).all()
        assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))


def test_direct_port_agrees_with_reference():
    q, k, v, rk, rv = rmha_inputs(2, 2, 9, 9, 5)
    masks = make_masks("padding", 2, 2, 9, 9)
    ref = relative_attention(q, k, v, rk, rv, backend="reference", **masks)
    port = relative_attention_direct_port(q, k, v, rk[None], rv[None], masks["key_padding_mask"])
    torch.testing.assert_close(port, ref)


def test_dropout_same_mask_as_reference_for_same_seed():
    q, k, v, rk, rv = rmha_inputs(2, 2, 10, 10, 4)
    torch.manual_seed(3)
    a = relative_attention(q, k, v, rk, rv, dropout_p=0.3, backend="torch")
    torch.manual_seed(3)
    b = relative_attention(q, k, v, rk, rv, dropout_p=0.3, backend="reference")
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, relative_attention(q, k, v, rk, rv, backend="torch"))


def test_need_weights_returns_probabilities():
    q, k, v, rk, rv = rmha_inputs(2, 2, 7, 7, 4)
    masks = make_masks("fully_padded", 2, 2, 7, 7)
    out, weights = relative_attention(q, k, v, rk, rv, need_weights=True, **masks)
    torch.testing.assert_close(out, relative_attention(q, k, v, rk, rv, backend="reference", **masks))
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(2, 7, dtype=torch.float64))
    assert torch.equal(weights[0], torch.zeros_like(weights[0]))


def test_inputs_are_not_modified():
    inputs = rmha_inputs(2, 2, 7, 7, 4)
    before = [t.detach().clone() for t in inputs]
    relative_attention(*inputs, **make_masks("padding+causal", 2, 2, 7, 7), dropout_p=0.2).sum().backward()
    for t, t0 in zip(inputs, before):
        assert torch.equal(t.detach(), t0)


def _good():
    return rmha_inputs(2, 2, 5, 5, 4)


@pytest.mark.parametrize(
    "mutate,exc,words",
    [
        (lambda a, kw: a.__setitem__(0, a[0][0]), ValueError, "query: expected 4 dims"),
        (lambda a, kw: a.__setitem__(1, a[1][:1]), ValueError, "key: expected shape"),
        (lambda a, kw: a.__setitem__(2, a[2][:, :, :3]), ValueError, "value: expected shape"),
        (lambda a, kw: a.__setitem__(0, a[0].long()), TypeError, "query: expected a floating-point"),
        (lambda a, kw: a.__setitem__(1, a[1].float()), TypeError, "share one dtype"),
        (lambda a, kw: a.__setitem__(3, a[3][:8]), ValueError, "odd number"),
        (lambda a, kw: a.__setitem__(3, a[3][:, :3]), ValueError, "head size 4"),
        (lambda a, kw: a.__setitem__(4, a[4][:7]), ValueError, "same number of rows"),
        (lambda a, kw: kw.update(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask: expected shape"),
        (lambda a, kw: kw.update(key_padding_mask=torch.zeros(2, 5, dtype=torch.long)), TypeError, "key_padding_mask: expected bool"),
        (lambda a, kw: kw.update(attn_mask=torch.zeros(5, 4, dtype=torch.bool)), ValueError, "attn_mask: expected shape"),
        (lambda a, kw: kw.update(attn_mask=torch.zeros(5, 5, dtype=torch.int32)), TypeError, "attn_mask: expected bool"),
        (lambda a, kw: kw.update(dropout_p=1.0), ValueError, "dropout_p"),
        (lambda a, kw: kw.update(backend="bogus"), ValueError, "unknown backend"),
    ],
)
def test_bad_input_raises_clear_error(mutate, exc, words):
    args, kwargs = list(_good()), {}
    mutate(args, kwargs)
    with pytest.raises(exc, match=words):
        relative_attention(*args, **kwargs)


def test_explicit_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fastpe.BackendUnavailableError, match="needs CUDA tensors"):
        relative_attention(*_good(), backend="cuda")
    with pytest.raises(fastpe.BackendUnavailableError, match="triton"):
        relative_attention(*_good(), backend="triton")
