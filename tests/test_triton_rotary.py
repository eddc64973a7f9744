"""Rotary and Rotatory, triton backend: outputs, x and angle gradients against the float64 reference."""

import pytest
import torch

pytest.importorskip("triton")

from fastpe.ops import rotary, rotatory  # noqa: E402
from helpers import assert_matches_reference, randn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def launch_cfg():
    from fastpe.kernels.triton import _launch

    return _launch


def positions_for(kind, b, L, rows, gen):
    if kind == "none":
        return None
    if kind == "1d":
        return torch.randint(0, rows, (L,), generator=gen).to(DEVICE)
    if kind == "repeated":  # every token at one position: the angle gradient of one row sums all
        return torch.full((b, L), rows - 1, dtype=torch.int64, device=DEVICE)
    if kind == "padded":  # left-padded sequences: padding tokens at row 0, items at 1..length
        lengths = torch.randint(0, L + 1, (b,), generator=gen)
        return (torch.arange(L)[None, :] - (L - lengths)[:, None] + 1).clamp(min=0).to(DEVICE)
    return torch.randint(0, rows, (b, L), generator=gen).to(DEVICE)


def _inputs(*shape, rows, gen):
    x = randn(*shape, gen=gen, dtype=torch.float64).detach().to(DEVICE).requires_grad_()
    angles = randn(rows, shape[-1] // 2, gen=gen, dtype=torch.float64).detach().to(DEVICE).requires_grad_()
    return x, angles


def check_rotary(b, L, h, D, dtype, interleaved, pos_kind, transposed=False, tol=None):
    gen = torch.Generator().manual_seed(L * D + h)
    x, angles = _inputs(b, L, h, D, rows=L + 3, gen=gen)
    positions = positions_for(pos_kind, b, L, L + 3, gen)

    def run(backend):
        def fn(x, a):
            if transposed:  # the kernel sees a [B, L, h, D] view of a [B, h, L, D] tensor
                x = x.transpose(1, 2).contiguous().transpose(1, 2)
            return rotary(x, a, positions=positions, interleaved=interleaved, backend=backend)
        return fn

    assert_matches_reference(run("triton"), run("reference"), (x, angles), dtype, ["x", "angles"], tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
@pytest.mark.parametrize("b,L,h,D", [(2, 1, 1, 2), (3, 7, 2, 30), (2, 20, 3, 50)])
def test_rotary_matches_reference(dtype, interleaved, pos_kind, b, L, h, D):
    check_rotary(b, L, h, D, dtype, interleaved, pos_kind)


@pytest.mark.parametrize("pos_kind", ["none", "repeated", "padded"])
def test_rotary_transposed_view_and_repeated_positions(pos_kind):
    check_rotary(3, 9, 2, 8, torch.float32, True, pos_kind, transposed=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "padded"])
def test_rotary_several_batch_and_position_blocks(dtype, pos_kind):
    """Blocks of 2 batches x 4 positions: ragged last blocks on both grid axes, one angle-gradient
    partial row per (batch block, position) or per token, one head masked off, head size 90;
    explicit positions reduced over 3-4 ranges of partial rows (the last ragged)."""
    with launch_cfg().override("rotary", block_b=2, block_l=4), launch_cfg().override("rotary_reduce", key_splits=4, block_r=16):
        check_rotary(5, 11, 3, 90, dtype, False, pos_kind)


def test_rotary_output_keeps_the_layout_of_a_transposed_input():
    x = torch.randn(2, 3, 9, 8, device=DEVICE).transpose(1, 2)  # [B, L, h, D] view
    angles = torch.randn(9, 4, device=DEVICE)
    y = rotary(x, angles, backend="triton")
    assert y.stride() == x.stride()  # the consumer (attention) wants [B, h, L, D] memory back
    torch.testing.assert_close(y, rotary(x.contiguous(), angles, backend="reference"))


def test_rotary_3d_input():
    gen = torch.Generator().manual_seed(3)
    x, angles = _inputs(2, 9, 8, rows=9, gen=gen)
    fn = lambda x, a: rotary(x, a, backend="triton")  # noqa: E731
    ref = lambda x, a: rotary(x, a, backend="reference")  # noqa: E731
    assert_matches_reference(fn, ref, (x, angles), torch.float32, ["x", "angles"])


@pytest.mark.parametrize("mode", ["add", "rotate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d", "repeated", "padded"])
def test_rotatory_matches_reference(mode, dtype, pos_kind):
    gen = torch.Generator().manual_seed(5)
    x, angles = _inputs(3, 11, 30, rows=20, gen=gen)
    positions = positions_for(pos_kind, 3, 11, 20, gen)
    fn = lambda x, a: rotatory(x, a, mode=mode, positions=positions, backend="triton")  # noqa: E731
    ref = lambda x, a: rotatory(x, a, mode=mode, positions=positions, backend="reference")  # noqa: E731
    assert_matches_reference(fn, ref, (x, angles), dtype, ["x", "angles"])


def test_gradient_of_x_only_and_angles_only():
    gen = torch.Generator().manual_seed(9)
    x, angles = _inputs(2, 5, 2, 8, rows=5, gen=gen)
    ref_x = torch.autograd.grad(rotary(x, angles, backend="reference").sum(), x)[0]
    got_x = torch.autograd.grad(rotary(x.float(), angles.detach().float(), backend="triton").sum(), x)[0]
    torch.testing.assert_close(got_x, ref_x, atol=1e-5, rtol=1e-5)
    ref_a = torch.autograd.grad(rotatory(x[:, :, 0], angles, backend="reference").sum(), angles)[0]
    got_a = torch.autograd.grad(rotatory(x[:, :, 0].detach().float(), angles.float(), backend="triton").sum(), angles)[0]
    torch.testing.assert_close(got_a, ref_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_kind", ["none", "2d"])
def test_angle_gradients_are_bitwise_reproducible(pos_kind):
    gen = torch.Generator().manual_seed(1)
    x, angles = _inputs(6, 10, 2, 16, rows=12, gen=gen)
    positions = positions_for(pos_kind, 6, 10, 12, gen)
    grads = []
    with launch_cfg().override("rotary", block_b=2, block_l=4), launch_cfg().override("rotary_reduce", key_splits=4, block_r=16):
        for _ in range(2):
            xs, a = x.detach().float().requires_grad_(), angles.detach().float().requires_grad_()
            out = rotary(xs, a, positions=positions, backend="triton") + rotatory(xs[:, :, 0], a, positions=positions, backend="triton")[:, :, None]
            out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out))
            grads.append((xs.grad, a.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_poisoned_buffers_are_all_written(monkeypatch):
    monkeypatch.setattr(launch_cfg(), "POISON", True)
    with launch_cfg().override("rotary", block_b=2, block_l=4), launch_cfg().override("rotary_reduce", key_splits=4, block_r=16):
        check_rotary(5, 9, 3, 14, torch.float32, False, "none")
        check_rotary(5, 9, 3, 14, torch.float32, True, "2d", transposed=True)
        check_rotary(5, 9, 1, 14, torch.float16, True, "padded")
        gen = torch.Generator().manual_seed(2)
        x, angles = _inputs(5, 9, 14, rows=12, gen=gen)
        fn = lambda x, a: rotatory(x, a, backend="triton")  # noqa: E731
        ref = lambda x, a: rotatory(x, a, backend="reference")  # noqa: E731
        assert_matches_reference(fn, ref, (x, angles), torch.float32, ["x", "angles"])


@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
def test_empty_batch_gives_zero_angle_gradients(monkeypatch, pos_kind):
    monkeypatch.setattr(launch_cfg(), "POISON", True)
    x = torch.zeros(0, 5, 2, 8, device=DEVICE, requires_grad=True)
    angles = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    positions = positions_for(pos_kind, 0, 5, 6, torch.Generator().manual_seed(0))
    rotary(x, angles, positions=positions, backend="triton").sum().backward()
    assert torch.equal(angles.grad, torch.zeros_like(angles))


def test_unsupported_dtype_raises():
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        rotary(torch.zeros(1, 2, 1, 4, dtype=torch.float64, device=DEVICE), torch.zeros(2, 2, dtype=torch.float64, device=DEVICE), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pos_kind", ["none", "2d"])
@pytest.mark.parametrize("b,L,h,D", [(512, 50, 2, 32), (128, 200, 3, 90)])
def test_gpu_rotary_large(dtype, pos_kind, b, L, h, D):
    check_rotary(b, L, h, D, dtype, False, pos_kind, transposed=True, tol=(5e-2, 5e-2) if dtype == torch.bfloat16 else None)


@pytest.mark.gpu
def test_gpu_angle_gradients_are_bitwise_reproducible():
    x = torch.randn(512, 50, 2, 32, device="cuda", dtype=torch.bfloat16)
    angles = torch.randn(50, 16, device="cuda", requires_grad=True)
    grads = []
    for _ in range(2):
        a = angles.detach().clone().requires_grad_()
        rotary(x, a.to(torch.bfloat16), backend="triton").float().square().sum().backward()
        grads.append(a.grad)
    assert torch.equal(grads[0], grads[1])


def test_fast_trig_range_reduction_in_float32():
    """The reduction the compiled 16-bit kernels run before the SFU's cos/sin (the interpreter has
    no libdevice, so it runs the accurate path): ``r = (theta - k 2pi_hi) - k 2pi_lo`` in float32
    lands in [-pi, pi] and keeps cos/sin of the float32 angle to about one float32 ulp of ``r``
    (and of ``k 2pi_lo`` for huge angles)."""
    from fastpe.kernels.triton import rotations

    inv, hi, lo = (float(c.value) for c in (rotations.INV_TWO_PI, rotations.TWO_PI_HI, rotations.TWO_PI_LO))
    assert hi + lo == pytest.approx(2 * torch.pi, abs=1e-15)
    assert hi * 2**8 == int(hi * 2**8)  # 8 significant bits: k * hi is exact for |k| < 2**16
    gen = torch.Generator().manual_seed(0)
    for bound, tol in ((10.0, 3e-7), (1e3, 5e-7), (4e5, 3e-5)):  # float32 ulp at pi: 2.4e-7
        theta = (torch.rand(100_000, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).float()
        k = torch.round(theta * inv)  # round half to even, as rint
        r = (theta - k * hi) - k * lo  # float32 throughout
        assert r.abs().max().item() <= torch.pi + bound * 1e-7  # k = rint of a float32 product: off by one near .5
        exact = theta.double()
        for f in (torch.cos, torch.sin):
            assert (f(r.double()) - f(exact)).abs().max().item() < tol, (bound, f)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fast_trig_with_large_angles(dtype):
    """16-bit data take the SFU cos/sin after a range reduction: angles of a few hundred radians
    (long sequences, learned angles) stay within the dtype's tolerance."""
    gen = torch.Generator().manual_seed(3)
    x = randn(64, 40, 2, 32, gen=gen, dtype=torch.float64).detach().to(DEVICE).requires_grad_()
    angles = (randn(43, 16, gen=gen, dtype=torch.float64) * 300).detach().to(DEVICE).requires_grad_()

    def run(backend):
        return lambda x, a: rotary(x, a, backend=backend)

    assert_matches_reference(run("triton"), run("reference"), (x, angles), dtype, ["x", "angles"],
                             tol=(5e-2, 5e-2) if dtype == torch.bfloat16 else None)
