"""The kernels' compiled-only paths (inline PTX, libdevice's approximate functions) run on the CPU.

Under TRITON_INTERPRET=1 the kernels take portable paths, so their inline PTX ran only on a GPU.
Here ``ptx_emulation`` gives the interpreter that PTX subset (see its docstring) and the planners
their GPU switches, and the interpreter tests of the other modules run again: outputs and every
gradient against the float64 reference, at the shapes that reach each block of assembly (which
each test asserts, from the emulation's counts), in bf16 too (``interpreter_bf16`` fixes the
interpreter's bf16 dot). First the emulation itself: exact where the ISA is exact, and failing
where the hardware would be undefined or silently wrong.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import interpreter_bf16  # noqa: E402
import ptx_emulation  # noqa: E402
import test_triton_concat_projection as concat_tests  # noqa: E402
import test_triton_relative_attention as rmha_tests  # noqa: E402
import test_triton_rotary as rotary_tests  # noqa: E402
import test_triton_time_interval as tisas_tests  # noqa: E402
from ptx_emulation import PtxError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars

CVT_PAIR = "cvt.rn.{}x2.f32 $0, $1, $2;"
STORE_PAIR_16 = ("{{ .reg .pred p; .reg .b32 v; setp.ne.s32 p, $2, 0; cvt.rn.{}x2.f32 v, $3, $4; "
                 "@p st.global.b32 [$1], v; mov.b32 $0, 0; }}")
LOAD_V2 = "{ .reg .pred p; setp.ne.s32 p, $3, 0; mov.b32 $0, 0; mov.b32 $1, 0; @p ld.global.v2.b32 {$0, $1}, [$2]; }"
STORE_V2 = "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.v2.b32 [$1], {$3, $4}; mov.b32 $0, 0; }"
LOAD_32 = "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.b32 $0, 0; @p ld.global.b32 $0, [$1]; }"
STORE_32 = "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.b32 [$1], $3; mov.b32 $0, 0; }"
STORE_16 = "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.b16 [$1], $3; mov.b32 $0, 0; }"
OPAQUE = "mov.b32 $0, $1;"
GATHER = "ld.global.b32 $0, [$1];"
RED_32 = "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p red.global.add.u32 [$1], $2; mov.b32 $0, 0; }"
RED_64 = "{ .reg .pred p; setp.ne.s64 p, $2, 0; @p red.global.add.u64 [$1], $2; mov.b32 $0, 0; }"
PUBLISH = "mov.b64 $0, $1;"


def _addresses(t: torch.Tensor, step: int = 1) -> np.ndarray:
    return np.array([t.data_ptr() + i * t.element_size() * step for i in range(t.numel() // step)], np.uint64)


# --------------------------------------------------------------------------------------------
# the emulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float16, "f16")])
def test_packed_conversion_rounds_to_nearest_even_with_the_first_operand_on_top(dtype, name):
    gen = torch.Generator().manual_seed(0)
    hi, lo = torch.randn(4096, generator=gen), torch.randn(4096, generator=gen) * 1e3
    # values exactly halfway between two 16-bit neighbours: ties go to the even one
    lo[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11])
    [word] = ptx_emulation.run(CVT_PAIR.format(name), "=r,r,r", [hi.numpy(), lo.numpy()], [np.dtype(np.uint32)],
                               True, 1)
    bits = torch.from_numpy(word.view(np.int32))
    assert torch.equal((bits >> 16).to(torch.int16), hi.to(dtype).view(torch.int16))
    assert torch.equal((bits & 0xFFFF).to(torch.int16), lo.to(dtype).view(torch.int16))


def test_predicated_vector_load_and_store():
    src = torch.arange(8, dtype=torch.float32)
    dst = torch.full((8,), -1.0)
    on = np.array([1, 0, 1, 1], np.int32)
    lo, hi = ptx_emulation.run(LOAD_V2, "=r,=r,l,r", [_addresses(src, 2), on], [np.dtype(np.float32)] * 2, False, 1)
    assert lo.tolist() == [0, 0, 4, 6] and hi.tolist() == [1, 0, 5, 7]  # (0 where the predicate is off)
    ptx_emulation.run(STORE_V2, "=r,l,r,r,r", [_addresses(dst, 2), on, hi, lo], [np.dtype(np.int32)], False, 1)
    assert dst.tolist() == [1, 0, -1, -1, 5, 4, 7, 6]


def test_reductions_wrap_and_skip_zeros():
    acc32 = torch.tensor([5, 0], dtype=torch.int32)
    acc64 = torch.tensor([2**40, 0], dtype=torch.int64)
    ptx_emulation.run(RED_32, "=r,l,r", [_addresses(acc32)[[0, 0, 1]], np.array([-7, 3, 0], np.int32)],
                      [np.dtype(np.int32)], False, 1)
    ptx_emulation.run(RED_64, "=r,l,l", [_addresses(acc64)[[0, 1]], np.array([-(2**41), 9], np.int64)],
                      [np.dtype(np.int32)], False, 1)
    assert acc32.tolist() == [1, 0] and acc64.tolist() == [-(2**40), 9]


def test_two_16_bit_elements_per_register():
    x = (np.arange(6, dtype=np.int16) * 1000).view(np.float16)
    [y] = ptx_emulation.run(OPAQUE, "=r,r", [x], [np.dtype(np.float16)], False, 2)
    assert y.view(np.int16).tolist() == x.view(np.int16).tolist()
    with pytest.raises(PtxError, match="do not fill"):
        ptx_emulation.run(OPAQUE, "=r,r", [x], [np.dtype(np.float16)], False, 1)


_BUF = torch.zeros(8, dtype=torch.float32)
_PAIRS, _ONES = _addresses(_BUF, 2), np.ones(4, np.int32)


@pytest.mark.parametrize("asm,constraints,inputs,pure,match", [
    # pairs starting at the second float: 4-byte aligned, not 8
    (STORE_V2, "=r,l,r,r,r", [_PAIRS + np.uint64(4), _ONES, _ONES, _ONES], False, "misaligned 8-byte access"),
    ("{ .reg .pred p; setp.ne.s32 p, $2, 0; @p ld.global.b32 $0, [$1]; }", "=r,l,r",
     [_PAIRS, np.array([1, 0, 1, 1], np.int32)], True, "not written on every lane"),
    ("{ .reg .b32 v; mov.b32 $0, v; }", "=r,r", [_ONES], True, "read before it is written"),
    (STORE_32, "=r,l,r,r", [_PAIRS, _ONES, _ONES], True, "marked pure"),
    ("ld.global.nc.b32 $0, [$1];", "=r,l", [_PAIRS], True, "unsupported"),
    ("brev.b32 $0, $1;", "=r,r", [_ONES], True, "unsupported PTX instruction"),
], ids=["misaligned", "unwritten-output", "unwritten-register", "store-marked-pure", "unknown-type",
        "unknown-instruction"])
def test_undefined_or_unknown_assembly_raises(asm, constraints, inputs, pure, match):
    with pytest.raises(PtxError, match=match):
        ptx_emulation.run(asm, constraints, inputs, [np.dtype(np.int32)], pure, 1)
    assert _BUF.eq(0).all()  # nothing was written


def test_constraints_must_match_the_operands():
    with pytest.raises(PtxError, match="2 inputs"):
        ptx_emulation.run(OPAQUE, "=r,r,r", [np.ones(4, np.int32)], [np.dtype(np.int32)], True, 1)


# --------------------------------------------------------------------------------------------
# the kernels, their compiled-only paths emulated
# --------------------------------------------------------------------------------------------


def test_interpreter_bf16_dot_and_integer_conversions_take_the_values_not_the_bits(monkeypatch):
    """The interpreter's own bf16 dot and bool-to-bf16 conversion are wrong (they take the raw
    bits for the numbers, the numbers for the bits); with the fix the bf16 kernels below run on
    the CPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot_plus_identity(A, B, C, N: tl.constexpr):
        i = tl.arange(0, N)
        a = tl.load(A + i[:, None] * N + i[None, :])
        b = tl.load(B + i[:, None] * N + i[None, :])
        eye = (i[:, None] == i[None, :]).to(tl.bfloat16)
        tl.store(C + i[:, None] * N + i[None, :], tl.dot(a, b) + eye.to(tl.float32))

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).bfloat16() for _ in range(2))
    out = torch.empty(16, 16)
    exact = a.float() @ b.float() + torch.eye(16)
    dot_plus_identity[(1,)](a, b, out, 16)
    assert not torch.allclose(out, exact, atol=1e-2)
    interpreter_bf16.enable(monkeypatch)
    dot_plus_identity[(1,)](a, b, out, 16)
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)


@pytest.fixture
def emulated(monkeypatch):
    ptx_emulation.enable(monkeypatch)
    interpreter_bf16.enable(monkeypatch)
    ptx_emulation.CALLS.clear()
    return ptx_emulation.CALLS


def _reached(calls, *blocks):
    missing = [b for b in blocks if not calls[b]]
    assert not missing, f"not run: {missing}; run: {sorted(calls)}"


@pytest.mark.parametrize("dtype,dh,per_head,blocks", [
    # fp32 rows of dk, dv partials 8-byte aligned at an even width: pairs, one vector access each
    (torch.float32, 30, False, [LOAD_V2, STORE_V2, OPAQUE, "libdevice.fast_log2f"]),
    # 16-bit operands rounded in pairs; an odd width: one access per element
    (torch.float16, 45, True, [CVT_PAIR.format("f16"), LOAD_32, STORE_32, OPAQUE]),
    (torch.float16, 90, False, [CVT_PAIR.format("f16"), LOAD_V2, STORE_V2]),
    (torch.bfloat16, 90, False, [CVT_PAIR.format("bf16"), STORE_PAIR_16.format("bf16"), LOAD_V2, STORE_V2]),
    (torch.bfloat16, 45, True, [CVT_PAIR.format("bf16"), LOAD_32, STORE_32, OPAQUE]),
], ids=["fp32-dh30", "fp16-dh45", "fp16-dh90", "bf16-dh90", "bf16-dh45"])
def test_relative_attention_default_plans(emulated, dtype, dh, per_head, blocks):
    rmha_tests.check(2, 2, 21, 21, dh, "padding", dtype, per_head=per_head)
    _reached(emulated, *blocks)


@pytest.mark.parametrize("dtype,dh,blocks", [
    (torch.float16, 90, [STORE_PAIR_16.format("f16")]),  # 180-byte rows: pairs of halves, 4-byte aligned
    (torch.float16, 45, [STORE_16]),
    (torch.float32, 45, [STORE_32]),
    (torch.bfloat16, 90, [STORE_PAIR_16.format("bf16")]),
], ids=["fp16-dh90", "fp16-dh45", "fp32-dh45", "bf16-dh90"])
def test_relative_attention_direct_key_block_stores(emulated, dtype, dh, blocks):
    """One 64-row query block over 16-key blocks stores each key block's dk, dv itself, in the dot's layout."""
    with rmha_tests.launch_cfg().override("rmha_bwd", mode="fused", block_m=64, block_n=16):
        rmha_tests.check(2, 1, 40, 40, dh, "fully_padded", dtype)
    _reached(emulated, *blocks)


@pytest.mark.parametrize("case", list(rmha_tests.MULTI_BLOCK_CASES))
def test_relative_attention_multi_block_paths(emulated, case):
    rmha_tests.test_multi_block_paths(*rmha_tests.MULTI_BLOCK_CASES[case])
    _reached(emulated, LOAD_V2, STORE_V2)


@pytest.mark.parametrize("mode,L,block,dtype", [("fused", 40, 16, torch.float16), ("split", 40, 32, torch.float32),
                                                ("fused-direct", 40, 16, torch.float16),
                                                ("split", 40, 16, torch.bfloat16)])
def test_relative_attention_dropout(emulated, mode, L, block, dtype):
    """With dropout the 16-bit operands of the warp-level dots pass the operand barrier, two per move."""
    rmha_tests.test_dropout_backward_uses_the_forward_mask(mode, L, block, dtype, 2, True)
    if dtype != torch.float32:
        _reached(emulated, f"{OPAQUE} (pack=2)")


def test_relative_attention_poisoned_buffers(emulated, monkeypatch):
    rmha_tests.test_poisoned_buffers_are_all_written(monkeypatch)
    _reached(emulated, LOAD_V2, STORE_V2)


@pytest.mark.parametrize("dtype,b,h,L,dh,span,per_head", [
    (torch.float16, 2, 2, 13, 30, 256, False), (torch.float32, 2, 1, 20, 50, 8, True),
    (torch.bfloat16, 2, 2, 13, 90, 256, False),
])
def test_time_interval_shapes(emulated, dtype, b, h, L, dh, span, per_head):
    tisas_tests.check(b, h, L, dh, span, "padding", dtype, per_head=per_head)
    _reached(emulated, GATHER, RED_32, RED_64, PUBLISH)


@pytest.mark.parametrize("key_bits", [0, 1])
def test_time_interval_several_blocks(emulated, key_bits, monkeypatch):
    tisas_tests.test_several_key_and_query_blocks(torch.float16, "padding+causal", key_bits, monkeypatch)
    _reached(emulated, GATHER, RED_32, RED_64, LOAD_V2, STORE_V2)


def test_time_interval_one_key_block_with_dropout_and_fully_padded_rows(emulated, monkeypatch):
    tisas_tests.test_one_key_block_backward_with_dropout()
    tisas_tests.test_one_key_block_backward_over_several_query_blocks(90, torch.float16, monkeypatch)
    _reached(emulated, GATHER, RED_32, RED_64, LOAD_V2, STORE_V2)


def test_time_interval_poisoned_buffers(emulated, monkeypatch):
    tisas_tests.test_poisoned_buffers_are_all_written(True, monkeypatch)
    _reached(emulated, GATHER)


@pytest.mark.parametrize("pos_kind", ["none", "2d"])
def test_rotary_fast_trigonometry(emulated, pos_kind):
    """16-bit data take the range reduction and the SFU's cos / sin (emulated: numpy's in float32,
    raising if the reduced angle leaves [-pi, pi])."""
    rotary_tests.check_rotary(3, 7, 2, 30, torch.float16, False, pos_kind)
    rotary_tests.check_rotary(2, 9, 1, 14, torch.bfloat16, True, pos_kind, transposed=True)
    _reached(emulated, "libdevice.rint", "libdevice.fast_cosf", "libdevice.fast_sinf")


@pytest.mark.parametrize("pos_kind", ["1d", "2d"])
def test_concat_projection_bf16(emulated, pos_kind):
    """No inline PTX here: bf16, which the interpreter could not run before (the 2-d positions'
    one-hot tiles are booleans converted to bf16)."""
    concat_tests.check(torch.bfloat16, pos_kind, True, 3, 7, 30, 30, 30)
    concat_tests.check(torch.bfloat16, pos_kind, False, 2, 50, 90, 16, 50)
