"""The nn.Modules: equivalence with nn.MultiheadAttention, the encodings' math, state_dict, errors."""

import pytest
import torch
from torch import nn

import fastpe
from fastpe.nn import (
    ConcatEncoding,
    LearntEncoding,
    MultiheadAttention,
    NoEncoding,
    RelativeMultiheadAttention,
    RotaryMultiheadAttention,
    RotatoryEncoding,
    SinusoidalEncoding,
)
from fastpe.nn.encodings import sinusoidal_table
from fastpe.reference import relative_attention_reference, rotary_reference
from helpers import make_masks

ATTENTION_CLASSES = [MultiheadAttention, RelativeMultiheadAttention, RotaryMultiheadAttention]


def torch_mha_like(module, **kw):
    """An nn.MultiheadAttention with the same projections as ``module``."""
    ref = nn.MultiheadAttention(module.embed_dim, module.num_heads, batch_first=module.batch_first,
                                kdim=module.kdim, vdim=module.vdim, dtype=torch.float64, **kw)
    ref.load_state_dict({k: v for k, v in module.state_dict().items() if k in ref.state_dict()})
    return ref


@pytest.mark.parametrize("cls", [MultiheadAttention, RelativeMultiheadAttention])
@pytest.mark.parametrize("kind", ["none", "padding", "causal", "bool_2d", "float_bias", "float_padding"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_matches_torch_mha_without_positions(cls, kind, batch_first):
    torch.manual_seed(1)
    m = cls(12, 3, batch_first=batch_first, dtype=torch.float64)
    if cls is RelativeMultiheadAttention:
        nn.init.zeros_(m.relative_key)
        nn.init.zeros_(m.relative_value)
    ref = torch_mha_like(m)
    b, L = 4, 9
    x = torch.randn(b, L, 12, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    masks = make_masks(kind, b, 3, L, L)
    kpm, attn_mask = masks["key_padding_mask"], masks["attn_mask"]
    if kpm is not None and kpm.is_floating_point():
        kpm = kpm.double()
    if attn_mask is not None and attn_mask.is_floating_point():  # [B, 1, L, L] -> PyTorch's [B*h, L, L]
        attn_mask = attn_mask.double().expand(b, 3, L, L).reshape(b * 3, L, L)
    if masks["is_causal"]:
        attn_mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    out, w = m(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask)
    out_ref, w_ref = ref(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)


def test_cross_attention_with_kdim_vdim_matches_torch():
    m = MultiheadAttention(8, 2, kdim=5, vdim=3, dtype=torch.float64)
    ref = torch_mha_like(m)
    q, k, v = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(m(q, k, v)[0], ref(q, k, v)[0])


def test_unbatched_input_and_per_head_weights():
    m = RelativeMultiheadAttention(8, 2, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    out, w = m(x, x, x, average_attn_weights=False)
    assert out.shape == (5, 8) and w.shape == (2, 5, 5)
    torch.testing.assert_close(out, m(x[None], x[None], x[None])[0][0])


@pytest.mark.parametrize("per_head", [False, True])
def test_relative_attention_module_matches_reference_math(per_head):
    torch.manual_seed(2)
    m = RelativeMultiheadAttention(12, 3, max_distance=2, per_head_tables=per_head, dtype=torch.float64)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    masks = make_masks("padding", 2, 3, 7, 7)
    q, k, v = (t.view(2, 7, 3, 4).transpose(1, 2) for t in nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1))
    tables = [t if per_head else t[None] for t in (m.relative_key, m.relative_value)]
    o = relative_attention_reference(q, k, v, *tables, masks["key_padding_mask"])
    expected = m.out_proj(o.transpose(1, 2).reshape(2, 7, 12))
    for need_weights in (True, False):
        out, _ = m(x, x, x, key_padding_mask=masks["key_padding_mask"], need_weights=need_weights)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("learnable", ["none", "frequencies", "angles"])
def test_rotary_module_matches_reference_math(interleaved, learnable):
    m = RotaryMultiheadAttention(12, 2, interleaved=interleaved, learnable=learnable, base=1000.0, max_len=16, dtype=torch.float64)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    q, k, v = (t.view(2, 7, 2, 6) for t in nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1))
    angles = torch.arange(7, dtype=torch.float64)[:, None] * 1000.0 ** (-torch.arange(3, dtype=torch.float64) / 3)
    q, k = (rotary_reference(t, angles, interleaved=interleaved).transpose(1, 2) for t in (q, k))
    o = torch.softmax(q @ k.transpose(-1, -2) / 6**0.5, -1) @ v.transpose(1, 2)
    expected = m.out_proj(o.transpose(1, 2).reshape(2, 7, 12))
    torch.testing.assert_close(m(x, x, x, need_weights=False)[0], expected, atol=1e-6, rtol=1e-6)
    if learnable != "none":
        m(x, x, x)[0].sum().backward()
        param = m.angle_weight if learnable == "angles" else m.inv_freq
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_rope_relative_property_shift_invariance():
    """RoPE scores depend only on j - i: shifting every position leaves the output unchanged."""
    m = RotaryMultiheadAttention(8, 1, learnable="none", dtype=torch.float64)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    q, k, _ = (t.view(1, 6, 1, 8) for t in nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1))
    angles = m.angles(20, x.device).double()
    s0 = rotary_reference(q, angles, torch.arange(6)).squeeze(2) @ rotary_reference(k, angles, torch.arange(6)).squeeze(2).transpose(1, 2)
    s5 = rotary_reference(q, angles, torch.arange(6) + 5).squeeze(2) @ rotary_reference(k, angles, torch.arange(6) + 5).squeeze(2).transpose(1, 2)
    torch.testing.assert_close(s0, s5)


@pytest.mark.parametrize("cls", ATTENTION_CLASSES)
def test_fully_padded_sequence_gives_zero_output_and_finite_grads(cls):
    m = cls(8, 2, dropout=0.0)
    with torch.no_grad():
        m.out_proj.bias.fill_(0.5)
    x = torch.randn(3, 5, 8, requires_grad=True)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1] = True
    kpm[2, :3] = True
    for need_weights in (True, False):
        out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=need_weights, is_causal=False)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls", ATTENTION_CLASSES)
def test_dropout_zero_train_equals_eval(cls):
    m = cls(8, 2, dropout=0.0)
    x = torch.randn(2, 6, 8)
    train_out = m.train()(x, x, x)[0]
    torch.testing.assert_close(train_out, m.eval()(x, x, x)[0])
    m_drop = cls(8, 2, dropout=0.5)
    m_drop.load_state_dict(m.state_dict())
    torch.testing.assert_close(m_drop.eval()(x, x, x)[0], train_out)
    assert not torch.allclose(m_drop.train()(x, x, x)[0], train_out)


def all_modules():
    yield from (fastpe.input_encoding(n, 8, max_len=10) for n in fastpe.ENCODINGS if fastpe.encoding_kind(n) == "input")
    yield RotatoryEncoding(8, 10, mode="rotate")
    yield RelativeMultiheadAttention(8, 2, per_head_tables=True)
    yield from (fastpe.attention_layer(n, 8, 2) for n in ("none", "rmha-4", "rope"))
    yield RotaryMultiheadAttention(8, 2, learnable="angles", max_len=10)


def _forward(m, x):
    return m(x, x, x)[0] if m.kind == "attention" else m(x)


@pytest.mark.parametrize("index", range(len(list(all_modules()))))
def test_state_dict_round_trip(index):
    m, fresh = list(all_modules())[index], list(all_modules())[index]
    with torch.no_grad():  # make the trained state differ from any initialisation
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(2, 6, 8)
    if any(True for _ in m.parameters()):
        assert not torch.allclose(_forward(m, x), _forward(fresh, x))
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(_forward(fresh, x), _forward(m, x))


def test_sinusoidal_encoding_adds_table_and_reverses():
    enc = SinusoidalEncoding(6, max_len=10)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(enc(x), x + sinusoidal_table(10, 6)[:4])
    rev = SinusoidalEncoding(6, max_len=10, reverse=True)
    torch.testing.assert_close(rev(x), x + sinusoidal_table(10, 6)[:4].flip(0))


def test_padding_rows_are_zeroed():
    x = torch.randn(2, 4, 6)
    pad = torch.tensor([[True, True, False, False], [False] * 4])
    for enc in (NoEncoding(6), LearntEncoding(6, 4), ConcatEncoding(6, 4, table="rotatory")):
        y = enc(x, padding_mask=pad)
        assert torch.equal(y[0, :2], torch.zeros(2, 6))
        assert y[0, 2:].abs().sum() > 0


def test_rotatory_add_starts_as_signed_sinusoid():
    enc = RotatoryEncoding(6, 10)
    y = enc(torch.zeros(1, 10, 6))[0]
    table = sinusoidal_table(10, 6)
    torch.testing.assert_close(y[:, 1::2], table[:, 1::2])
    torch.testing.assert_close(y[:, 0::2], table[:, 0::2] * torch.tensor([1.0, -1.0, 1.0]))


def test_rotatory_angle_scale_and_gradient():
    enc = RotatoryEncoding(6, 10, angle_scale=2 * torch.pi / 10000)
    torch.testing.assert_close(enc.angles(), RotatoryEncoding(6, 10).angles())
    enc(torch.randn(2, 5, 6)).sum().backward()
    assert enc.angle_weight.grad[:5].abs().sum() > 0 and enc.angle_weight.grad[5:].abs().sum() == 0


def test_concat_encoding_is_linear_of_concat():
    enc = ConcatEncoding(6, 10, table="learnt")
    x = torch.randn(2, 4, 6)
    expected = enc.proj(torch.cat((x, enc.codes.weight[:4].expand(2, 4, 6)), -1))
    torch.testing.assert_close(enc(x), expected)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: LearntEncoding(8, 5)(torch.randn(2, 6, 8)), ValueError, "length 6 exceeds the configured maximum max_len=5"),
        (lambda: SinusoidalEncoding(8, 5)(torch.randn(2, 4, 7)), ValueError, "expected d_model=8"),
        (lambda: RotatoryEncoding(8, 5)(torch.randn(2, 4)), ValueError, r"x: expected 3 dims \[B, L, d_model\]"),
        (lambda: LearntEncoding(8, 5)(torch.ones(2, 4, 8, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: NoEncoding(8)(torch.randn(2, 4, 8), padding_mask=torch.zeros(2, 4)), ValueError, "padding_mask: expected bool"),
        (lambda: RotatoryEncoding(7, 5), ValueError, "even d_model"),
        (lambda: ConcatEncoding(8, 5, table="rope"), ValueError, "table must be one of"),
        (lambda: RelativeMultiheadAttention(10, 3), ValueError, "divisible by num_heads"),
        (lambda: RotaryMultiheadAttention(6, 2), ValueError, "even head size"),
        (lambda: RotaryMultiheadAttention(8, 2, learnable="angles", max_len=4)(*[torch.randn(1, 5, 8)] * 3), ValueError, "exceeds the configured maximum max_len=4"),
        (lambda: MultiheadAttention(8, 2)(torch.randn(2, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)), ValueError, "same batch size"),
        (lambda: MultiheadAttention(8, 2)(torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 8)), ValueError, "key: expected 8 features"),
        (lambda: MultiheadAttention(8, 2)(torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 4, 8)), ValueError, "same batch and length"),
        (lambda: MultiheadAttention(8, 2)(torch.randn(2, 2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)), ValueError, "query: expected 2 or 3 dims"),
        (lambda: RelativeMultiheadAttention(8, 2)(*[torch.randn(2, 4, 8)] * 3, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask: expected shape"),
        (lambda: RelativeMultiheadAttention(8, 2)(*[torch.randn(2, 4, 8)] * 3, attn_mask=torch.zeros(3, 4, dtype=torch.bool)), ValueError, "attn_mask: expected shape"),
        (lambda: RelativeMultiheadAttention(8, 2)(*[torch.ones(2, 4, 8, dtype=torch.int64)] * 3), TypeError, "query: expected a floating-point"),
        (lambda: fastpe.positional_encoding("alibi", 8), ValueError, "unknown positional encoding 'alibi'"),
    ],
)
def test_bad_input_raises_clear_error(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
