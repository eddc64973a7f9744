"""Concat-projection with backend="cuda" against the float64 reference (outputs and gradients of
x, table, weight, bias), operator registration. Runs on a GPU, and on the CPU through the
emulation of the kernels (see cuda_target.py)."""

import pytest
import torch

from cuda_target import ops_namespace, target  # noqa: F401  (fixture)
from helpers import assert_matches_reference, concat_inputs, concat_runner


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("b,L,d_in,d_pos,d_out", [(2, 1, 4, 4, 4), (3, 7, 30, 30, 30), (2, 50, 90, 16, 50), (4, 35, 64, 64, 64)])
def test_matches_reference(target, dtype, pos_kind, bias, b, L, d_in, d_pos, d_out):
    inputs, positions = concat_inputs(b, L, d_in, d_pos, d_out, bias, pos_kind, device=target.device)
    assert_matches_reference(concat_runner("cuda", positions), concat_runner("reference", positions), inputs, dtype, ["x", "table", "weight", "bias"])


def test_opcheck(target):
    ops = ops_namespace(target)
    dev = target.device
    x = torch.randn(2, 5, 6, device=dev, requires_grad=True)
    table = torch.randn(7, 4, device=dev, requires_grad=True)
    weight = torch.randn(3, 10, device=dev, requires_grad=True)
    bias = torch.randn(3, device=dev, requires_grad=True)
    for positions in (None, torch.tensor([6, 0, 1, 1, 2], device=dev), torch.randint(0, 7, (2, 5), device=dev)):
        for b in (bias, None):
            torch.library.opcheck(ops.concat_projection_fwd.default, (x, table, weight, b, positions))
        torch.library.opcheck(ops.concat_projection_bwd.default, (torch.randn(2, 5, 3, device=dev), x.detach(),
                                                                   table.detach(), weight.detach(), positions, True))
