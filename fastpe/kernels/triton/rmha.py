"""Fused relative multi-head attention (RMHA-k, Shaw et al. 2018) in Triton.

Math (see :mod:`fastpe.reference.relative_attention`), with ``r(i, j) = clamp(j - i, -k, k) + k``::

    s_ij = scale * (q_i . k_j + q_i . rk[r(i, j)]) + bias_ij      (masked: -inf)
    P = softmax_j(s), P~ = dropout(P)
    o_i = sum_j P~_ij v_j + sum_r (sum_{j: r(i,j)=r} P~_ij) rv[r]

Forward: one program per (query block, batch*head). ``q . rk`` is ``2k+1`` dot products per
query row (one small ``tl.dot`` per program), gathered into the logits by bucket; the value
term accumulates ``2k+1`` bucket sums of ``P~`` per row next to ``P~ V`` and is applied with one
more small ``tl.dot`` at the end. Keys are visited in blocks with an online softmax; for
short sequences one block holds the whole sequence. Nothing of size ``[L, L, dh]`` exists.

Backward: recomputes ``P`` from the saved log-sum-exp; the forward also saves each row's sum of
``P~`` (the kept probabilities), whose bucket ``2k`` share the backward takes as that total less
the other buckets, with no row sum of ``P~`` per tile. Two modes:

* ``fused`` (one pass, up to 256 keys): a program owns whole (batch, head) sequences, loops over
  query blocks and, inside, over key blocks; every tile's ``P~`` and ``dS`` is computed once, and
  ``dq`` is written once per query block. ``dk, dv`` accumulate in registers when one key block
  holds every key; else, with one query block, they are final after each key block's tile and
  stored directly; else they accumulate in a per-program fp32 buffer (read-modify-write by that
  program only, copied to ``dk, dv`` after the sequence).
* ``split``: a program owns key block ``n`` (``dk, dv``: loop over query blocks) and query
  block ``n`` (``dq``: loop over key blocks); for long sequences or few (batch, head) pairs.

The inner band buckets hold one element per row each. The backward gathers them from the ``P~``
and ``dS`` of each tile that meets the band (:func:`_inner_diagonals`); so does the forward where
the band is wider than a key block or its tiles hold 32 score elements per thread. Otherwise the
forward keeps them by tile column (``DIAG``: an inner element sits in the same column of whichever
tile holds it) and gathers once per query block, after its band tiles.

Relative-table gradients (``drk = sum dS_bucket^T Q``, ``drv = sum P~_bucket^T dO``) are
accumulated per program in registers, written to a partial buffer (one row per program) and
summed by a second kernel in a fixed order: bitwise reproducible, no atomics.

Dropout: Philox keyed by a 64-bit seed read from a device tensor (drawn from torch's
generator by the caller, so ``torch.manual_seed`` reproduces it and a captured CUDA graph
replays fresh randomness), 7 rounds, counters ``((j // 32) * 4 + (j // 2) % 4, i - (i & 8), batch*head, 0)``:
one call's 128 bits are sixteen 8-bit draws for the eight keys of each of two rows (i, i + 8)
that one thread holds of an MMA accumulator tile (see :func:`_keep_tile`; a per-element call would
cost ~50 instructions per score element; sixteen-bit draws, eight per call, cost 6.6 instructions
per element for the draws and compares where these cost 4.7: sm_90a, B128 h1 L75 dh90 backward);
the backward regenerates the same keep decisions. Rates are multiples of 1/256
(:func:`dropout_rate`), as with FlashAttention's 8-bit draws, and the kept scores are scaled by
the rate actually applied.

Head sizes are padded to a multiple of 16 (as two power-of-two chunks, see
:func:`fastpe.kernels.triton._launch.split_pow2`), never to the next power of two.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastpe.backends import triton_interpreter_enabled
from fastpe.kernels.triton import _launch
from fastpe.kernels.triton._launch import Launch
from fastpe.kernels.triton._limits import MAX_BUCKETS, MAX_HEAD_DIM

LOG2E = 1.4426950408889634
# Philox4x32 rounds of the dropout draws: 7, as FlashAttention's dropout uses (Random123's
# Philox4x32-7 passes BigCrush; 10 is its default safety margin). Each round is about eight
# SASS instructions per call, and a call serves sixteen score elements.
PHILOX_ROUNDS = tl.constexpr(7)


# ----------------------------------------------------------------------------------------------
# helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(base, rows, cols, stride_r, stride_c, ALIGN: tl.constexpr = 0):
    """Pointers ``base + rows x stride_r + cols x stride_c`` whose contiguous runs start at
    multiples of ``ALIGN`` bytes (the planner checked, :func:`fastpe.kernels.triton._launch.run_alignment`;
    0: no hint): loads and stores become vectors. The hint must be given where the pointers are
    computed, as here: given to a helper's pointer argument, Triton drops it."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if ALIGN > 0:
        ptrs = tl.multiple_of(ptrs, [ALIGN, ALIGN])
    return ptrs


@triton.jit
def _column_pairs(x):
    """The even and the odd columns of an ``[M, N]`` tile, ``[M, N / 2]`` each. In a dot's layout
    one thread holds both columns of a pair: no data moves."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _load_rows(base, rows, row_mask, stride_r, stride_c, C0: tl.constexpr, C: tl.constexpr, CMAX: tl.constexpr,
               ALIGN: tl.constexpr = 0, ROWS_IN: tl.constexpr = False):
    """``[len(rows), C]`` tile of columns ``C0 .. C0+C`` (zero beyond ``CMAX`` and masked rows).
    ``ROWS_IN``: every row is in bounds (see :func:`_key_rows`), ``row_mask`` is not applied."""
    cols = C0 + tl.arange(0, C)
    ptrs = _tile(base, rows, cols, stride_r, stride_c, ALIGN)
    if ROWS_IN:
        if C0 + C <= CMAX:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=tl.broadcast_to(cols[None, :] < CMAX, [rows.shape[0], C]), other=0.0)
    return tl.load(ptrs, mask=row_mask[:, None] & (cols[None, :] < CMAX), other=0.0)


@triton.jit
def _key_rows(start_n, BLOCK_N: tl.constexpr, LK):
    """Rows of a key block for loading K and V tiles: those past the last key read the last key
    again (``ROWS_IN`` loads). Their scores are masked, so what they hold is never used (P = dS
    = 0 there), and the loads need no per-row predicate and zero fill (sm_90a, head size 90:
    two of the five instructions of each 4-byte load)."""
    return tl.minimum(start_n + tl.arange(0, BLOCK_N), LK - 1)


@triton.jit
def _load_split(base, rows, row_mask, stride_r, stride_c, DA: tl.constexpr, DB: tl.constexpr, D: tl.constexpr,
                ALIGN: tl.constexpr = 0, ROWS_IN: tl.constexpr = False):
    """Columns ``[0, DA)`` and ``[DA, DA+DB)`` of the rows (head sizes that are not a power of two are
    split in two power-of-two parts); the second is the first again when ``DB == 0`` (unused then)."""
    a = _load_rows(base, rows, row_mask, stride_r, stride_c, 0, DA, D, ALIGN, ROWS_IN)
    b = a
    if DB > 0:
        b = _load_rows(base, rows, row_mask, stride_r, stride_c, DA, DB, D, ALIGN, ROWS_IN)
    return a, b


@triton.jit
def _store_rows(base, val, rows, row_mask, stride_r, stride_c, C0: tl.constexpr, C: tl.constexpr, CMAX: tl.constexpr,
                ALIGN: tl.constexpr = 0, PTX: tl.constexpr = False, CVT_ASM: tl.constexpr = False):
    """Store ``val`` in ``base``'s dtype. ``PTX``: one predicated ``st.global`` per element in
    ``val``'s own layout (see :func:`_dot_add_rows`); it pays only where the rows allow no wide
    vectors anyway (dk, dv of a head size of 90 in the relative attention's direct stores: 1816 ->
    1768 instructions per tile at B128 h1 L75); for 16-byte rows the shared-memory round trip to
    128-bit stores costs less (the time-interval outputs: 2117 -> 2147 at B512 h2 L50 dh32).
    ``CVT_ASM`` (compiled kernels on sm_80 and later, see :func:`_round_pack`): 16-bit values in
    contiguous, 4-byte aligned rows of an even width go in pairs of adjacent columns (one thread
    holds both in a dot's layout), rounded by one ``cvt.rn.bf16x2.f32`` and stored by one
    ``st.global.b32``; other rows fall back as above. Callers take pairs where rows are not
    16-byte aligned (B128 h1 L75 dh90: the direct dk, dv stores 2062 -> 2022 instructions per tile
    with dropout; with o and dq too, modelled forward 3.09 -> 2.85 us, backward 6.92 -> 6.57).
    ``PTX`` with float32 rows 8-byte aligned of an even width: one ``st.global.v2`` per pair."""
    cols = C0 + tl.arange(0, C)
    ptrs = _tile(base, rows, cols, stride_r, stride_c, ALIGN)
    mask = row_mask[:, None] & (cols[None, :] < CMAX)
    if CVT_ASM and base.dtype.element_ty.primitive_bitwidth == 16 and ALIGN >= 4 and CMAX % 2 == 0:
        # (C0 and CMAX even, ALIGN >= 4 (rows contiguous, 4-byte aligned): a pair is stored whole or not at all)
        even_p, _odd_p = _column_pairs(ptrs)
        even_m, _odd_m = _column_pairs(mask)
        even, odd = _column_pairs(val)
        args = [even_p.to(tl.int64, bitcast=True), even_m.to(tl.int32), odd, even]
        if base.dtype.element_ty == tl.bfloat16:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b32 v; setp.ne.s32 p, $2, 0; cvt.rn.bf16x2.f32 v, $3, $4; "
                "@p st.global.b32 [$1], v; mov.b32 $0, 0; }", "=r,l,r,r,r", args, dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b32 v; setp.ne.s32 p, $2, 0; cvt.rn.f16x2.f32 v, $3, $4; "
                "@p st.global.b32 [$1], v; mov.b32 $0, 0; }", "=r,l,r,r,r", args, dtype=tl.int32, is_pure=False, pack=1)
    elif PTX and base.dtype.element_ty == tl.float32 and ALIGN >= 8 and CMAX % 2 == 0:
        # float32 in pairs of adjacent columns, one st.global.v2 each (see _dot_add_rows)
        even_p, _odd_p = _column_pairs(ptrs)
        even_m, _odd_m = _column_pairs(mask)
        even, odd = _column_pairs(val)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.v2.b32 [$1], {$3, $4}; mov.b32 $0, 0; }",
            "=r,l,r,r,r", [even_p.to(tl.int64, bitcast=True), even_m.to(tl.int32), even.to(tl.int32, bitcast=True),
                           odd.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=False, pack=1)
    elif PTX:
        ok = mask.to(tl.int32)
        out = val.to(base.dtype.element_ty)
        if base.dtype.element_ty.primitive_bitwidth == 16:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.b16 [$1], $3; mov.b32 $0, 0; }",
                "=r,l,r,h", [ptrs.to(tl.int64, bitcast=True), ok, out.to(tl.int16, bitcast=True)], dtype=tl.int32,
                is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.b32 [$1], $3; mov.b32 $0, 0; }",
                "=r,l,r,r", [ptrs.to(tl.int64, bitcast=True), ok, out.to(tl.int32, bitcast=True)], dtype=tl.int32,
                is_pure=False, pack=1)
    else:
        tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 of float32 row sums of exponentials (at least 1 where used). ``FAST`` (compiled
    kernels): the approximate ``lg2.approx`` (libdevice ``fast_log2f``, absolute error about
    2**-22 there, as FlashAttention's ``__logf``); ``tl.log2`` is libdevice's correctly rounded
    ``log2f``, a polynomial of about 30 instructions per value, and the interpreter's form."""
    if FAST:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def _dot_add_rows(base, rows, row_mask, stride_r, a, b_, C0: tl.constexpr, C: tl.constexpr, CMAX: tl.constexpr,
                  DOT_PREC: tl.constexpr, PTX: tl.constexpr = False, ALIGN: tl.constexpr = 0):
    """``base[rows, C0:C0+C] += a^T @ b_`` on float32 rows that only this program reads and writes
    (the callers' barriers order one tile's store before the next tile's load of the same rows).

    ``PTX`` (:func:`fastpe.kernels.triton._launch.inline_ptx`): the load and the store are one
    predicated ``ld.global`` / ``st.global`` per element, inline PTX, which has no layout of its
    own and so stays in the layout of the dot's accumulator; as ``tl.load`` / ``tl.store`` the
    coalescing pass gave them a blocked layout and the tile went through shared memory both ways
    (sm_90a, time-interval backward at B256 h2 L200 dh64: 2320 -> 2037 SASS instructions per
    tile). Rows 8-byte aligned (``ALIGN >= 8``) of an even width go in pairs of adjacent columns,
    which one thread holds in the accumulator's layout: one ``ld.global.v2`` / ``st.global.v2``
    per pair (relative attention backward at B256 h2 L200 dh64: 1396 -> 1354 instructions per
    tile; time-interval backward 2037 -> 1975)."""
    cols = C0 + tl.arange(0, C)
    ptrs = _tile(base, rows, cols, stride_r, 1, ALIGN)
    mask = row_mask[:, None] & (cols[None, :] < CMAX)
    if PTX and ALIGN >= 8 and CMAX % 2 == 0:
        # adjacent columns in pairs, one ld.global.v2 each (a pair is loaded whole or not at all)
        even_p, _odd_p = _column_pairs(ptrs)
        even_m, _odd_m = _column_pairs(mask)
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $3, 0; mov.b32 $0, 0; mov.b32 $1, 0; "
            "@p ld.global.v2.b32 {$0, $1}, [$2]; }",
            "=r,=r,l,r", [even_p.to(tl.int64, bitcast=True), even_m.to(tl.int32)], dtype=(tl.int32, tl.int32),
            is_pure=False, pack=1)
        old = tl.reshape(tl.join(lo, hi), [ptrs.shape[0], C]).to(tl.float32, bitcast=True)
    elif PTX:
        old = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.b32 $0, 0; @p ld.global.b32 $0, [$1]; }",
            "=r,l,r", [ptrs.to(tl.int64, bitcast=True), mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1).to(tl.float32, bitcast=True)
    else:
        old = tl.load(ptrs, mask=mask, other=0.0)
    acc = tl.dot(tl.trans(a), b_, old, input_precision=DOT_PREC)
    _store_rows(base, acc, rows, row_mask, stride_r, 1, C0, C, CMAX, ALIGN, PTX)


@triton.jit
def _below(start, N: tl.constexpr, limit):
    """``start + arange(N) < limit`` written as ``arange(N) < limit - start``: LLVM widens the first
    form to a 64-bit compare per element when ``start + arange(N)`` also indexes memory (about six
    SASS instructions per column of a tile instead of one)."""
    return tl.arange(0, N) < limit - start


@triton.jit
def _table_col(table, rcols, COL: tl.constexpr):
    """Column ``COL`` of a per-row table ``[M, R_PAD]`` as an ``[M]`` vector."""
    return tl.sum(tl.where(rcols[None, :] == COL, table, 0.0), axis=1)


@triton.jit
def _gather_ready(table):
    """``table`` ``[M, C]`` as it is, moved into the layout ``tl.gather`` reads along axis 1. The
    compiler moves a gather's source there (through shared memory) right before the gather, so a
    table gathered from inside ``if`` blocks in a loop is moved again in every iteration (loop-
    invariant code motion does not look into the ``if``); gathered once here, before the loop,
    it is moved once (sm_90a, bf16: 17 instructions per gather per tile)."""
    return tl.gather(table, tl.arange(0, table.shape[1])[None, :] + tl.zeros([table.shape[0], 1], tl.int32), axis=1)


@triton.jit
def _band_tile_buckets(dloc, delta, KMAX: tl.constexpr):
    """Bucket ``clamp(j - i, -k, k) + k`` of each element of a tile, with ``dloc = j - i`` inside the
    tile (hoisted out of the loops) and ``delta = start_n - start_m``."""
    return tl.minimum(tl.maximum(dloc + (delta + KMAX), 0), 2 * KMAX)


@triton.jit
def _left_of_band(rows, col0, KMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which elements of a tile (rows ``rows``, columns ``col0 + [0, BLOCK_N)``, both in one frame)
    lie left of the band (bucket 0: ``j - i <= -k``): a column compared with a per-row threshold.
    Not ``j - i <= -k`` from a ``j - i`` table: the compiler hoists that [BLOCK_M, BLOCK_N] integer
    table out of the key loop and holds it in registers (a second one beside the gather's, in
    another layout), which spilled."""
    return tl.arange(0, BLOCK_N)[None, :] <= (rows - KMAX - col0)[:, None]


@triton.jit
def _right_of_band(rows, col0, KMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """As :func:`_left_of_band`, the elements right of the band (bucket 2k: ``j - i >= k``)."""
    return tl.arange(0, BLOCK_N)[None, :] >= (rows + KMAX - col0)[:, None]


@triton.jit
def _in_band(rows, col0, KMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Neither left nor right of the band (an inner bucket, ``|j - i| < k``): one unsigned compare
    of the column's offset from the row's first inner column, not two compares and their OR."""
    if KMAX == 0:  # (no inner bucket)
        return tl.zeros([rows.shape[0], BLOCK_N], tl.int1)
    offset = tl.arange(0, BLOCK_N)[None, :] - (rows - KMAX + 1 - col0)[:, None]
    return offset.to(tl.uint32, bitcast=True) < 2 * KMAX - 1


@triton.jit
def _inner_columns(rows, delta, rcols, KMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the inner buckets ``0 < r < 2k`` (column ``r`` of ``[BLOCK_M, R_PAD]``) of a band tile with
    ``delta = start_n - start_m``: the tile column ``i + r - k - delta`` of bucket ``r`` of row ``i``,
    and whether the tile holds it."""
    col = rows[:, None] + (rcols[None, :] - KMAX - delta)
    return col, (col >= 0) & (col < BLOCK_N) & (rcols[None, :] > 0) & (rcols[None, :] < 2 * KMAX)


@triton.jit
def _inner_diagonals(p, rows, delta, rcols, KMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """The inner buckets ``0 < r < 2k`` of a band tile ``p`` as ``[BLOCK_M, R_PAD]`` (column ``r``):
    bucket ``r`` of row ``i`` is the one element ``j = i + r - k``, column ``i + r - k - delta`` of the
    tile when the tile holds it. One gather along the rows, instead of a compare-and-select pass
    per bucket, or a pass per diagonal after the key loop (which loaded the diagonal's keys
    again, and drew its dropout per element)."""
    col, ok = _inner_columns(rows, delta, rcols, KMAX, BLOCK_N)
    return tl.where(ok, tl.gather(p, col & (BLOCK_N - 1), axis=1), 0)  # (masked where it wraps)


@triton.jit
def _round_pack(hi, lo, dt, CVT_ASM: tl.constexpr):
    """Float32 ``hi`` and ``lo`` rounded to nearest in the 16-bit ``dt`` and packed in a uint32,
    ``lo`` in the low half. ``CVT_ASM``: one PTX ``cvt.rn.{bf16x2,f16x2}.f32`` per pair, the
    instruction a plain ``.to(dt)`` of an MMA tile compiles to. Written as conversions, bitcasts and
    shifts, the compiler converted every element on its own and permuted bytes to pair them, for
    the dots' operands as well (sm_90a, bf16: S1 forward band tile 882 -> 818 instructions per
    thread, S1 backward 1394 -> 1227). Without it (Triton's interpreter has no inline assembly,
    cards before sm_80 no such instruction: :func:`fastpe.kernels.triton._launch.packed_cvt`) those
    same bits in portable code."""
    if CVT_ASM:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;" if dt == tl.bfloat16 else
                                         "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [hi, lo], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    else:
        return (lo.to(dt).to(tl.uint16, bitcast=True).to(tl.uint32)
                | (hi.to(dt).to(tl.uint16, bitcast=True).to(tl.uint32) << 16))


@triton.jit
def _pair_columns(x):
    """Adjacent columns of a uint32 ``[M, N]`` tile packed in pairs, ``[M, N / 2]`` uint64 (see
    :func:`_inner_diagonals_of_pairs` and :func:`_column_pairs`)."""
    even, odd = _column_pairs(x)
    return even.to(tl.uint64) | (odd.to(tl.uint64) << 32)


@triton.jit
def _inner_diagonals_of_pairs(pairs, rows, delta, rcols, KMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_inner_diagonals` of a tile whose adjacent columns come packed in pairs (column ``2c`` in
    the low half of element ``c``, ``2c + 1`` in the high half): the unsigned halves, and where the
    tile holds the inner element (elsewhere the halves are garbage: the caller masks).
    ``tl.gather`` first moves its whole source into a layout with the gather axis over a warp's
    lanes (through shared memory), then shuffles: pairs halve both. With :func:`_round_pack`'s
    packing (sm_90a, bf16, instructions per band tile per thread, without / with dropout): forward
    S1 981 -> 818 / 1239 -> 1099, S2 575 -> 532 / 726 -> 698, S3 633 -> 621 / 804 -> 764; backward
    S1 1494 -> 1227 / 1790 -> 1554, S2 1808 -> 1538 / 2091 -> 1851, S3 2069 -> 1746 / 2323 -> 2093."""
    HALF: tl.constexpr = pairs.dtype.primitive_bitwidth // 2
    narrow = tl.uint32 if HALF == 32 else tl.uint16
    col, ok = _inner_columns(rows, delta, rcols, KMAX, BLOCK_N)
    g = tl.gather(pairs, (col >> 1) & (BLOCK_N // 2 - 1), axis=1)
    return tl.where((col & 1) == 1, g >> HALF, g).to(narrow), ok


@triton.jit
def _add_band_grads(inner_a, inner_b, p, ds, dt, rows, delta, rcols, KMAX: tl.constexpr, BLOCK_N: tl.constexpr,
                    CVT_ASM: tl.constexpr):
    """Add a band tile's inner diagonals of P~ and dS (float32 ``p``, ``ds``; :func:`_inner_diagonals`)
    to the query block's accumulators. 16-bit ``dt``: rounded as the dots take them and packed in
    32 bits (P~ low, dS high), adjacent columns paired, so one gather moves both; they stay packed:
    every inner element lies in exactly one tile, so OR-ing is the sum and 16 bits hold it exactly
    (``inner_a``: the packed pairs, ``inner_b`` unused). Float32: a gather and a table each."""
    if dt.primitive_bitwidth == 16:
        packed = _round_pack(ds, p, dt, CVT_ASM)
        bits, ok = _inner_diagonals_of_pairs(_pair_columns(packed), rows, delta, rcols, KMAX, BLOCK_N)
        inner_a = inner_a | tl.where(ok, bits, 0)
    else:
        inner_a += _inner_diagonals(p, rows, delta, rcols, KMAX, BLOCK_N)
        inner_b += _inner_diagonals(ds, rows, delta, rcols, KMAX, BLOCK_N)
    return inner_a, inner_b


@triton.jit
def _inner_zeros(BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, dt):
    """Empty :func:`_add_band_grads` accumulators for tiles of dtype ``dt``."""
    if dt.primitive_bitwidth == 16:
        return tl.zeros([BLOCK_M, R_PAD], tl.uint32), tl.zeros([1, 1], tl.float32)
    else:
        return tl.zeros([BLOCK_M, R_PAD], tl.float32), tl.zeros([BLOCK_M, R_PAD], tl.float32)


@triton.jit
def _inner_tables(inner_a, inner_b, dt):
    """The inner bucket sums of P~ and dS in float32 from :func:`_add_band_grads`'s accumulators."""
    if dt.primitive_bitwidth == 16:
        inner_p = (inner_a & 0xFFFF).to(tl.uint16).to(dt, bitcast=True).to(tl.float32)
        inner_ds = (inner_a >> 16).to(tl.uint16).to(dt, bitcast=True).to(tl.float32)
    else:
        inner_p = inner_a
        inner_ds = inner_b
    return inner_p, inner_ds


# Compiled for a GPU, not run by the interpreter (which has no inline assembly): see _mask_barrier.
_COMPILED = tl.constexpr(not triton_interpreter_enabled())
# Tiles of fewer rows than a warpgroup MMA's 64 use warp-level MMAs (see _mask_barrier).
WARPGROUP_ROWS = tl.constexpr(64)


@triton.jit
def _opaque(x, PACK: tl.constexpr):
    """``x`` through a ``mov`` marked as having a side effect, ``PACK`` elements per 32-bit register:
    an identity the compiler cannot look through (compiled kernels only)."""
    if _COMPILED:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=PACK)
    return x


@triton.jit
def _mask_barrier(x):
    """``x`` (integers or booleans) as int32, through :func:`_opaque`. Triton sizes the register
    fragments of a warp-level MMA's operands (``kWidth``) by the narrowest load they derive from
    through elementwise operations, masks included, and halves that width again where the values
    pass a ``tl.join``: the uint8 key padding gave the score tiles' 16-bit dots 8-bit fragments, and
    ptxas then assembled every operand register with a move (sm_90a, time-interval forward B256 h2
    L200 dh64, 32 x 256 tiles: 340 moves per tile; 78.7 -> 62.2 instructions per score element).
    Warpgroup MMAs (64-row tiles) take their operands from shared memory and are not affected.
    ``compile_check`` fails a kernel where this happens."""
    return _opaque(x.to(tl.int32), 1)


@triton.jit
def _operand_barrier(x, ON: tl.constexpr):
    """A 16-bit dot operand through :func:`_opaque`, two elements per move, where ``ON`` (a
    warp-level MMA whose operand derives from dropout draws, which reach it through ``tl.join``, see
    :func:`_mask_barrier`): half a move per element, less than the fragment moves it saves (B8 h2
    L200 dh90 with dropout, 16 x 32 forward tiles: 147.2 -> 139.0 instructions per score element)."""
    if ON and x.dtype.primitive_bitwidth == 16:
        return _opaque(x, 2)
    return x


@triton.jit
def _key_columns(KPM, b, skpb, skpn, offs_n, n_mask, HAS_KPM: tl.constexpr, WARP_MMA: tl.constexpr = False):
    """Keys of the tile that exist and are not padding, and whether any does (a fully padded block is
    skipped: left padding makes the first blocks of most rows in a batch all padding). ``WARP_MMA``:
    the tile's dots are warp-level MMAs (under 64 rows), whose operands the uint8 mask must not
    reach (see :func:`_mask_barrier`)."""
    ok = n_mask
    if HAS_KPM:
        pad = tl.load(KPM + b * skpb + offs_n * skpn, mask=n_mask, other=1)
        ok = ok & (pad == 0)
        if WARP_MMA:
            ok = _mask_barrier(ok) != 0
    return ok, tl.max(ok.to(tl.int32), axis=0) > 0


@triton.jit
def _key_bits(KPM, b, skpb, skpn, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, dt,
              HAS_KPM: tl.constexpr):
    """The key padding of a sequence packed once, for :func:`_tile_keys` (0, 0 unless ``HAS_KPM`` and
    ``TILES``, the planner's ``KEY_BITS``: the tiles then read the mask itself): per tile column an
    int32 whose bit t says that column's key in key block t exists and is not padding, and one
    int32 whose bit t says block t holds any such key. Per tile that is one uniform mask and one
    bit test per column, where loading the tile's padding bytes took about six instructions per
    column and a reduction for the skip (sm_90a, B256 h2 L200 dh64: forward band tile 436 -> 384
    instructions per thread)."""
    if HAS_KPM and TILES > 0:
        tiles = tl.arange(0, TILES)
        keys = tiles[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        valid = (tl.load(KPM + b * skpb + keys * skpn, mask=keys < LK, other=1) == 0).to(tl.int32)
        col_bits = tl.sum(valid << tiles[:, None], axis=0)  # (distinct bits: the sum is an OR)
        block_bits = tl.sum(tl.max(valid, axis=1) << tiles, axis=0)
        # Moved into the score tile's column layout here, once: left to the compiler, the tile's
        # column test went through shared memory (two barriers) in every tile. A reduction over a
        # tensor in the layout of a dot's result (a dot of zeros) is the way to ask for that layout.
        pin = tl.dot(tl.zeros([BLOCK_M, 16], dt), tl.zeros([16, BLOCK_N], dt)).to(tl.int32)
        return tl.max(col_bits[None, :] + pin, axis=0), block_bits
    else:
        return 0, 0


@triton.jit
def _tile_keys(KPM, b, skpb, skpn, offs_n, n_mask, start_n, col_bits, block_bits,
               HAS_KPM: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_N: tl.constexpr, WARP_MMA: tl.constexpr = False):
    """:func:`_key_columns` of the key block at ``start_n``, from :func:`_key_bits`'s words when
    ``KEY_BITS`` (the planner's choice) and from the padding mask itself otherwise."""
    if HAS_KPM and KEY_BITS > 0:
        bit = 1 << (start_n // BLOCK_N)
        return (col_bits & bit) != 0, (block_bits & bit) != 0
    else:
        return _key_columns(KPM, b, skpb, skpn, offs_n, n_mask, HAS_KPM, WARP_MMA)


@triton.jit
def _key_end(start_m, LK, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """End of the keys query block ``start_m`` attends to (with a causal mask, none after its last row)."""
    if IS_CAUSAL:
        return tl.minimum(LK, start_m + BLOCK_M)
    else:
        return LK


@triton.jit
def _allowed(offs_m, offs_n, col_ok, IS_CAUSAL: tl.constexpr):
    """Which elements of a tile may attend: keys that exist and are not padding, causal order."""
    valid = col_ok[None, :]
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _add_bias(s, offs_m, offs_n, m_mask, n_mask, b, h, BIAS, sbb, sbh, sbm, sbn):
    """``s`` (log2 units) plus the tile of the additive bias, converted to log2 units."""
    bias = tl.load(_tile(BIAS + b * sbb + h * sbh, offs_m, offs_n, sbm, sbn), mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    return s + bias.to(tl.float32) * 1.4426950408889634


@triton.jit
def _masked_logits(s, offs_m, offs_n, m_mask, n_mask, col_ok, b, h, BIAS, sbb, sbh, sbm, sbn,
                   HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Mask (and bias) logits ``s`` given in log2 units."""
    if HAS_BIAS:
        s = _add_bias(s, offs_m, offs_n, m_mask, n_mask, b, h, BIAS, sbb, sbh, sbm, sbn)
    return tl.where(_allowed(offs_m, offs_n, col_ok, IS_CAUSAL), s, float("-inf"))


def dropout_rate(p: float) -> float:
    """The dropout rate the kernels apply for a requested ``p``: the nearest multiple of 1/256
    (their draws are 8-bit, as FlashAttention's), at least 1/256 when ``p > 0``. The kept scores
    are scaled by ``1 / (1 - rate)``, so the output's expectation stays exact."""
    if p == 0.0:
        return 0.0
    steps = max(1, round(p * 256))
    if steps >= 256:
        raise ValueError(f"dropout_p={p} rounds to 1 on the triton backend (rates are multiples of 1/256); "
                         "use at most 255/256 or backend='torch'")
    return steps / 256


@triton.jit
def _keep_threshold(dropout_p):
    """An 8-bit draw ``u`` is kept where ``u >= p * 2**8``; ``u`` is an integer, so that is
    ``u >= ceil(p * 2**8)``: an integer compare, no int-to-float conversion per element."""
    return tl.ceil(dropout_p * 256.0).to(tl.uint32)


@triton.jit
def _keep_bytes(r, thr):
    """Which of the four 8-bit draws of a 32-bit Philox word are kept (``>= thr``), as two new last
    dimensions: byte ``2 y + x`` at ``[..., x, y]``. Each byte is compared in place, masked, with
    the threshold shifted to it: one AND and one compare (the top byte: one compare)."""
    return tl.join(tl.join((r & 0xFF) >= thr, (r & 0xFF00) >= (thr << 8)),
                   tl.join((r & 0xFF0000) >= (thr << 16), r >= (thr << 24)))


@triton.jit
def _keep_tile(seed, bh, offs_m, start_n, dropout_p, BLOCK_N: tl.constexpr):
    """Dropout keep mask of the tile ``offs_m x [start_n, start_n + BLOCK_N)``, kept where an 8-bit
    draw >= p * 2**8 (``p`` a multiple of 1/256, see :func:`dropout_rate`). One Philox call (seed;
    ``(j // 32) * 4 + (j // 2) % 4``, i0, batch*head, 0), i0 = i - (i & 8), gives sixteen draws: rows
    i0 and i0 + 8, keys ``32a + 8t + 2q + {0, 1}`` (t = 0..3), the elements one thread holds of two
    rows of an MMA accumulator tile (rows g and g + 8 of each 16-row slab, two adjacent columns every
    eight), so the compiler draws them in the score tile's own layout, not through shared memory.
    Word ``2 (i & 8 > 0) + t // 2``, byte ``2 (t % 2) + j % 2``. Query blocks start at multiples of 16."""
    M: tl.constexpr = offs_m.shape[0]
    SPANS: tl.constexpr = (BLOCK_N + 31) // 32
    low = tl.min(tl.reshape(offs_m, [M // 16, 2, 8]), axis=1)  # the lower row of each pair
    calls = ((start_n // 32 + tl.arange(0, SPANS)) * 4)[:, None] + tl.arange(0, 4)[None, :]
    c0 = calls[None, None, :, :] + tl.zeros([M // 16, 8, SPANS, 4], tl.int32)
    c1 = low[:, :, None, None] + tl.zeros([M // 16, 8, SPANS, 4], tl.int32)
    c2 = tl.zeros(c0.shape, tl.int32) + bh
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c2 * 0, PHILOX_ROUNDS)
    thr = _keep_threshold(dropout_p)
    if BLOCK_N >= 32:
        # [M16, 8, span, q, j % 2, t % 2, t // 2, row hi] -> [M16, row hi, 8, span, t // 2, t % 2, q, j % 2]
        u = tl.join(tl.join(_keep_bytes(r0, thr), _keep_bytes(r1, thr)),
                    tl.join(_keep_bytes(r2, thr), _keep_bytes(r3, thr)))
        u = tl.permute(u, (0, 7, 1, 2, 6, 5, 3, 4))
    else:  # 16 keys: t // 2 is the half of its 32-key span the tile is
        upper = (start_n // 16) % 2 == 1
        u = tl.join(_keep_bytes(tl.where(upper, r1, r0), thr), _keep_bytes(tl.where(upper, r3, r2), thr))
        u = tl.permute(u, (0, 6, 1, 2, 5, 3, 4))  # [M16, row hi, 8, 1, t % 2, q, j % 2]
    return tl.reshape(u, [M, BLOCK_N])


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc_a, acc_b, m_i, l_i, pl, pt, inner, start_n, start_m, q_a, q_b, qr, qr_side, qr_right, qd, dloc,
              offs_m, m_mask, offs_m_local, rcols, k_base, v_base, skn, skd, svn, svd, b, h, bh, KPM, skpb, skpn,
              BIAS, sbb, sbh, sbm, sbn, LK, qk_scale, seed, dropout_p,
              KMAX: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr,
              DA: tl.constexpr, DB: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PREC: tl.constexpr, BAND: tl.constexpr, SIDE_COL: tl.constexpr, ALIGN: tl.constexpr = 0,
              POS_SCALE: tl.constexpr = False, CVT_ASM: tl.constexpr = False, SKIP_PADDED: tl.constexpr = True,
              DIAG: tl.constexpr = False, col_bits=0, block_bits=0, KEY_BITS: tl.constexpr = 0,
              LEFT_FLOAT: tl.constexpr = False):
    """One key block of the online softmax. ``BAND``: the block meets the band ``|j - i| < k`` and
    every element needs its bucket; otherwise every element is in bucket ``SIDE_COL`` (0 or 2k)
    and the relative key term is the per-row ``qr_side``. ``SKIP_PADDED``: skip a key block of
    padding only (not worth its test, a block-wide reduction, when one block holds every key: then
    only a fully padded sequence would skip it, and its masked tile gives the same zeros)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = _below(start_n, BLOCK_N, LK)
    col_ok, any_key = _tile_keys(KPM, b, skpb, skpn, offs_n, n_mask, start_n, col_bits, block_bits,
                                 HAS_KPM, KEY_BITS, BLOCK_N, offs_m.shape[0] < WARPGROUP_ROWS)
    if not SKIP_PADDED:
        any_key = True
    if any_key:
        key_rows = _key_rows(start_n, BLOCK_N, LK)
        k_a, k_b = _load_split(k_base, key_rows, n_mask, skn, skd, DA, DB, DH, ALIGN, True)
        delta = start_n - start_m
        # The relative key term enters as the dot's accumulator, which pins it to the MMA layout.
        # Added after the dot, the gather's layout spread: the compiler kept the row statistics in
        # it and computed the softmax twice, once per layout (sm_90a, B128 h1 L75 dh90: 954 -> 633
        # instructions per key block per thread).
        if BAND and DIAG:
            left = _left_of_band(offs_m_local, delta, KMAX, BLOCK_N)
            right = _right_of_band(offs_m_local, delta, KMAX, BLOCK_N)
            rel = tl.where(left, qr_side[:, None], tl.where(right, qr_right[:, None], qd))
            # ``LEFT_FLOAT``: the bucket 0 sums below take ``left`` as a float tile. A predicate per
            # element does not live across the dots and the softmax (seven predicate registers): the
            # compiler recomputes and saves them (see fwd_config for the trade).
            left_f = tl.where(left, 1.0, 0.0) if LEFT_FLOAT else 0.0
        elif BAND:
            rel = tl.gather(qr, _band_tile_buckets(dloc, delta, KMAX), axis=1)
        else:
            rel = qr_side[:, None] + tl.zeros([1, BLOCK_N], tl.float32)
        s = tl.dot(q_a, tl.trans(k_a), rel, input_precision=DOT_PREC)
        if DB > 0:
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PREC)
        if HAS_BIAS or not POS_SCALE:
            s = _masked_logits(s * qk_scale, offs_m, offs_n, m_mask, n_mask, col_ok, b, h, BIAS, sbb, sbh, sbm, sbn,
                               HAS_BIAS, IS_CAUSAL)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
        else:  # a positive scale commutes with the max: scale and shift the logits in one FMA below
            s = _masked_logits(s, offs_m, offs_n, m_mask, n_mask, col_ok, b, h, BIAS, sbb, sbh, sbm, sbn,
                               HAS_BIAS, IS_CAUSAL)
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        # Rows with no allowed key so far keep m = -inf: subtract 0 instead (p = 0, no NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        if HAS_BIAS or not POS_SCALE:
            p = tl.exp2(s - m_use[:, None])
        else:
            p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            # kept, not yet scaled by 1 / (1 - p): the row sums and acc take that factor at the end
            keep = _keep_tile(seed, bh, offs_m, start_n, dropout_p, BLOCK_N)
            p = tl.where(keep, p, 0.0)
            if BAND and DIAG:
                s = tl.where(keep, s, float("-inf"))
        p_lo = _operand_barrier(p.to(q_a.dtype), HAS_DROPOUT and offs_m.shape[0] < WARPGROUP_ROWS)
        v_a = _load_rows(v_base, key_rows, n_mask, svn, svd, 0, DVA, DV, ALIGN, True)
        acc_a = tl.dot(p_lo, v_a, acc_a * alpha[:, None], input_precision=DOT_PREC)
        if DVB > 0:
            v_b = _load_rows(v_base, key_rows, n_mask, svn, svd, DVA, DVB, DV, ALIGN, True)
            acc_b = tl.dot(p_lo, v_b, acc_b * alpha[:, None], input_precision=DOT_PREC)
        # bucket 0 and inner sums of P~ and all of P~ (bucket 2k takes the rest)
        if BAND and DIAG:
            pl = pl * alpha + tl.sum(p * left_f if LEFT_FLOAT else tl.where(left, p, 0.0), axis=1)
            # the inner logits (see the band loop). With dropout, a fresh compare (``_in_band``) here
            # rather than the band predicates again (S2 with dropout: 530 -> 503 instructions per
            # tile); without, the compiler keeps those predicates better (365 -> 381 the other way).
            if HAS_DROPOUT:
                inner = tl.where(_in_band(offs_m_local, delta, KMAX, BLOCK_N), s, inner)
            else:
                inner = tl.where(left | right, inner, s)
        elif BAND:
            pl = pl * alpha + tl.sum(tl.where(_left_of_band(offs_m_local, delta, KMAX, BLOCK_N), p, 0.0), axis=1)
            if p_lo.dtype.primitive_bitwidth == 16:  # (P~ rounded as the dot takes it)
                even, odd = _column_pairs(p)
                bits, ok = _inner_diagonals_of_pairs(_round_pack(odd, even, p_lo.dtype, CVT_ASM), offs_m_local,
                                                     delta, rcols, KMAX, BLOCK_N)
                diag = tl.where(ok, bits.to(p_lo.dtype, bitcast=True).to(tl.float32), 0.0)
            else:
                diag = _inner_diagonals(p, offs_m_local, delta, rcols, KMAX, BLOCK_N)
            inner = inner * alpha[:, None] + diag
        elif SIDE_COL == 0:  # (before the band: no inner sums yet)
            pl = pl * alpha + tl.sum(p, axis=1)
        else:
            pl = pl * alpha
            inner = inner * alpha[:, None]
        pt = pt * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc_a, acc_b, m_i, l_i, pl, pt, inner


@triton.jit
def _band_key_range(start_m, hi, KMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks ``[0, lo)`` lie left of the band of query block ``start_m`` (bucket 0), blocks from
    ``lo`` up to ``mid`` meet it, blocks from ``end`` (the first after them) to ``hi`` lie right
    of it (bucket 2k)."""
    lo = tl.minimum(tl.maximum(start_m - KMAX + 1, 0) // BLOCK_N * BLOCK_N, hi)
    mid = tl.minimum(hi, start_m + BLOCK_M + KMAX - 1)
    end = lo + tl.cdiv(tl.maximum(mid - lo, 0), BLOCK_N) * BLOCK_N
    return lo, mid, end


@triton.jit
def _rmha_fwd_kernel(
    Q, K, V, RK, RV, KPM, BIAS, SEED, O, LSE, PSUM,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srkh, srkr, srkd,
    srvh, srvr, srvd,
    skpb, skpn,
    sbb, sbh, sbm, sbn,
    sob, soh, som, sod,
    H, LQ, LK, qk_scale, dropout_p,
    KMAX: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DH: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, ALIGN: tl.constexpr, POS_SCALE: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
    CVT_ASM: tl.constexpr, PTX: tl.constexpr = False, DIAG: tl.constexpr = False, KEY_BITS: tl.constexpr = 0,
    LEFT_FLOAT: tl.constexpr = False,
):
    R: tl.constexpr = 2 * KMAX + 1
    bh = tl.program_id(0)  # the large grid axis (axes 1 and 2 stop at 65535)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    dt = Q.dtype.element_ty

    start_m = pid_m * BLOCK_M
    offs_m_local = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m_local
    m_mask = offs_m < LQ
    rcols = tl.arange(0, R_PAD)
    r_mask = rcols < R
    dloc = tl.arange(0, BLOCK_N)[None, :] - offs_m_local[:, None]  # j - i inside a tile, minus start_n - start_m
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # q . rk for the 2k+1 buckets: [BLOCK_M, R_PAD], once per program; its outer columns serve
    # the key blocks outside the band.
    q_a = _load_rows(q_base, offs_m, m_mask, sqm, sqd, 0, DA, DH, ALIGN)
    rk_a = _load_rows(RK + h * srkh, rcols, r_mask, srkr, srkd, 0, DA, DH)
    qr = tl.dot(q_a, tl.trans(rk_a), input_precision=DOT_PREC)
    q_b = q_a
    if DB > 0:
        q_b = _load_rows(q_base, offs_m, m_mask, sqm, sqd, DA, DB, DH, ALIGN)
        rk_b = _load_rows(RK + h * srkh, rcols, r_mask, srkr, srkd, DA, DB, DH)
        qr = tl.dot(q_b, tl.trans(rk_b), qr, input_precision=DOT_PREC)

    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    col_bits, block_bits = _key_bits(KPM, b, skpb, skpn, LK, BLOCK_M, BLOCK_N, KEY_BITS, dt, HAS_KPM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DVA], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DVB if DVB > 0 else 16], tl.float32)
    pl = tl.zeros([BLOCK_M], tl.float32)  # bucket 0 sums of P~ (unnormalised)
    pt = tl.zeros([BLOCK_M], tl.float32)  # row sums of P~ (unnormalised)
    inner = tl.zeros([BLOCK_M, R_PAD], tl.float32)  # inner bucket sums of P~ (unnormalised)

    hi = _key_end(start_m, LK, IS_CAUSAL, BLOCK_M)
    lo_band, mid_band, end_band = _band_key_range(start_m, hi, KMAX, BLOCK_M, BLOCK_N)
    if ONE_KEY_BLOCK:
        # The one key block goes through the band loop (its general path: right for a block off
        # the band too, as when queries run past the keys); the other two loops are not compiled.
        lo_band = 0
        mid_band = hi
    # Each outer column of qr is taken right before its loop, so it lives across no other loop.
    if not ONE_KEY_BLOCK:
        qr_left = _table_col(qr, rcols, 0)
        for start_n in range(0, lo_band, BLOCK_N):
            acc_a, acc_b, m_i, l_i, pl, pt, inner = _fwd_tile(
                acc_a, acc_b, m_i, l_i, pl, pt, inner, start_n, start_m, q_a, q_b, qr, qr_left, m_i, m_i, dloc,
                offs_m, m_mask, offs_m_local, rcols, k_base, v_base, skn, skd, svn, svd, b, h, bh, KPM, skpb, skpn,
                BIAS, sbb, sbh, sbm, sbn, LK, qk_scale, seed, dropout_p, KMAX, BLOCK_N, DH, DV, DA, DB, DVA, DVB,
                HAS_KPM, HAS_BIAS, IS_CAUSAL, HAS_DROPOUT, DOT_PREC, False, 0, ALIGN, POS_SCALE, CVT_ASM,
                SKIP_PADDED=True, DIAG=False, col_bits=col_bits, block_bits=block_bits, KEY_BITS=KEY_BITS)
    # Band tiles (``DIAG``, planned when the 2k - 1 inner diagonals are at most a key block wide):
    # an inner element of row i lies in the same tile column in whichever tile holds it (key blocks
    # start at multiples of BLOCK_N), and in one tile only. So qd holds q . rk of each row's inner
    # bucket by tile column, taken once; a tile selects between it and the two outer columns with
    # two compares per element, and keeps its inner elements' logits in ``diag`` (per tile column),
    # whose P~ is taken after the band against the running max. Without DIAG every band tile
    # gathers from qr and from its P~ (see _inner_diagonals_of_pairs).
    if DIAG:
        tile_cols = tl.arange(0, BLOCK_N)[None, :]
        # (a column that is no row's inner bucket reads a clamped, unused bucket)
        qd = tl.gather(qr, tl.minimum((tile_cols - offs_m[:, None] + KMAX) & (BLOCK_N - 1), R_PAD - 1), axis=1)
        qr_left = _table_col(qr, rcols, 0)
        qr_right = _table_col(qr, rcols, 2 * KMAX)
        diag = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        for start_n in range(lo_band, mid_band, BLOCK_N):
            acc_a, acc_b, m_i, l_i, pl, pt, diag = _fwd_tile(
                acc_a, acc_b, m_i, l_i, pl, pt, diag, start_n, start_m, q_a, q_b, qr, qr_left, qr_right, qd, dloc,
                offs_m, m_mask, offs_m_local, rcols, k_base, v_base, skn, skd, svn, svd, b, h, bh, KPM, skpb, skpn,
                BIAS, sbb, sbh, sbm, sbn, LK, qk_scale, seed, dropout_p, KMAX, BLOCK_N, DH, DV, DA, DB, DVA, DVB,
                HAS_KPM, HAS_BIAS, IS_CAUSAL, HAS_DROPOUT, DOT_PREC, True, 0, ALIGN, POS_SCALE, CVT_ASM,
                not ONE_KEY_BLOCK, True, col_bits=col_bits, block_bits=block_bits, KEY_BITS=KEY_BITS,
                LEFT_FLOAT=LEFT_FLOAT)
        inner_cols = (offs_m[:, None] + rcols[None, :] - KMAX) & (BLOCK_N - 1)
        inner_s = tl.gather(diag, inner_cols, axis=1)
        if not HAS_BIAS and POS_SCALE:  # (the tiles' logits are not scaled yet)
            inner_s = inner_s * qk_scale
        m_band = tl.where(m_i == float("-inf"), 0.0, m_i)
        inner = tl.where((rcols[None, :] > 0) & (rcols[None, :] < 2 * KMAX), tl.exp2(inner_s - m_band[:, None]), 0.0)
    else:
        qr_band = qr
        if not ONE_KEY_BLOCK:  # (with one key block the tile skips no padding: no if, see _fwd_tile)
            qr_band = _gather_ready(qr)
        for start_n in range(lo_band, mid_band, BLOCK_N):
            acc_a, acc_b, m_i, l_i, pl, pt, inner = _fwd_tile(  # (band tiles ignore qr_side: m_i stands in)
                acc_a, acc_b, m_i, l_i, pl, pt, inner, start_n, start_m, q_a, q_b, qr_band, m_i, m_i, m_i, dloc,
                offs_m, m_mask, offs_m_local, rcols, k_base, v_base, skn, skd, svn, svd, b, h, bh, KPM, skpb, skpn,
                BIAS, sbb, sbh, sbm, sbn, LK, qk_scale, seed, dropout_p, KMAX, BLOCK_N, DH, DV, DA, DB, DVA, DVB,
                HAS_KPM, HAS_BIAS, IS_CAUSAL, HAS_DROPOUT, DOT_PREC, True, 0, ALIGN, POS_SCALE, CVT_ASM,
                not ONE_KEY_BLOCK, col_bits=col_bits, block_bits=block_bits, KEY_BITS=KEY_BITS)
    if not ONE_KEY_BLOCK:
        qr_right = _table_col(qr, rcols, 2 * KMAX)
        for start_n in range(end_band, hi, BLOCK_N):
            acc_a, acc_b, m_i, l_i, pl, pt, inner = _fwd_tile(
                acc_a, acc_b, m_i, l_i, pl, pt, inner, start_n, start_m, q_a, q_b, qr, qr_right, m_i, m_i, dloc,
                offs_m, m_mask, offs_m_local, rcols, k_base, v_base, skn, skd, svn, svd, b, h, bh, KPM, skpb, skpn,
                BIAS, sbb, sbh, sbm, sbn, LK, qk_scale, seed, dropout_p, KMAX, BLOCK_N, DH, DV, DA, DB, DVA, DVB,
                HAS_KPM, HAS_BIAS, IS_CAUSAL, HAS_DROPOUT, DOT_PREC, False, 2 * KMAX, ALIGN, POS_SCALE, CVT_ASM,
                SKIP_PADDED=True, DIAG=False, col_bits=col_bits, block_bits=block_bits, KEY_BITS=KEY_BITS)

    has_key = l_i > 0.0
    # log2-sum-exp; 0 for rows without keys (their logits are all -inf, so P recomputes as 0).
    lse = tl.where(has_key, m_i + _log2(tl.where(has_key, l_i, 1.0), PTX), 0.0)
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    p_sum = pt * inv_l  # the row sums of P~ (1 without dropout, 0 without keys), for the backward
    if HAS_DROPOUT:  # the kept probabilities' scale, left out of the tiles
        inv_l = inv_l * (1.0 / (1.0 - dropout_p))
    inner = inner * inv_l[:, None]
    left = pl * inv_l
    right = pt * inv_l - left - tl.sum(inner, axis=1)
    # (added, not selected: with k = 0 both outer buckets are bucket 0)
    pbn = inner + tl.where(rcols[None, :] == 0, left[:, None], 0.0) + tl.where(rcols[None, :] == 2 * KMAX, right[:, None], 0.0)
    pbn = pbn.to(dt)
    PAIRS: tl.constexpr = CVT_ASM and ALIGN < 16  # (rows not 16-byte aligned: see _store_rows)
    o_base = O + b * sob + h * soh
    rv_a = _load_rows(RV + h * srvh, rcols, r_mask, srvr, srvd, 0, DVA, DV)
    o_a = tl.dot(pbn, rv_a, acc_a * inv_l[:, None], input_precision=DOT_PREC)
    _store_rows(o_base, o_a, offs_m, m_mask, som, sod, 0, DVA, DV, ALIGN, False, PAIRS)
    if DVB > 0:
        rv_b = _load_rows(RV + h * srvh, rcols, r_mask, srvr, srvd, DVA, DVB, DV)
        o_b = tl.dot(pbn, rv_b, acc_b * inv_l[:, None], input_precision=DOT_PREC)
        _store_rows(o_base, o_b, offs_m, m_mask, som, sod, DVA, DVB, DV, ALIGN, False, PAIRS)
    tl.store(LSE + bh * LQ + offs_m, lse, mask=m_mask)
    tl.store(PSUM + bh * LQ + offs_m, p_sum, mask=m_mask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_query_block(q_base, do_base, o_base, lse_base, psum_base, offs_m, m_mask, sqm, sqd, sdom, sdod, som, sod,
                      rk_a, rk_b, rv_a, rv_b, scale, DA: tl.constexpr, DB: tl.constexpr, DH: tl.constexpr,
                      DVA: tl.constexpr, DVB: tl.constexpr, DV: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr = 0):
    """What the backward needs of one query block: q and dO (split at DA / DVA), D_i scale with
    D_i = rowsum(dO o O), q.rk^T and dO.rv^T over the buckets, and the forward's log-sum-exp and
    row sums of P~."""
    q_a = _load_rows(q_base, offs_m, m_mask, sqm, sqd, 0, DA, DH, ALIGN)
    do_a = _load_rows(do_base, offs_m, m_mask, sdom, sdod, 0, DVA, DV, ALIGN)
    di = tl.sum(do_a.to(tl.float32) * _load_rows(o_base, offs_m, m_mask, som, sod, 0, DVA, DV, ALIGN).to(tl.float32), axis=1)
    qr = tl.dot(q_a, tl.trans(rk_a), input_precision=DOT_PREC)
    dorv = tl.dot(do_a, tl.trans(rv_a), input_precision=DOT_PREC)
    q_b = q_a
    do_b = do_a
    if DB > 0:
        q_b = _load_rows(q_base, offs_m, m_mask, sqm, sqd, DA, DB, DH, ALIGN)
        qr = tl.dot(q_b, tl.trans(rk_b), qr, input_precision=DOT_PREC)
    if DVB > 0:
        do_b = _load_rows(do_base, offs_m, m_mask, sdom, sdod, DVA, DVB, DV, ALIGN)
        di += tl.sum(do_b.to(tl.float32) * _load_rows(o_base, offs_m, m_mask, som, sod, DVA, DVB, DV, ALIGN).to(tl.float32), axis=1)
        dorv = tl.dot(do_b, tl.trans(rv_b), dorv, input_precision=DOT_PREC)
    lse = tl.load(lse_base + offs_m, mask=m_mask, other=0.0)
    p_sum = tl.load(psum_base + offs_m, mask=m_mask, other=0.0)
    return q_a, q_b, do_a, do_b, di * scale, qr, dorv, lse, p_sum


@triton.jit
def _bwd_tile(q_a, q_b, k_a, k_b, v_a, v_b, do_a, do_b, qr, dorv, di_scaled, lse,
              offs_m, offs_n, start_n, m_mask, n_mask, col_ok, b, h, bh,
              BIAS, sbb, sbh, sbm, sbn, seed, dropout_p, qk_scale, scale,
              KMAX: tl.constexpr, DB: tl.constexpr, DVB: tl.constexpr,
              HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Recompute one tile: P~ (the kept probabilities, not yet scaled by 1 / (1 - p): dv and the P~
    bucket sums take that factor at the end) and dS (w.r.t. q.k + q.rk). The relative terms of
    the elements are gathered from the per-row tables ``qr`` and ``dorv`` by bucket."""
    # j - i from the row and column indices (a hoisted [BLOCK_M, BLOCK_N] table would hold registers)
    bucket = _band_tile_buckets(offs_n[None, :] - offs_m[:, None], 0, KMAX)
    # (the gathered terms enter as the dots' accumulators, as in _fwd_tile)
    qk = tl.dot(q_a, tl.trans(k_a), tl.gather(qr, bucket, axis=1), input_precision=DOT_PREC)
    if DB > 0:
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PREC)
    # one FMA per element to the exponent; masked after the exp2, which holds for either sign of
    # the scale (a masked element's exp2 may overflow: the select drops it)
    s = qk * qk_scale - lse[:, None]
    if HAS_BIAS:
        s = _add_bias(s, offs_m, offs_n, m_mask, n_mask, b, h, BIAS, sbb, sbh, sbm, sbn)
    p = tl.where(_allowed(offs_m, offs_n, col_ok, IS_CAUSAL), tl.exp2(s), 0.0)
    # dP~_ij = dO_i . (v_j + rv[r(i,j)])
    dpt = tl.dot(do_a, tl.trans(v_a), tl.gather(dorv, bucket, axis=1), input_precision=DOT_PREC)
    if DVB > 0:
        dpt = tl.dot(do_b, tl.trans(v_b), dpt, input_precision=DOT_PREC)
    # dS = P (dP - D) scale, as P (dP~ keep c - D scale): one FMA and one multiply per element
    if HAS_DROPOUT:
        keep = _keep_tile(seed, bh, offs_m, start_n, dropout_p, offs_n.shape[0])
        inv_keep = 1.0 / (1.0 - dropout_p)
        # kept, not yet scaled by 1 / (1 - p): dv and the P~ bucket sums take that factor at the end
        p_drop = tl.where(keep, p, 0.0)
        ds = p * (tl.where(keep, dpt, 0.0) * (inv_keep * scale) - di_scaled[:, None])
    else:
        p_drop = p
        ds = p * (dpt * scale - di_scaled[:, None])
    return p_drop, ds


@triton.jit
def _meets_band(delta, KMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether a tile with ``delta = start_n - start_m`` holds an element with ``|j - i| < k``."""
    return (delta < BLOCK_M + KMAX - 1) & (delta > 1 - BLOCK_N - KMAX)


@triton.jit
def _bucket_table(inner, left, total, rcols, KMAX: tl.constexpr):
    """Bucket sums ``[M, R_PAD]`` from the inner diagonals, the bucket 0 sums and the row sums."""
    right = total - left - tl.sum(inner, axis=1)
    # (added, not selected: with k = 0 both outer buckets are bucket 0)
    return inner + tl.where(rcols[None, :] == 0, left[:, None], 0.0) + tl.where(rcols[None, :] == 2 * KMAX, right[:, None], 0.0)


@triton.jit
def _row_stats(p, ds, left_p, left_ds, total_ds, offs_m, start_n, delta,
               KMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add one tile to a query block's bucket 0 sums of P~ and dS and its row sums of dS (those of P~
    come from the forward). Called before the tile's GEMMs, so that P~ and dS in float32 die
    there (kept past the GEMMs they spilled: S2 1232 -> 460 B). The dS row sums stay summed, not
    set to their exact value 0: dS carries the rounding of D = dO . O (O stored in 16 bits), and
    bucket 2k = total - the others keeps that error per bucket instead of moving all of it into
    bucket 2k. A tile left of the band takes the band tiles' path (all its elements are left of
    the band): one compiled path, not two."""
    total_ds += tl.sum(ds, axis=1)
    if delta < BLOCK_M + KMAX - 1:  # meets the band or lies left of it
        left = _left_of_band(offs_m, start_n, KMAX, BLOCK_N)
        left_p += tl.sum(tl.where(left, p, 0.0), axis=1)
        left_ds += tl.sum(tl.where(left, ds, 0.0), axis=1)
    return left_p, left_ds, total_ds


@triton.jit
def _finish_query_block(q_a, q_b, do_a, do_b, dq_a, dq_b, rk_base, srkr, srkd, row,
                        left_p, total_p, left_ds, total_ds, inner_p, inner_ds, rcols, offs_m, m_mask, dq_base,
                        sdqm, sdqd, p_scale, dt, KMAX: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr,
                        DB: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr, DOT_PREC: tl.constexpr,
                        ALIGN: tl.constexpr = 0, PAIRS: tl.constexpr = False, PTX: tl.constexpr = False):
    """A query block whose keys are all visited: its bucket tables give the table gradients
    (``drk[r] += sum_i dS_bucket[i, r] q_i``, ``drv[r] += sum_i P~_bucket[i, r] dO_i``, added to this
    program's partial row ``row``, which only it touches) and the relative part of
    ``dq_i = sum_j dS_ij (k_j + rk[r(i, j)])``; dq is written once. The tables and the partial
    sums live in memory, not in registers across the tile loops."""
    R: tl.constexpr = 2 * KMAX + 1
    r_mask = rcols < R
    dsb = _bucket_table(inner_ds, left_ds, total_ds, rcols, KMAX).to(dt)
    pbt = (_bucket_table(inner_p, left_p, total_p, rcols, KMAX) * p_scale).to(dt)  # (see _bwd_tile)
    drv_row = row + R * DH
    ROW_ALIGN: tl.constexpr = 8 if DH % 2 == 0 and DV % 2 == 0 else 0  # (a row holds R x (DH + DV) floats)
    _dot_add_rows(row, rcols, r_mask, DH, dsb, q_a, 0, DA, DH, DOT_PREC, PTX, ROW_ALIGN)
    _dot_add_rows(drv_row, rcols, r_mask, DV, pbt, do_a, 0, DVA, DV, DOT_PREC, PTX, ROW_ALIGN)
    if DB > 0:
        _dot_add_rows(row, rcols, r_mask, DH, dsb, q_b, DA, DB, DH, DOT_PREC, PTX, ROW_ALIGN)
    if DVB > 0:
        _dot_add_rows(drv_row, rcols, r_mask, DV, pbt, do_b, DVA, DVB, DV, DOT_PREC, PTX, ROW_ALIGN)
    rk_a = _load_rows(rk_base, rcols, r_mask, srkr, srkd, 0, DA, DH)
    dq_a = tl.dot(dsb, rk_a, dq_a, input_precision=DOT_PREC)
    _store_rows(dq_base, dq_a, offs_m, m_mask, sdqm, sdqd, 0, DA, DH, ALIGN, False, PAIRS)
    if DB > 0:
        rk_b = _load_rows(rk_base, rcols, r_mask, srkr, srkd, DA, DB, DH)
        dq_b = tl.dot(dsb, rk_b, dq_b, input_precision=DOT_PREC)
        _store_rows(dq_base, dq_b, offs_m, m_mask, sdqm, sdqd, DA, DB, DH, ALIGN, False, PAIRS)


@triton.jit
def _store_kv_rows(dk_base, dv_base, dk_a, dk_b, dv_a, dv_b, rows, row_ok, sdkn, sdkd, sdvn, sdvd,
                   DA: tl.constexpr, DB: tl.constexpr, DH: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
                   DV: tl.constexpr, ALIGN: tl.constexpr, PAIRS: tl.constexpr = False):
    """``dk, dv`` rows of a key block, each in its two head-size parts (the second only where the
    head size is not a power of two); ``PAIRS``: :func:`_store_rows`' column pairs where it can."""
    _store_rows(dk_base, dk_a, rows, row_ok, sdkn, sdkd, 0, DA, DH, ALIGN, False, PAIRS)
    _store_rows(dv_base, dv_a, rows, row_ok, sdvn, sdvd, 0, DVA, DV, ALIGN, False, PAIRS)
    if DB > 0:
        _store_rows(dk_base, dk_b, rows, row_ok, sdkn, sdkd, DA, DB, DH, ALIGN, False, PAIRS)
    if DVB > 0:
        _store_rows(dv_base, dv_b, rows, row_ok, sdvn, sdvd, DVA, DVB, DV, ALIGN, False, PAIRS)


@triton.jit
def _rmha_bwd_kernel(
    Q, K, V, RK, RV, KPM, BIAS, SEED, O, DO, LSE, PSUM, DQ, DK, DV_, DTAB, ACC,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srkh, srkr, srkd,
    srvh, srvr, srvd,
    skpb, skpn,
    sbb, sbh, sbm, sbn,
    sob, soh, som, sod,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    B, H, LQ, LK, B_PER_PROG, NBG, qk_scale, scale, dropout_p,
    KMAX: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DH: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FUSED_DQ: tl.constexpr, KV_IN_REGS: tl.constexpr, KV_DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIGN: tl.constexpr, CVT_ASM: tl.constexpr, PTX: tl.constexpr = False, KEY_BITS: tl.constexpr = 0,
):
    R: tl.constexpr = 2 * KMAX + 1
    PAIRS: tl.constexpr = CVT_ASM and ALIGN < 16  # (dq and final dk, dv rows not 16-byte aligned: _store_rows)
    WARP_MMA: tl.constexpr = BLOCK_M < WARPGROUP_ROWS  # (see _mask_barrier)
    DBX: tl.constexpr = DB if DB > 0 else 16
    DVBX: tl.constexpr = DVB if DVB > 0 else 16
    pid1 = tl.program_id(0)  # the large grid axis (axes 1 and 2 stop at 65535)
    pid_blk = tl.program_id(1)
    h = pid1 // NBG
    bg = pid1 % NBG
    dt = Q.dtype.element_ty

    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    rk_base = RK + h * srkh
    rv_base = RV + h * srvh
    offs_m_local = tl.arange(0, BLOCK_M)

    # this program's share of the table gradients: one row of the partial buffer, zeroed here and
    # added to per query block
    row = DTAB + ((h * NBG + bg) * tl.num_programs(1) + pid_blk) * (R * DH + R * DV)
    _store_rows(row, tl.zeros([R_PAD, DA], tl.float32), offs_r, r_mask, DH, 1, 0, DA, DH)
    _store_rows(row + R * DH, tl.zeros([R_PAD, DVA], tl.float32), offs_r, r_mask, DV, 1, 0, DVA, DV)
    if DB > 0:
        _store_rows(row, tl.zeros([R_PAD, DBX], tl.float32), offs_r, r_mask, DH, 1, DA, DB, DH)
    if DVB > 0:
        _store_rows(row + R * DH, tl.zeros([R_PAD, DVBX], tl.float32), offs_r, r_mask, DV, 1, DVA, DVB, DV)

    seed = 0
    p_scale = 1.0  # P~ leaves the tiles unscaled by 1 / (1 - p) (see _bwd_tile); x * 1.0 compiles to x
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        p_scale = 1.0 / (1.0 - dropout_p)
    # this program's fp32 dk, dv accumulators for a whole sequence (one-pass mode, several key blocks);
    # rows padded to the split head sizes: 16-byte aligned, no column masks
    DHP: tl.constexpr = DA + DB
    DVP: tl.constexpr = DVA + DVB
    acc_k = ACC + pid1 * LK * (DHP + DVP)
    acc_v = acc_k + LK * DHP

    b_end = tl.minimum(B, (bg + 1) * B_PER_PROG)
    for b in range(bg * B_PER_PROG, b_end):
        bh = b * H + h
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        o_base = O + b * sob + h * soh
        do_base = DO + b * sdob + h * sdoh
        dq_base = DQ + b * sdqb + h * sdqh
        dk_base = DK + b * sdkb + h * sdkh
        dv_base = DV_ + b * sdvb + h * sdvh
        col_bits, block_bits = _key_bits(KPM, b, skpb, skpn, LK, BLOCK_M, BLOCK_N, KEY_BITS, dt, HAS_KPM)

        if FUSED_DQ:
            # ---- one pass: query blocks outside, key blocks inside; dq and the bucket sums of a
            # query block are complete after its key loop, dk and dv after the last query block ----
            offs_kv = tl.arange(0, BLOCK_N)
            if KV_IN_REGS:  # one key block holds every key
                dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
                dk_b = tl.zeros([BLOCK_N, DBX], tl.float32)
                dv_a = tl.zeros([BLOCK_N, DVA], tl.float32)
                dv_b = tl.zeros([BLOCK_N, DVBX], tl.float32)
            elif not KV_DIRECT:
                for z in range(0, LK, BLOCK_N):
                    rows = z + offs_kv
                    row_ok = rows < LK
                    _store_rows(acc_k, tl.zeros([BLOCK_N, DA], tl.float32), rows, row_ok, DHP, 1, 0, DA, DHP, 16)
                    _store_rows(acc_v, tl.zeros([BLOCK_N, DVA], tl.float32), rows, row_ok, DVP, 1, 0, DVA, DVP, 16)
                    if DB > 0:
                        _store_rows(acc_k, tl.zeros([BLOCK_N, DBX], tl.float32), rows, row_ok, DHP, 1, DA, DB, DHP, 16)
                    if DVB > 0:
                        _store_rows(acc_v, tl.zeros([BLOCK_N, DVBX], tl.float32), rows, row_ok, DVP, 1, DVA, DVB, DVP, 16)
            for start_m in range(0, LQ, BLOCK_M):
                tl.debug_barrier()  # accumulator and partial rows written by other threads before
                offs_m = start_m + offs_m_local
                m_mask = _below(start_m, BLOCK_M, LQ)
                rk_a, rk_b = _load_split(rk_base, offs_r, r_mask, srkr, srkd, DA, DB, DH)
                rv_a, rv_b = _load_split(rv_base, offs_r, r_mask, srvr, srvd, DVA, DVB, DV)
                q_a, q_b, do_a, do_b, di_scaled, qr, dorv, lse, p_sum = _load_query_block(
                    q_base, do_base, o_base, LSE + bh * LQ, PSUM + bh * LQ, offs_m, m_mask,
                    sqm, sqd, sdom, sdod, som, sod,
                    rk_a, rk_b, rv_a, rv_b, scale, DA, DB, DH, DVA, DVB, DV, DOT_PREC, ALIGN)
                qr = _gather_ready(qr)
                dorv = _gather_ready(dorv)
                dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
                dq_b = tl.zeros([BLOCK_M, DBX], tl.float32)
                left_p = tl.zeros([BLOCK_M], tl.float32)
                left_ds = tl.zeros([BLOCK_M], tl.float32)
                total_ds = tl.zeros([BLOCK_M], tl.float32)
                inner_a, inner_b = _inner_zeros(BLOCK_M, R_PAD, dt)
                for start_n in range(0, _key_end(start_m, LK, IS_CAUSAL, BLOCK_M), BLOCK_N):
                    offs_n = start_n + offs_kv
                    n_mask = _below(start_n, BLOCK_N, LK)
                    col_ok, any_key = _tile_keys(KPM, b, skpb, skpn, offs_n, n_mask, start_n, col_bits, block_bits,
                                                 HAS_KPM, KEY_BITS, BLOCK_N, WARP_MMA)
                    if any_key:  # a fully padded key block: P = dS = 0, nothing to add
                        key_rows = _key_rows(start_n, BLOCK_N, LK)
                        k_a, k_b = _load_split(k_base, key_rows, n_mask, skn, skd, DA, DB, DH, ALIGN, True)
                        v_a, v_b = _load_split(v_base, key_rows, n_mask, svn, svd, DVA, DVB, DV, ALIGN, True)
                        delta = start_n - start_m
                        p_drop, ds = _bwd_tile(q_a, q_b, k_a, k_b, v_a, v_b, do_a, do_b, qr, dorv, di_scaled, lse,
                                               offs_m, offs_n, start_n, m_mask, n_mask, col_ok, b, h, bh,
                                               BIAS, sbb, sbh, sbm, sbn, seed, dropout_p, qk_scale, scale,
                                               KMAX, DB, DVB, HAS_BIAS, IS_CAUSAL, HAS_DROPOUT, DOT_PREC)
                        left_p, left_ds, total_ds = _row_stats(
                            p_drop, ds, left_p, left_ds, total_ds, offs_m, start_n, delta, KMAX, BLOCK_M, BLOCK_N)
                        p_lo = _operand_barrier(p_drop.to(dt), HAS_DROPOUT and WARP_MMA)
                        ds_lo = _operand_barrier(ds.to(dt), HAS_DROPOUT and WARP_MMA)
                        if _meets_band(delta, KMAX, BLOCK_M, BLOCK_N):
                            inner_a, inner_b = _add_band_grads(inner_a, inner_b, p_drop, ds, dt, offs_m_local, delta,
                                                               offs_r, KMAX, BLOCK_N, CVT_ASM)
                        dq_a = tl.dot(ds_lo, k_a, dq_a, input_precision=DOT_PREC)
                        if DB > 0:
                            dq_b = tl.dot(ds_lo, k_b, dq_b, input_precision=DOT_PREC)
                        if KV_IN_REGS:
                            dv_a = tl.dot(tl.trans(p_lo), do_a, dv_a, input_precision=DOT_PREC)
                            dk_a = tl.dot(tl.trans(ds_lo), q_a, dk_a, input_precision=DOT_PREC)
                            if DVB > 0:
                                dv_b = tl.dot(tl.trans(p_lo), do_b, dv_b, input_precision=DOT_PREC)
                            if DB > 0:
                                dk_b = tl.dot(tl.trans(ds_lo), q_b, dk_b, input_precision=DOT_PREC)
                        elif KV_DIRECT:  # the only query block: this key block's dk, dv are complete
                            # (each part stored as soon as it is computed: fewer live registers)
                            _store_rows(dv_base, tl.dot(tl.trans(p_lo), do_a, input_precision=DOT_PREC) * p_scale,
                                        offs_n, n_mask, sdvn, sdvd, 0, DVA, DV, ALIGN, PTX, CVT_ASM)
                            _store_rows(dk_base, tl.dot(tl.trans(ds_lo), q_a, input_precision=DOT_PREC),
                                        offs_n, n_mask, sdkn, sdkd, 0, DA, DH, ALIGN, PTX, CVT_ASM)
                            if DVB > 0:
                                _store_rows(dv_base, tl.dot(tl.trans(p_lo), do_b, input_precision=DOT_PREC) * p_scale,
                                            offs_n, n_mask, sdvn, sdvd, DVA, DVB, DV, ALIGN, PTX, CVT_ASM)
                            if DB > 0:
                                _store_rows(dk_base, tl.dot(tl.trans(ds_lo), q_b, input_precision=DOT_PREC),
                                            offs_n, n_mask, sdkn, sdkd, DA, DB, DH, ALIGN, PTX, CVT_ASM)
                        else:  # read-modify-write of this program's accumulator rows (no other program touches them)
                            _dot_add_rows(acc_v, offs_n, n_mask, DVP, p_lo, do_a, 0, DVA, DVP, DOT_PREC, PTX, 16)
                            _dot_add_rows(acc_k, offs_n, n_mask, DHP, ds_lo, q_a, 0, DA, DHP, DOT_PREC, PTX, 16)
                            if DVB > 0:
                                _dot_add_rows(acc_v, offs_n, n_mask, DVP, p_lo, do_b, DVA, DVB, DVP, DOT_PREC, PTX, 16)
                            if DB > 0:
                                _dot_add_rows(acc_k, offs_n, n_mask, DHP, ds_lo, q_b, DA, DB, DHP, DOT_PREC, PTX, 16)
                inner_p, inner_ds = _inner_tables(inner_a, inner_b, dt)
                _finish_query_block(
                    q_a, q_b, do_a, do_b, dq_a, dq_b, rk_base, srkr, srkd, row,
                    left_p, p_sum, left_ds, total_ds, inner_p, inner_ds, offs_r, offs_m, m_mask, dq_base,
                    sdqm, sdqd, p_scale, dt, KMAX, DH, DV, DA, DB, DVA, DVB, DOT_PREC, ALIGN, PAIRS, PTX)
            if KV_IN_REGS:
                kv_ok = offs_kv < LK
                _store_kv_rows(dk_base, dv_base, dk_a, dk_b, dv_a * p_scale, dv_b * p_scale, offs_kv, kv_ok,
                               sdkn, sdkd, sdvn, sdvd, DA, DB, DH, DVA, DVB, DV, ALIGN, PAIRS)
            elif KV_DIRECT:
                # the key blocks the query block skipped (all padding, or after it when causal):
                # dk = dv = 0 (a second, cheap look at the mask keeps these stores out of the tile loop)
                for z in range(0, LK, BLOCK_N):
                    rows = z + offs_kv
                    row_ok = rows < LK
                    _cols, any_key = _tile_keys(KPM, b, skpb, skpn, rows, row_ok, z, col_bits, block_bits,
                                                HAS_KPM, KEY_BITS, BLOCK_N)
                    if (not any_key) | (z >= _key_end(0, LK, IS_CAUSAL, BLOCK_M)):  # (the tile loop's bound)
                        _store_kv_rows(dk_base, dv_base, tl.zeros([BLOCK_N, DA], tl.float32),
                                       tl.zeros([BLOCK_N, DBX], tl.float32), tl.zeros([BLOCK_N, DVA], tl.float32),
                                       tl.zeros([BLOCK_N, DVBX], tl.float32), rows, row_ok,
                                       sdkn, sdkd, sdvn, sdvd, DA, DB, DH, DVA, DVB, DV, ALIGN, PAIRS)
            else:
                tl.debug_barrier()
                for z in range(0, LK, BLOCK_N):
                    rows = z + offs_kv
                    row_ok = rows < LK
                    acc_k_a, acc_k_b = _load_split(acc_k, rows, row_ok, DHP, 1, DA, DB, DHP, 16)
                    acc_v_a, acc_v_b = _load_split(acc_v, rows, row_ok, DVP, 1, DVA, DVB, DVP, 16)
                    _store_kv_rows(dk_base, dv_base, acc_k_a, acc_k_b, acc_v_a * p_scale, acc_v_b * p_scale, rows, row_ok,
                                   sdkn, sdkd, sdvn, sdvd, DA, DB, DH, DVA, DVB, DV, ALIGN, PAIRS)
                tl.debug_barrier()  # the next sequence zeroes the accumulator rows again
        else:
            # ---- split, key block pid_blk: dk, dv ----
            start_n = pid_blk * BLOCK_N
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < LK
            col_ok, any_key = _key_columns(KPM, b, skpb, skpn, offs_n, n_mask, HAS_KPM, WARP_MMA)
            key_rows = _key_rows(start_n, BLOCK_N, LK)
            k_a, k_b = _load_split(k_base, key_rows, n_mask, skn, skd, DA, DB, DH, ALIGN, True)
            v_a, v_b = _load_split(v_base, key_rows, n_mask, svn, svd, DVA, DVB, DV, ALIGN, True)
            dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
            dk_b = tl.zeros([BLOCK_N, DBX], tl.float32)
            dv_a = tl.zeros([BLOCK_N, DVA], tl.float32)
            dv_b = tl.zeros([BLOCK_N, DVBX], tl.float32)
            lo = 0
            if IS_CAUSAL:
                lo = (start_n // BLOCK_M) * BLOCK_M
            hi = tl.where(start_n < LK, LQ, 0)
            hi = tl.where(any_key, hi, 0)  # a fully padded key block: dk = dv = 0
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_m_local
                m_mask = _below(start_m, BLOCK_M, LQ)
                rk_a, rk_b = _load_split(rk_base, offs_r, r_mask, srkr, srkd, DA, DB, DH)
                rv_a, rv_b = _load_split(rv_base, offs_r, r_mask, srvr, srvd, DVA, DVB, DV)
                q_a, q_b, do_a, do_b, di_scaled, qr, dorv, lse, p_sum = _load_query_block(
                    q_base, do_base, o_base, LSE + bh * LQ, PSUM + bh * LQ, offs_m, m_mask,
                    sqm, sqd, sdom, sdod, som, sod,
                    rk_a, rk_b, rv_a, rv_b, scale, DA, DB, DH, DVA, DVB, DV, DOT_PREC, ALIGN)
                delta = start_n - start_m
                p_drop, ds = _bwd_tile(q_a, q_b, k_a, k_b, v_a, v_b, do_a, do_b, qr, dorv, di_scaled, lse,
                                       offs_m, offs_n, start_n, m_mask, n_mask, col_ok, b, h, bh,
                                       BIAS, sbb, sbh, sbm, sbn, seed, dropout_p, qk_scale, scale,
                                       KMAX, DB, DVB, HAS_BIAS, IS_CAUSAL, HAS_DROPOUT, DOT_PREC)
                p_lo = _operand_barrier(p_drop.to(dt), HAS_DROPOUT and WARP_MMA)
                ds_lo = _operand_barrier(ds.to(dt), HAS_DROPOUT and WARP_MMA)
                dv_a = tl.dot(tl.trans(p_lo), do_a, dv_a, input_precision=DOT_PREC)
                dk_a = tl.dot(tl.trans(ds_lo), q_a, dk_a, input_precision=DOT_PREC)
                if DVB > 0:
                    dv_b = tl.dot(tl.trans(p_lo), do_b, dv_b, input_precision=DOT_PREC)
                if DB > 0:
                    dk_b = tl.dot(tl.trans(ds_lo), q_b, dk_b, input_precision=DOT_PREC)
            _store_kv_rows(dk_base, dv_base, dk_a, dk_b, dv_a * p_scale, dv_b * p_scale, offs_n, n_mask,
                           sdkn, sdkd, sdvn, sdvd, DA, DB, DH, DVA, DVB, DV, ALIGN, PAIRS)

            # ---- split, query block pid_blk: dq and the table gradients, visiting the key blocks again ----
            start_m = pid_blk * BLOCK_M
            offs_m = start_m + offs_m_local
            m_mask = offs_m < LQ
            rk_a, rk_b = _load_split(rk_base, offs_r, r_mask, srkr, srkd, DA, DB, DH)
            rv_a, rv_b = _load_split(rv_base, offs_r, r_mask, srvr, srvd, DVA, DVB, DV)
            q_a, q_b, do_a, do_b, di_scaled, qr, dorv, lse, p_sum = _load_query_block(
                q_base, do_base, o_base, LSE + bh * LQ, PSUM + bh * LQ, offs_m, m_mask, sqm, sqd, sdom, sdod, som, sod,
                rk_a, rk_b, rv_a, rv_b, scale, DA, DB, DH, DVA, DVB, DV, DOT_PREC, ALIGN)
            qr = _gather_ready(qr)
            dorv = _gather_ready(dorv)
            dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
            dq_b = tl.zeros([BLOCK_M, DBX], tl.float32)
            left_p = tl.zeros([BLOCK_M], tl.float32)
            left_ds = tl.zeros([BLOCK_M], tl.float32)
            total_ds = tl.zeros([BLOCK_M], tl.float32)
            inner_a, inner_b = _inner_zeros(BLOCK_M, R_PAD, dt)
            hi_n = tl.where(start_m < LQ, _key_end(start_m, LK, IS_CAUSAL, BLOCK_M), 0)
            for start_n2 in range(0, hi_n, BLOCK_N):
                offs_n2 = start_n2 + tl.arange(0, BLOCK_N)
                n_mask2 = _below(start_n2, BLOCK_N, LK)
                col_ok2, any_key2 = _tile_keys(KPM, b, skpb, skpn, offs_n2, n_mask2, start_n2, col_bits, block_bits,
                                               HAS_KPM, KEY_BITS, BLOCK_N, WARP_MMA)
                if any_key2:
                    key_rows2 = _key_rows(start_n2, BLOCK_N, LK)
                    k2_a, k2_b = _load_split(k_base, key_rows2, n_mask2, skn, skd, DA, DB, DH, ALIGN, True)
                    v2_a, v2_b = _load_split(v_base, key_rows2, n_mask2, svn, svd, DVA, DVB, DV, ALIGN, True)
                    delta2 = start_n2 - start_m
                    p2, ds2 = _bwd_tile(q_a, q_b, k2_a, k2_b, v2_a, v2_b, do_a, do_b, qr, dorv, di_scaled, lse,
                                        offs_m, offs_n2, start_n2, m_mask, n_mask2, col_ok2, b, h, bh,
                                        BIAS, sbb, sbh, sbm, sbn, seed, dropout_p, qk_scale, scale,
                                        KMAX, DB, DVB, HAS_BIAS, IS_CAUSAL, HAS_DROPOUT, DOT_PREC)
                    left_p, left_ds, total_ds = _row_stats(
                        p2, ds2, left_p, left_ds, total_ds, offs_m, start_n2, delta2, KMAX, BLOCK_M, BLOCK_N)
                    ds2_lo = _operand_barrier(ds2.to(dt), HAS_DROPOUT and WARP_MMA)
                    if _meets_band(delta2, KMAX, BLOCK_M, BLOCK_N):
                        inner_a, inner_b = _add_band_grads(inner_a, inner_b, p2, ds2, dt, offs_m_local, delta2,
                                                           offs_r, KMAX, BLOCK_N, CVT_ASM)
                    dq_a = tl.dot(ds2_lo, k2_a, dq_a, input_precision=DOT_PREC)
                    if DB > 0:
                        dq_b = tl.dot(ds2_lo, k2_b, dq_b, input_precision=DOT_PREC)
            if start_m < LQ:
                tl.debug_barrier()  # the partial row written by other threads before
                inner_p, inner_ds = _inner_tables(inner_a, inner_b, dt)
                _finish_query_block(
                    q_a, q_b, do_a, do_b, dq_a, dq_b, rk_base, srkr, srkd, row,
                    left_p, p_sum, left_ds, total_ds, inner_p, inner_ds, offs_r, offs_m, m_mask, dq_base,
                    sdqm, sdqd, p_scale, dt, KMAX, DH, DV, DA, DB, DVA, DVB, DOT_PREC, ALIGN, PAIRS, PTX)


@triton.jit
def _sum_row_groups_kernel(P, OUT1, OUT2, ROWS_PER_OUT, C, C1, COL0, COL1,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """For columns ``COL0 <= c < COL1`` of ``P [G * ROWS_PER_OUT, C]``: the sum over the rows of
    group ``t``, in a fixed order, written to ``OUT1[t, c]`` for ``c < C1`` and
    ``OUT2[t, c - C1]`` beyond (two tables share one partial buffer)."""
    t = tl.program_id(0)
    offs_c = COL0 + tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < COL1
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    base = P + t.to(tl.int64) * ROWS_PER_OUT * C
    for r0 in range(0, ROWS_PER_OUT, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(base + rows[:, None] * C + offs_c[None, :], mask=(rows < ROWS_PER_OUT)[:, None] & c_mask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(OUT1 + t * C1 + offs_c, total.to(OUT1.dtype.element_ty), mask=c_mask & (offs_c < C1))
    tl.store(OUT2 + t * (C - C1) + (offs_c - C1), total.to(OUT2.dtype.element_ty), mask=c_mask & (offs_c >= C1))


def plan_sum_row_groups(partial: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> list[Launch]:
    """Launches summing ``partial [R, C]`` (float32, contiguous) into ``out1 [G1, C1]`` (its first
    ``C1`` columns, over groups of ``R / G1`` rows) and ``out2 [G2, C - C1]`` (the rest, groups of
    ``R / G2`` rows): one launch when ``G1 == G2``, else one per table."""
    c = partial.shape[1]
    c1 = out1[0].numel()
    spans = [(out1.shape[0], 0, c)] if out1.shape[0] == out2.shape[0] else [(out1.shape[0], 0, c1), (out2.shape[0], c1, c)]
    launches = []
    for groups, col0, col1 in spans:
        rows = partial.shape[0] // groups
        # Wide row tiles and many column programs: the loop is short, so the latency of its
        # dependent loads (not bandwidth) stays small. A knob for GPU tuning.
        block_c = min(32, _launch.next_pow2(max(col1 - col0, 16)))
        block_r = max(1, min(128, _launch.next_pow2(rows)))
        launches.append(Launch(
            _sum_row_groups_kernel, (groups, triton.cdiv(col1 - col0, block_c)),
            dict(P=partial, OUT1=out1, OUT2=out2, ROWS_PER_OUT=rows, C=c, C1=c1, COL0=col0, COL1=col1),
            dict(BLOCK_R=block_r, BLOCK_C=block_c), num_warps=4,
        ))
    return launches


# ----------------------------------------------------------------------------------------------
# planning: configs per shape class, launch records
# ----------------------------------------------------------------------------------------------


def check_kernel_inputs(op: str, q, v, rel_k, max_rows: int, span: str) -> None:
    """The head-size, table and dtype limits the relative-attention family's kernels share; ``span``
    names the table limit in the op's terms (e.g. "clipping distances k <= 64")."""
    dh, dv = q.shape[-1], v.shape[-1]
    if max(dh, dv) > MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: the triton backend supports head sizes up to {MAX_HEAD_DIM}, got "
            f"dh={dh}, dh_v={dv}; use backend='torch'"
        )
    if rel_k.shape[-2] > max_rows:
        raise ValueError(
            f"{op}: the triton backend supports {span} "
            f"(tables of at most {max_rows} rows), got {rel_k.shape[-2]} rows; use backend='torch'"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: the triton backend supports float16, bfloat16 and float32, got {q.dtype}")


def _check_supported(q, v, rel_k) -> None:
    check_kernel_inputs("relative_attention", q, v, rel_k, MAX_BUCKETS,
                        f"clipping distances k <= {(MAX_BUCKETS - 1) // 2}")
    _launch.check_int32_indexing("relative_attention", q, v)


def _bias_strides(bias: torch.Tensor | None):
    if bias is None:
        return 0, 0, 0, 0
    # Broadcast dims (size 1) are read with stride 0, so one [1, 1, L, L] mask serves every row.
    return tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))


def fwd_config(b, h, lq, lk, dh, dv, device, dtype, dropout_p=0.0):
    """Block sizes for the forward (a small table keyed on sequence and head sizes)."""
    sms = _launch.num_sms(device)
    widest = max(_launch.pad16(dh), _launch.pad16(dv))
    # 64-key blocks at most: a 64 x 128 tile needs 8 warps (16 score elements per thread, the
    # per-tile work dominates) and still spills (benchmarks/static_report.py, L = 200, dh = 64)
    block_n = min(max(16, _launch.next_pow2(lk)), 64)
    if 64 < lk <= 256:
        # A tile meeting the band costs about twice one off it (the gathers), and 32-key blocks
        # halve the band's share of the keys (static sm_90a, instructions per score element over
        # the kernel: L = 128 dh 64 44.8 -> 41.8, L = 200 dh 64 53.0 -> 47.2, dh 32 49.5 -> 41.8;
        # at L = 512 the band is a small share and 64 stays, 24.0 against 24.6).
        block_n = 32
    block_m = min(max(16, _launch.next_pow2(lq)), 64 if widest <= 128 else 32)
    if 64 < widest <= 128 and lq <= 128:
        # Wide heads, one query block per sequence: 128 queries over 8 warps and 32-key tiles
        # leave registers for the wide accumulators (B128 h1 L75 dh90: spills 200 -> 0 B,
        # modelled 9.7 -> 8.6 us; at L = 200 the 64 x 64 tile models faster and stays).
        block_m = max(16, _launch.next_pow2(lq))
        block_n = min(block_n, 32)
    # Programs short of the SMs (a 10% tail allowed): split a sequence's queries over more programs.
    while block_m > 16 and b * h * triton.cdiv(lq, block_m) < 0.9 * sms:
        block_m //= 2
    cfg = _launch.knobs(
        "rmha_fwd", block_m=block_m, block_n=block_n,
        num_warps=4 if block_m * block_n <= 64 * 64 and block_m < 128 else 8,
        num_stages=1 if lk <= block_n else 2, diag=-1, key_bits=-1, left_float=-1,
    )
    if cfg["diag"] < 0:
        # Band tiles by tile column (see _rmha_fwd_kernel) up to 16 score elements per thread; with
        # 32 the compiler keeps no predicates across the tile and recomputes the band compares
        # (sm_90a, B512 h2 L50 dh32, one 64 x 64 tile: 787 -> 1125 instructions per thread; B256 h2
        # L200 dh64, 64 x 32 band tiles: 532 -> 446, modelled 28.3 -> 27.5 us). And from three key
        # blocks: over two its two gathers per query block cost about what the band tiles save
        # (B512 h2 L64 dh32, 64 x 32: 6.40 -> 6.13 us, with dropout 7.55 -> 7.75); over three they
        # pay (B128 h1 L75 dh90, 128 x 32 on 8 warps: 2.81 -> 2.70 us, with dropout 3.26 -> 3.24;
        # B256 h2 L80 dh64: 8.51 -> 7.93, 10.37 -> 9.93; B512 h2 L96 dh32: 15.65 -> 14.72, 18.86 ->
        # 19.07, the one loss).
        cfg["diag"] = int(cfg["block_m"] * cfg["block_n"] <= 16 * 32 * cfg["num_warps"] and lk > 2 * cfg["block_n"])
    if cfg["left_float"] < 0:
        # By-column band tiles, the left-of-band mask as a float tile for the bucket 0 sums: fewer
        # instructions, more registers (sm_90a, B256 h2 L200 dh64, 64 x 32 tiles: 384 -> 365 per
        # tile, modelled 25.6 -> 24.8 us, but 165 -> 192 registers, three CTAs per SM -> two; a GPU
        # choice). With dropout it cost more than it saved (530 -> 539 instructions).
        cfg["left_float"] = int(dropout_p == 0.0)
    return cfg


def bwd_config(b, h, lq, lk, dh, dv, device, dtype):
    """Backward mode and block sizes. ``fused`` (one pass: every tile's P~ and dS computed once, dq
    written once per query block) up to 256 keys when there are enough (batch, head) pairs to fill
    the card: a program owns whole sequences, query blocks outside, key blocks inside; dk and dv
    stay in registers when one key block holds every key, are stored per key block when one query
    block holds every query, else accumulate in a per-program fp32 buffer.
    ``split`` otherwise (long sequences, few pairs)."""
    sms = _launch.num_sms(device)
    widest = max(_launch.pad16(dh), _launch.pad16(dv))
    whole = max(16, _launch.next_pow2(lk))
    if whole <= 256 and 2 * b * h >= sms:
        mode = "fused"
        # (measured with benchmarks/static_report.py: spills and instructions per score element)
        block_n = whole if whole <= 64 else 64
        block_m = 128 if (block_n < whole and widest <= 128) else 64
    else:
        mode = "split"
        block_n = 64 if (lk >= 128 and widest <= 64) else 32
        block_m = block_n
    cfg = _launch.knobs("rmha_bwd", mode=mode, block_m=block_m, block_n=block_n, b_per_prog=0, num_warps=0,
                        num_stages=1, key_bits=-1)
    if cfg["mode"] not in ("fused", "split"):
        raise ValueError(f"rmha_bwd mode must be 'fused' or 'split', got {cfg['mode']!r}")
    cfg["block_m"] = min(cfg["block_m"], max(16, _launch.next_pow2(lq)))
    cfg["block_n"] = min(cfg["block_n"], whole)
    nblk = 1 if cfg["mode"] == "fused" else max(triton.cdiv(lq, cfg["block_m"]), triton.cdiv(lk, cfg["block_n"]))
    if not cfg["num_warps"]:
        # 8 warps only for 128-row blocks: a warpgroup's MMA takes 64 rows, and with 8 warps over a
        # 64-row block both warpgroups computed the same score tile (sm_90a, B128 h1 L75 dh90:
        # 64 x 64 on 8 warps 11.2 us modelled, 128 x 64 on 8 warps 7.8; split mode at L = 512
        # dh 90, 32 x 32 tiles: 8 warps 65.5 us, 4 warps 40.5)
        small = cfg["block_m"] * cfg["block_n"] <= 64 * 64 and cfg["block_n"] <= 128 and widest <= 64
        cfg["num_warps"] = 4 if (small or cfg["block_m"] < 128) else 8
    if not cfg["b_per_prog"]:
        # Several sequences per program when there are many: fewer partial table rows (a short
        # reduction after), and as many programs as fit the card at once (two per SM with 4 warps,
        # one with 8: the kernel uses most registers), so no partial second wave.
        slots = sms * (2 if cfg["num_warps"] <= 4 else 1)
        cfg["b_per_prog"] = max(1, min(16, triton.cdiv(b * h * nblk, slots)))
    cfg["nblk"] = nblk
    return cfg


def _common_constexprs(q, v, rel_k, kpm, bias, is_causal, dropout_p):
    da, db = _launch.split_pow2(q.shape[-1])
    dva, dvb = _launch.split_pow2(v.shape[-1])
    kmax = (rel_k.shape[-2] - 1) // 2
    return dict(
        KMAX=kmax, R_PAD=max(16, _launch.next_pow2(2 * kmax + 1)),
        DH=q.shape[-1], DV=v.shape[-1], DA=da, DB=db, DVA=dva, DVB=dvb,
        HAS_KPM=kpm is not None, HAS_BIAS=bias is not None, IS_CAUSAL=bool(is_causal),
        HAS_DROPOUT=dropout_p > 0.0, DOT_PREC=_launch.dot_precision(q.dtype),
        CVT_ASM=_launch.packed_cvt(q.device),  # (see _round_pack)
        PTX=_launch.inline_ptx(q.device),  # (see _dot_add_rows, _log2)
    )


def _row_alignment(*tensors: torch.Tensor) -> int:
    """Bytes (a power of two, at most 16) dividing the address of every row (last dimension) of
    these tensors: the kernels load and store head rows with vectors that wide. Triton itself only
    sees 16-byte alignment, so a head size of 90 in a fused projection (rows 4-byte aligned) would
    be read one element at a time. 0 (no hint) when a last stride is not 1."""
    return min(_launch.run_alignment(t) for t in tensors)


def _table_strides(t: torch.Tensor):
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1), t.stride(2)


def _key_bit_tiles(kpm, lk, block_n, wanted) -> int:
    """``KEY_BITS``: the key blocks :func:`_key_bits` packs (a power of two), 0 where the tiles load
    their padding bytes: no padding mask, more than 32 key blocks (a bit each in an int32), or not
    ``wanted`` (a config knob: -1 leaves it to the number of key blocks, see fwd_config)."""
    tiles = triton.cdiv(lk, block_n)
    if wanted < 0:
        # Packing costs a load of the whole row, two reductions and a dot per program: over three
        # key blocks it cost more than it saved (sm_90a, B128 h1 L75 dh90: 2.81 -> 3.0 us
        # modelled), from four it saves (B256 h2 L200 dh64, seven blocks: 27.2 -> 25.6 us; the
        # backward's four 64-key blocks: 50.4 -> 48.6 us, but spills 52 -> 172 B, the bits of its
        # 16 columns per thread held over the sequence; block bits alone: 49.6 us, 68 B).
        wanted = tiles >= 4
    return max(2, _launch.next_pow2(tiles)) if kpm is not None and wanted and tiles <= 32 else 0


def plan_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale):
    """Allocate ``out [B, h, Lq, dv]``, ``lse`` and ``p_sums`` (``[B, h, Lq]`` float32: the rows'
    log2-sum-exp and their sums of ``P~``, which the backward reads) and plan the launch."""
    _check_supported(q, v, rel_k)
    b, h, lq, dh = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    out = _launch.empty((b, h, lq, dv), q.dtype, q.device)
    lse = _launch.empty((b, h, lq), torch.float32, q.device)
    p_sums = _launch.empty((b, h, lq), torch.float32, q.device)
    cfg = fwd_config(b, h, lq, lk, dh, dv, q.device, q.dtype, dropout_p)
    kpm_t = kpm.view(torch.uint8) if kpm is not None else q
    bias_t = bias if bias is not None else q
    seed_t = seed if seed is not None else q
    args = dict(
        Q=q, K=k, V=v, RK=rel_k, RV=rel_v, KPM=kpm_t, BIAS=bias_t, SEED=seed_t, O=out, LSE=lse, PSUM=p_sums,
        sqb=q.stride(0), sqh=q.stride(1), sqm=q.stride(2), sqd=q.stride(3),
        skb=k.stride(0), skh=k.stride(1), skn=k.stride(2), skd=k.stride(3),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svd=v.stride(3),
    )
    args.update(zip(("srkh", "srkr", "srkd"), _table_strides(rel_k)))
    args.update(zip(("srvh", "srvr", "srvd"), _table_strides(rel_v)))
    args.update(skpb=kpm.stride(0) if kpm is not None else 0, skpn=kpm.stride(1) if kpm is not None else 0)
    args.update(zip(("sbb", "sbh", "sbm", "sbn"), _bias_strides(bias)))
    args.update(sob=out.stride(0), soh=out.stride(1), som=out.stride(2), sod=out.stride(3))
    args.update(H=h, LQ=lq, LK=lk, qk_scale=float(scale) * LOG2E, dropout_p=float(dropout_p))
    constexprs = _common_constexprs(q, v, rel_k, kpm, bias, is_causal, dropout_p)
    constexprs.update(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], ALIGN=_row_alignment(q, k, v, out),
                      POS_SCALE=scale > 0, ONE_KEY_BLOCK=lk <= cfg["block_n"],
                      DIAG=bool(cfg["diag"]) and 2 * constexprs["KMAX"] - 1 <= cfg["block_n"],
                      KEY_BITS=_key_bit_tiles(kpm, lk, cfg["block_n"], cfg["key_bits"]))
    constexprs.update(LEFT_FLOAT=constexprs["DIAG"] and bool(cfg["left_float"]))
    launch = Launch(_rmha_fwd_kernel, (b * h, triton.cdiv(lq, cfg["block_m"])), args, constexprs,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse, p_sums, [launch]


def plan_backward(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums, is_causal, dropout_p, scale):
    """Allocate ``dq, dk, dv, drk, drv`` and plan the two launches (main kernel, table reduction)."""
    b, h, lq, dh = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    n_buckets = rel_k.shape[-2]
    cfg = bwd_config(b, h, lq, lk, dh, dv, q.device, q.dtype)
    nblk = cfg["nblk"]
    nbg = triton.cdiv(b, cfg["b_per_prog"])
    dq = _launch.empty(q.shape, q.dtype, q.device)
    dk = _launch.empty(k.shape, k.dtype, k.device)
    dvv = _launch.empty(v.shape, v.dtype, v.device)
    width = n_buckets * (dh + dv)
    partial = _launch.empty((h * nbg * nblk, width), torch.float32, q.device)
    kv_in_regs = cfg["mode"] != "fused" or cfg["block_n"] >= lk
    # one-pass mode over several key blocks and one query block: each key block's dk, dv are
    # complete after it; over several query blocks, each program's fp32 accumulators (one sequence)
    kv_direct = not kv_in_regs and cfg["block_m"] >= lq
    acc = _launch.empty((h * nbg, lk * (sum(_launch.split_pow2(dh)) + sum(_launch.split_pow2(dv))))
                        if not (kv_in_regs or kv_direct) else (1,), torch.float32, q.device)
    # rel_k and rel_v may differ in sharing (one per head or one for all heads)
    drk = _launch.empty((rel_k.shape[0], n_buckets, dh), rel_k.dtype, q.device)
    drv = _launch.empty((rel_v.shape[0], n_buckets, dv), rel_v.dtype, q.device)
    kpm_t = kpm.view(torch.uint8) if kpm is not None else q
    args = dict(
        Q=q, K=k, V=v, RK=rel_k, RV=rel_v, KPM=kpm_t, BIAS=bias if bias is not None else q,
        SEED=seed if seed is not None else q, O=out, DO=dout, LSE=lse, PSUM=p_sums,
        DQ=dq, DK=dk, DV_=dvv, DTAB=partial, ACC=acc,
        sqb=q.stride(0), sqh=q.stride(1), sqm=q.stride(2), sqd=q.stride(3),
        skb=k.stride(0), skh=k.stride(1), skn=k.stride(2), skd=k.stride(3),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svd=v.stride(3),
    )
    args.update(zip(("srkh", "srkr", "srkd"), _table_strides(rel_k)))
    args.update(zip(("srvh", "srvr", "srvd"), _table_strides(rel_v)))
    args.update(skpb=kpm.stride(0) if kpm is not None else 0, skpn=kpm.stride(1) if kpm is not None else 0)
    args.update(zip(("sbb", "sbh", "sbm", "sbn"), _bias_strides(bias)))
    for prefix, t in (("so", out), ("sdo", dout), ("sdq", dq), ("sdk", dk), ("sdv", dvv)):
        args.update({f"{prefix}b": t.stride(0), f"{prefix}h": t.stride(1)})
        args.update({f"{prefix}{'n' if prefix in ('sdk', 'sdv') else 'm'}": t.stride(2), f"{prefix}d": t.stride(3)})
    args.update(B=b, H=h, LQ=lq, LK=lk, B_PER_PROG=cfg["b_per_prog"], NBG=nbg,
                qk_scale=float(scale) * LOG2E, scale=float(scale), dropout_p=float(dropout_p))
    constexprs = _common_constexprs(q, v, rel_k, kpm, bias, is_causal, dropout_p)
    constexprs.update(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], FUSED_DQ=cfg["mode"] == "fused",
                      KV_IN_REGS=kv_in_regs, KV_DIRECT=kv_direct, ALIGN=_row_alignment(dout, q, k, v, out, dq, dk, dvv),
                      KEY_BITS=_key_bit_tiles(kpm, lk, cfg["block_n"], cfg["key_bits"]))
    main = Launch(_rmha_bwd_kernel, (h * nbg, nblk), args, constexprs,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq, dk, dvv, drk, drv, [main, *plan_sum_row_groups(partial, drk, drv)]


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
