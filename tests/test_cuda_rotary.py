"""Rotary and Rotatory with backend="cuda" against the float64 reference (outputs, x and angle
gradients), strided inputs, deterministic angle gradients, operator registration. Runs on a GPU,
and on the CPU through the emulation of the kernels (see cuda_target.py)."""

import pytest
import torch

from cuda_target import ops_namespace, target  # noqa: F401  (fixture)
from fastpe.ops import rotary, rotatory
from helpers import assert_matches_reference, randn

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def positions_for(kind, b, L, rows, gen, device):
    if kind == "none":
        return None
    shape = (L,) if kind == "1d" else (b, L)
    return torch.randint(0, rows, shape, generator=gen).to(device)


def leaf(t, device):
    return t.detach().to(device).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
@pytest.mark.parametrize("b,L,h,D", [(2, 1, 1, 2), (3, 7, 2, 30), (2, 50, 3, 64), (1, 75, 1, 90)])
def test_rotary_matches_reference(target, dtype, interleaved, pos_kind, b, L, h, D):
    gen = torch.Generator().manual_seed(L * D)
    x = leaf(randn(b, L, h, D, gen=gen, dtype=torch.float64), target.device)
    angles = leaf(randn(L + 3, D // 2, gen=gen, dtype=torch.float64), target.device)
    positions = positions_for(pos_kind, b, L, L + 3, gen, target.device)

    def run(backend):
        return lambda x, a: rotary(x, a, positions=positions, interleaved=interleaved, backend=backend)

    assert_matches_reference(run("cuda"), run("reference"), (x, angles), dtype, ["x", "angles"])


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_strided_views_and_3d(target, interleaved):
    gen = torch.Generator().manual_seed(4)
    base = randn(2, 3, 9, 8, gen=gen, dtype=torch.float64).detach().to(target.device)  # [B, h, L, D]
    angles = leaf(randn(9, 4, gen=gen, dtype=torch.float64), target.device)
    x = base.transpose(1, 2).requires_grad_()  # [B, L, h, D], not contiguous
    run = lambda backend: lambda x, a: rotary(x, a, interleaved=interleaved, backend=backend)  # noqa: E731
    assert_matches_reference(run("cuda"), run("reference"), (x, angles), torch.float32, ["x", "angles"])
    every_other = leaf(randn(2, 9, 2, 16, gen=gen, dtype=torch.float64), target.device)[..., ::2]  # stride 2 in D
    assert_matches_reference(run("cuda"), run("reference"), (every_other, angles), torch.float32, ["x", "angles"])
    x3 = leaf(randn(2, 9, 8, gen=gen, dtype=torch.float64), target.device)
    assert_matches_reference(run("cuda"), run("reference"), (x3, angles), torch.bfloat16, ["x", "angles"])


def test_rotary_angles_in_float32_with_bfloat16_x(target):
    """Mixed dtypes (autocast-style): the angle gradient comes back in the angles' dtype."""
    gen = torch.Generator().manual_seed(8)
    x = randn(2, 10, 2, 16, gen=gen).detach().to(target.device, torch.bfloat16).requires_grad_()
    angles = randn(12, 8, gen=gen).detach().to(target.device).requires_grad_()
    y = rotary(x, angles, backend="cuda")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert angles.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = rotary(x.detach().double(), angles.detach().double(), backend="reference")
    torch.testing.assert_close(y.double(), ref, atol=4e-2, rtol=4e-2)


def test_rotary_without_angle_gradient(target):
    x = torch.randn(2, 5, 2, 8, device=target.device, requires_grad=True)
    angles = torch.randn(5, 4, device=target.device)
    rotary(x, angles, backend="cuda").sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    rotary(ref_x, angles, backend="reference").sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("mode", ["add", "rotate"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
def test_rotatory_matches_reference(target, mode, dtype, pos_kind):
    gen = torch.Generator().manual_seed(5)
    x = leaf(randn(3, 11, 30, gen=gen, dtype=torch.float64), target.device)
    angles = leaf(randn(20, 15, gen=gen, dtype=torch.float64), target.device)
    positions = positions_for(pos_kind, 3, 11, 20, gen, target.device)

    def run(backend):
        return lambda x, a: rotatory(x, a, mode=mode, positions=positions, backend=backend)

    assert_matches_reference(run("cuda"), run("reference"), (x, angles), dtype, ["x", "angles"])


def test_rotatory_add_strided_input(target):
    gen = torch.Generator().manual_seed(6)
    x = leaf(randn(9, 3, 16, gen=gen, dtype=torch.float64), target.device).transpose(0, 1)  # [3, 9, 16] view
    angles = leaf(randn(9, 8, gen=gen, dtype=torch.float64), target.device)
    run = lambda backend: lambda x, a: rotatory(x, a, mode="add", backend=backend)  # noqa: E731
    assert_matches_reference(run("cuda"), run("reference"), (x, angles), torch.float32, ["x", "angles"])


@pytest.mark.parametrize("pos_kind", ["none", "2d_repeated"])
def test_angle_gradients_over_long_position_lists(target, pos_kind):
    """Many tokens per position: the angle gradient is summed in segments, then the segments in
    order (the two-pass deterministic reduction)."""
    gen = torch.Generator().manual_seed(12)
    b, L = 300, 4
    x = leaf(randn(b, L, 1, 8, gen=gen, dtype=torch.float64), target.device)
    angles = leaf(randn(6, 4, gen=gen, dtype=torch.float64), target.device)
    positions = None if pos_kind == "none" else torch.randint(0, 2, (b, L), generator=gen).to(target.device)
    run = lambda backend: lambda x, a: rotary(x, a, positions=positions, backend=backend)  # noqa: E731
    assert_matches_reference(run("cuda"), run("reference"), (x, angles), torch.float32, ["x", "angles"])


@pytest.mark.parametrize("which", ["rotary", "rotatory"])
def test_angle_gradients_are_bitwise_deterministic(target, which):
    b, L = (8, 20) if target.emulated else (256, 200)
    gen = torch.Generator().manual_seed(9)
    positions = torch.randint(0, L, (b, L), generator=gen).to(target.device)
    x = randn(b, L, 2, 32, gen=gen).detach().to(target.device, torch.bfloat16)
    angles = randn(L, 16, gen=gen).detach().to(target.device)
    grads = []
    for _ in range(3):
        a = angles.clone().requires_grad_()
        if which == "rotary":
            y = rotary(x, a, positions=positions, backend="cuda")
        else:
            y = rotatory(x[:, :, 0], a, mode="add", positions=positions, backend="cuda")
        y.float().square().sum().backward()
        grads.append(a.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_opcheck(target):
    ops = ops_namespace(target)
    x = torch.randn(2, 6, 3, 8, device=target.device, requires_grad=True)
    angles = torch.randn(7, 4, device=target.device, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 6, 5, 4], [1, 1, 1, 0, 0, 3]], device=target.device)
    for positions in (None, pos):
        for interleaved in (True, False):
            torch.library.opcheck(ops.rotary_fwd.default, (x, angles, positions, interleaved))
            torch.library.opcheck(ops.rotary_bwd.default, (torch.randn_like(x), x.detach(), angles.detach(), positions,
                                                           interleaved, True))
        x3 = x[:, :, 0].detach().requires_grad_()
        torch.library.opcheck(ops.rotatory_add_fwd.default, (x3, angles, positions))
        torch.library.opcheck(ops.rotatory_add_bwd.default, (torch.randn_like(x3), angles.detach(), positions))
