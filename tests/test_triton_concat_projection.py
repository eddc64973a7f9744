"""Concat-projection, triton backend: output and the x, table, weight, bias gradients against the reference."""

import pytest
import torch

pytest.importorskip("triton")

from fastpe.ops import concat_projection  # noqa: E402
from helpers import assert_matches_reference, concat_inputs, concat_runner  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["x", "table", "weight", "bias"]


def launch_cfg():
    from fastpe.kernels.triton import _launch

    return _launch


def check(dtype, pos_kind, bias, b, L, d_in, d_pos, d_out, tol=None, **kw):
    inputs, positions = concat_inputs(b, L, d_in, d_pos, d_out, bias, pos_kind, device=DEVICE, **kw)
    assert_matches_reference(concat_runner("triton", positions), concat_runner("reference", positions), inputs, dtype, NAMES, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d", "repeated"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("b,L,d_in,d_pos,d_out", [(2, 1, 4, 4, 4), (3, 7, 30, 30, 30), (2, 50, 90, 16, 50)])
def test_matches_reference(dtype, pos_kind, bias, b, L, d_in, d_pos, d_out):
    check(dtype, pos_kind, bias, b, L, d_in, d_pos, d_out)


# Backward tiles small enough that tiny shapes reach every path: two d_out tiles (dx as its own
# GEMM), two concat-column tiles (the second holds the last x columns and the table's), 4
# position blocks x 3 batch splits (the last ragged) = 12 token groups, 3 table-row blocks.
SMALL_BWD = dict(block_o=16, block_c=16, block_l=2, block_b=2, groups=12, block_r=16)


@pytest.mark.parametrize("unroll", [0, 1], ids=["k-loops", "k-unrolled"])
@pytest.mark.parametrize("dtype,pos_kind", [(torch.float32, "none"), (torch.float16, "1d"),
                                            (torch.float32, "2d"), (torch.float16, "padded")])
def test_many_blocks_and_splits(dtype, pos_kind, unroll):
    cfg = launch_cfg()
    with (cfg.override("concat_gemm", block_m=16, block_n=16, block_k=16, unroll=unroll),
          cfg.override("concat_bwd", **SMALL_BWD)):
        check(dtype, pos_kind, True, 5, 7, 20, 8, 20, rows=37)


@pytest.mark.parametrize("pos_kind", ["none", "1d", "2d"])
def test_fused_dx_with_several_groups(pos_kind):
    """d_out within one tile (dx written by the backward kernel), token groups over batches and positions."""
    with launch_cfg().override("concat_bwd", block_l=2, block_b=2, groups=6, block_r=16):
        check(torch.float32, pos_kind, True, 5, 9, 30, 14, 18)


def test_non_contiguous_x_and_only_some_gradients():
    inputs, positions = concat_inputs(3, 7, 12, 6, 10, True, "1d", device=DEVICE)
    x = inputs[0].detach().transpose(0, 1).contiguous().transpose(0, 1).float().requires_grad_()  # [B, L, d] strided
    table, weight, bias = (t.detach().float() for t in inputs[1:])
    weight.requires_grad_()
    y = concat_projection(x, table, weight, bias, positions=positions, backend="triton")
    y.sum().backward()
    x_ref, w_ref = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    concat_projection(x_ref, table.double(), w_ref, bias.double(), positions=positions, backend="reference").sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w_ref.grad, atol=1e-4, rtol=1e-5)


def test_alignment_hints_follow_addresses_and_strides():
    """The kernels tell Triton how their rows are aligned (the interpreter ignores the hint, so a
    wrong one would only show on a GPU, as a misaligned vector load: check the planners' numbers
    here). d = 90 in bf16: 180-byte rows, 4-byte aligned; the weight's K-contiguous rows (W^T) are
    360 bytes apart, but its table part starts 90 columns (180 bytes) in: 4, not 8."""
    from fastpe.kernels.triton import _launch, concat

    x = torch.randn(2, 5, 90, dtype=torch.bfloat16)
    table = torch.randn(5, 90, dtype=torch.bfloat16)
    weight = torch.randn(90, 180, dtype=torch.bfloat16)
    consts = concat.plan_forward(x, table, weight, None, None)[1][0].constexprs
    assert (consts["ALIGN_A"], consts["ALIGN_T"], consts["ALIGN_B"], consts["ALIGN_C"]) == (4, 4, 4, 4)
    assert (consts["KA"], consts["K"], consts["N"]) == (90, 180, 90)
    # 128-byte weight rows (16-byte aligned) whose table part starts 36 columns (72 bytes) in: 8
    x36, t28, w = torch.randn(2, 5, 36), torch.randn(5, 28), torch.randn(32, 64)
    assert concat.plan_forward(x36.half(), t28.half(), w.half(), None, None)[1][0].constexprs["ALIGN_B"] == 8
    # the backward reads the table's 64-byte rows 36 columns into its concat tile: 8, not 16
    x36, t32, w = (t.half() for t in (x36, torch.randn(5, 32), torch.randn(32, 68)))
    *_, launches = concat.plan_backward(torch.randn(2, 5, 32).half(), x36, t32, w, None, True)
    bwd = next(launch for launch in launches if launch.kernel is concat._bwd_kernel)
    assert (bwd.constexprs["ALIGN_T"], bwd.constexprs["ALIGN_X"], bwd.constexprs["ALIGN_W"]) == (8, 8, 8)
    # the finish kernel reads the table from its first column (16) and the weight's table part (72 bytes in: 8)
    finish = next(launch for launch in launches if launch.kernel is concat._bwd_finish_kernel)
    assert (finish.constexprs["ALIGN_T"], finish.constexprs["ALIGN_WP"]) == (16, 8)
    *_, launches = concat.plan_backward(torch.randn(2, 5, 90, dtype=torch.bfloat16), x, table, weight, None, True)
    finish = next(launch for launch in launches if launch.kernel is concat._bwd_finish_kernel)
    assert (finish.constexprs["ALIGN_T"], finish.constexprs["ALIGN_WP"]) == (4, 4)
    shifted = torch.randn(x.numel() + 1, dtype=torch.bfloat16)[1:].view(x.shape)  # one element in
    assert concat.plan_forward(shifted, table, weight, None, None)[1][0].constexprs["ALIGN_A"] == 2
    assert _launch.run_alignment(torch.randn(4, 8).t()) == 0  # rows not contiguous: no hint
    assert _launch.run_alignment(torch.randn(4, 8).t(), 0) == 16
    assert _launch.run_alignment(torch.randn(6, 45, dtype=torch.float16)) == 2  # odd row stride


def test_weight_table_bias_gradients_are_bitwise_reproducible():
    inputs, positions = concat_inputs(4, 9, 16, 8, 12, True, "2d", device=DEVICE)
    cfg = launch_cfg()
    grads = []
    with cfg.override("concat_bwd", block_l=2, block_b=2, groups=4):
        for _ in range(2):
            leaves = [t.detach().float().requires_grad_() for t in inputs]
            y = concat_projection(*leaves, positions=positions, backend="triton")
            y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y))
            grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_poisoned_buffers_are_all_written(monkeypatch):
    monkeypatch.setattr(launch_cfg(), "POISON", True)
    with launch_cfg().override("concat_bwd", **SMALL_BWD):
        for pos_kind in ("none", "1d", "2d"):
            check(torch.float32, pos_kind, True, 3, 13, 20, 10, 18)
    with launch_cfg().override("concat_bwd", block_l=2, block_b=2, groups=4):
        check(torch.float16, "padded", False, 3, 13, 20, 10, 18)


@pytest.mark.parametrize("pos_kind", ["none", "2d"])
def test_empty_batch_gives_zero_weight_table_and_bias_gradients(monkeypatch, pos_kind):
    monkeypatch.setattr(launch_cfg(), "POISON", True)
    inputs, positions = concat_inputs(0, 5, 8, 4, 3, True, pos_kind, device=DEVICE)
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    concat_projection(*leaves, positions=positions, backend="triton").sum().backward()
    for leaf in leaves[1:]:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_autocast_dtype_is_used():
    inputs, _ = concat_inputs(2, 3, 4, 2, 3, False, "none", device=DEVICE)
    x, t, w = (i.detach().float() for i in inputs)
    if DEVICE == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = concat_projection(x, t, w, backend="triton")
        assert y.dtype == torch.bfloat16  # computed by the kernels in bf16 (not compared: the interpreter's bf16 dot)
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = concat_projection(x, t, w, backend="triton")
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), concat_projection(x, t, w, backend="reference"), atol=0.05, rtol=0.05)


def test_too_many_table_rows_raise():
    x = torch.zeros(1, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="up to 4096"):
        concat_projection(x, torch.zeros(5000, 2, device=DEVICE), torch.zeros(3, 6, device=DEVICE),
                          positions=torch.zeros(2, dtype=torch.int64, device=DEVICE), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pos_kind", ["none", "2d"])
@pytest.mark.parametrize("shape", [(512, 50, 64, 64, 64), (128, 75, 90, 90, 90), (64, 200, 128, 64, 128)])
def test_gpu_large(dtype, pos_kind, shape):
    tol = {torch.bfloat16: (6e-2, 6e-2), torch.float16: (1e-2, 1e-2), torch.float32: None}[dtype]
    check(dtype, pos_kind, True, *shape, tol=tol)
