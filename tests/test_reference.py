"""The oracle itself, checked against loops written straight from the formulas (float64, tiny)."""

import math

import pytest
import torch

from fastpe.nn.encodings import sinusoidal_table
from fastpe.reference import (
    concat_projection_reference,
    relative_attention_direct_port,
    relative_attention_reference,
    rotary_reference,
    rotatory_add_reference,
)
from helpers import make_masks


def loop_relative_attention(q, k, v, rel_k, rel_v, allowed):
    """Shaw et al. relative attention one (b, h, i) at a time; ``allowed[b, h, i, j]`` bool."""
    b_, h_, lq, dh = q.shape
    lk = k.shape[2]
    kmax = (rel_k.shape[-2] - 1) // 2
    out = torch.zeros(b_, h_, lq, v.shape[-1], dtype=q.dtype)
    for b in range(b_):
        for h in range(h_):
            tk = rel_k[h % rel_k.shape[0]]
            tv = rel_v[h % rel_v.shape[0]]
            for i in range(lq):
                js = [j for j in range(lk) if allowed[b, h, i, j]]
                if not js:
                    continue
                r = [min(max(j - i, -kmax), kmax) + kmax for j in js]
                logits = torch.stack([(q[b, h, i] @ (k[b, h, j] + tk[rj])) / math.sqrt(dh) for j, rj in zip(js, r)])
                p = torch.softmax(logits, 0)
                out[b, h, i] = sum(pj * (v[b, h, j] + tv[rj]) for pj, j, rj in zip(p, js, r))
    return out


@pytest.mark.parametrize("kind", ["none", "padding+causal", "fully_padded", "bool_3d"])
@pytest.mark.parametrize("per_head", [False, True])
def test_relative_attention_reference_matches_loops(kind, per_head):
    b, h, lq, lk, dh, kmax = 2, 2, 6, 6, 5, 2
    q, k, v = (torch.randn(b, h, n, dh, dtype=torch.float64) for n in (lq, lk, lk))
    rel_k = torch.randn(h if per_head else 1, 2 * kmax + 1, dh, dtype=torch.float64)
    rel_v = torch.randn(h if per_head else 1, 2 * kmax + 1, dh, dtype=torch.float64)
    masks = make_masks(kind, b, h, lq, lk)
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool)
    kpm, attn = masks["key_padding_mask"], masks["attn_mask"]
    if kpm is not None:
        allowed &= ~kpm[:, None, None, :]
    if attn is not None:
        allowed &= ~attn.view(b, h, lq, lk)
    if masks["is_causal"]:
        allowed &= torch.ones(lq, lk, dtype=torch.bool).tril()
    bias = None if attn is None else torch.zeros(b, h, lq, lk, dtype=torch.float64).masked_fill(attn.view(b, h, lq, lk), -math.inf)
    expected = loop_relative_attention(q, k, v, rel_k, rel_v, allowed)
    args = (q, k, v, rel_k, rel_v, kpm, bias, masks["is_causal"])
    torch.testing.assert_close(relative_attention_reference(*args), expected)
    torch.testing.assert_close(relative_attention_direct_port(*args), expected)


def test_relative_attention_reference_unequal_lengths():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    k, v = torch.randn(1, 1, 8, 4, dtype=torch.float64), torch.randn(1, 1, 8, 4, dtype=torch.float64)
    rel = torch.randn(1, 9, 4, dtype=torch.float64), torch.randn(1, 9, 4, dtype=torch.float64)
    allowed = torch.ones(1, 1, 3, 8, dtype=torch.bool)
    torch.testing.assert_close(relative_attention_reference(q, k, v, *rel), loop_relative_attention(q, k, v, *rel, allowed))


def test_rotary_reference_matches_complex_rotation():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    angles = torch.randn(7, 4, dtype=torch.float64)
    positions = torch.tensor([6, 0, 3, 3, 1])
    rot = torch.polar(torch.ones(5, 4, dtype=torch.float64), angles[positions])[:, None, :]
    # interleaved pairs (2m, 2m+1) are the real/imaginary parts of one complex number
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2).contiguous()) * rot).flatten(-2)
    torch.testing.assert_close(rotary_reference(x, angles, positions, interleaved=True), expected)
    # half-split pairs (m, m + D/2)
    xc = torch.complex(x[..., :4], x[..., 4:]) * rot
    torch.testing.assert_close(rotary_reference(x, angles, positions, interleaved=False), torch.cat((xc.real, xc.imag), -1))


def test_rotatory_code_formula():
    x = torch.zeros(1, 3, 6, dtype=torch.float64)
    theta = torch.randn(3, 3, dtype=torch.float64)
    y = rotatory_add_reference(x, theta)
    for p in range(3):
        for j in range(3):
            assert y[0, p, 2 * j] == pytest.approx((-1) ** j * math.sin(theta[p, j]))
            assert y[0, p, 2 * j + 1] == pytest.approx(math.cos(theta[p, j]))


def test_concat_projection_reference_is_linear_of_concat():
    x, table = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    w, b = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    positions = torch.tensor([[8, 1, 2, 3], [0, 0, 0, 0]])
    y = concat_projection_reference(x, table, w, b, positions)
    for bi in range(2):
        for i in range(4):
            feat = torch.cat((x[bi, i], table[positions[bi, i]]))
            torch.testing.assert_close(y[bi, i], w @ feat + b)


def test_sinusoidal_table_formula():
    table = sinusoidal_table(50, 8)
    for p in (0, 1, 17, 49):
        for j in range(4):
            angle = p / 10000 ** (2 * j / 8)
            assert table[p, 2 * j].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * j + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
