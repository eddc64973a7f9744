"""Rotary and Rotatory: the torch backend against the float64 reference, outputs and gradients."""

import pytest
import torch

from fastpe.ops import rotary, rotatory
from helpers import assert_matches_reference, randn


def positions_for(kind, b, L, rows, gen):
    if kind == "none":
        return None
    if kind == "1d":
        return torch.randint(0, rows, (L,), generator=gen)
    return torch.randint(0, rows, (b, L), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
@pytest.mark.parametrize("b,L,h,D", [(2, 1, 1, 2), (3, 7, 2, 30), (2, 50, 3, 50), (1, 75, 1, 90)])
def test_rotary_matches_reference(dtype, interleaved, pos_kind, b, L, h, D):
    gen = torch.Generator().manual_seed(L * D)
    x = randn(b, L, h, D, gen=gen, dtype=torch.float64)
    angles = randn(L + 3, D // 2, gen=gen, dtype=torch.float64)
    positions = positions_for(pos_kind, b, L, L + 3, gen)
    fn = lambda x, a: rotary(x, a, positions=positions, interleaved=interleaved, backend="torch")  # noqa: E731
    ref = lambda x, a: rotary(x, a, positions=positions, interleaved=interleaved, backend="reference")  # noqa: E731
    assert_matches_reference(fn, ref, (x, angles), dtype, ["x", "angles"])


def test_rotary_accepts_transposed_views_and_3d():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)  # [B, h, L, D]
    angles = torch.randn(9, 4, dtype=torch.float64)
    view = x.transpose(1, 2)  # [B, L, h, D], not contiguous
    torch.testing.assert_close(
        rotary(view, angles, backend="torch"), rotary(view.contiguous(), angles, backend="reference")
    )
    x3 = torch.randn(2, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(rotary(x3, angles, backend="torch"), rotary(x3[:, :, None], angles, backend="reference")[:, :, 0])


@pytest.mark.parametrize("mode", ["add", "rotate"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pos_kind", ["none", "2d"])
def test_rotatory_matches_reference(mode, dtype, pos_kind):
    gen = torch.Generator().manual_seed(5)
    x = randn(3, 11, 30, gen=gen, dtype=torch.float64)
    angles = randn(20, 15, gen=gen, dtype=torch.float64)
    positions = positions_for(pos_kind, 3, 11, 20, gen)
    fn = lambda x, a: rotatory(x, a, mode=mode, positions=positions, backend="torch")  # noqa: E731
    ref = lambda x, a: rotatory(x, a, mode=mode, positions=positions, backend="reference")  # noqa: E731
    assert_matches_reference(fn, ref, (x, angles), dtype, ["x", "angles"])


def test_rotatory_rotate_preserves_pair_norms():
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    y = rotatory(x, torch.randn(6, 5, dtype=torch.float64), mode="rotate")
    torch.testing.assert_close(y.view(2, 6, 5, 2).norm(dim=-1), x.view(2, 6, 5, 2).norm(dim=-1))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck(backend):
    x = torch.randn(2, 4, 2, 6, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[4, 0, 1, 1], [2, 3, 3, 0]])
    assert torch.autograd.gradcheck(lambda x, a: rotary(x, a, positions=positions, backend=backend), (x, angles))
    x3 = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: rotatory(x, a, mode="add", backend=backend), (x3, angles))


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: rotary(torch.randn(2, 3, 4), torch.randn(3, 3)), ValueError, "expected 2 angles per position"),
        (lambda: rotary(torch.randn(2, 3, 5), torch.randn(3, 2)), ValueError, "must be even"),
        (lambda: rotary(torch.randn(3, 4), torch.randn(3, 2)), ValueError, "x: expected 3 or 4 dims"),
        (lambda: rotary(torch.ones(2, 3, 4, dtype=torch.long), torch.randn(3, 2)), TypeError, "x: expected a floating-point"),
        (lambda: rotary(torch.randn(2, 9, 4), torch.randn(8, 2)), ValueError, "exceeds the configured maximum of 8"),
        (lambda: rotary(torch.randn(2, 3, 4), torch.randn(8, 2), positions=torch.tensor([0, 1, 8])), ValueError, r"\[0, 7\]"),
        (lambda: rotary(torch.randn(2, 3, 4), torch.randn(8, 2), positions=torch.tensor([0.0, 1, 2])), TypeError, "int64 or int32"),
        (lambda: rotary(torch.randn(2, 3, 4), torch.randn(8, 2), positions=torch.zeros(3, 3, dtype=torch.long)), ValueError, "positions: expected shape"),
        (lambda: rotatory(torch.randn(2, 3, 4), torch.randn(8, 2), mode="spin"), ValueError, "mode must be"),
        (lambda: rotatory(torch.randn(2, 3, 1, 4), torch.randn(8, 2)), ValueError, r"x: expected 3 dims"),
    ],
)
def test_bad_input_raises_clear_error(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
