"""Concat-projection: the torch backend against the float64 reference, outputs and gradients."""

import pytest
import torch

from fastpe.ops import concat_projection
from helpers import assert_matches_reference, concat_inputs, concat_runner


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("b,L,d_in,d_pos,d_out", [(2, 1, 4, 4, 4), (3, 7, 30, 30, 30), (2, 50, 90, 16, 50)])
def test_matches_reference(dtype, pos_kind, bias, b, L, d_in, d_pos, d_out):
    inputs, positions = concat_inputs(b, L, d_in, d_pos, d_out, bias, pos_kind)
    assert_matches_reference(concat_runner("torch", positions), concat_runner("reference", positions), inputs, dtype, ["x", "table", "weight", "bias"])


def test_gradcheck_torch_backend():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[4, 0, 1], [1, 1, 1]])
    assert torch.autograd.gradcheck(lambda *a: concat_projection(*a, positions=positions, backend="torch"), (x, t, w, b))


def test_autocast_computes_in_autocast_dtype():
    x, t, w = torch.randn(2, 3, 4), torch.randn(5, 2), torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = concat_projection(x, t, w, positions=None)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), concat_projection(x, t, w, backend="reference"), atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: concat_projection(torch.randn(2, 3, 4), torch.randn(5, 2), torch.randn(3, 7)), r"weight: expected shape \[d_out, d_in \+ d_pos = 4 \+ 2\]"),
        (lambda: concat_projection(torch.randn(2, 3, 4), torch.randn(5, 2), torch.randn(3, 6), torch.randn(4)), "bias: expected shape"),
        (lambda: concat_projection(torch.randn(2, 6, 4), torch.randn(5, 2), torch.randn(3, 6)), "exceeds the configured maximum of 5"),
        (lambda: concat_projection(torch.randn(2, 3), torch.randn(5, 2), torch.randn(3, 6)), "x: expected 3 dims"),
        (lambda: concat_projection(torch.randn(2, 3, 4), torch.randn(5, 2, 1), torch.randn(3, 6)), "table: expected 2 dims"),
    ],
)
def test_bad_input_raises_clear_error(call, words):
    with pytest.raises(ValueError, match=words):
        call()
