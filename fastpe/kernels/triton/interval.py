"""Fused time-interval attention (TiSASRec, Li, Wang and McAuley 2020) in Triton.

Math (see :mod:`fastpe.reference.relative_attention`), with ``r_ij = min(|tau_i - tau_j|, K)``::

    s_ij = scale * q_i . (k_j + rk[r_ij]) + bias_ij      (masked: -inf)
    P = softmax_j(s), P~ = dropout(P)
    o_i = sum_j P~_ij v_j + sum_r W_ir rv[r],   W_ir = sum_{j: r_ij = r} P~_ij

``tau`` (the per-position time steps) comes in as ``[B, L]`` int32 (:func:`interval_steps`) and
the bucket of every score element is computed in the kernel; no ``[L, L]`` index tensor exists.
K is typically 256, more than the sequence length, so nothing may loop over the buckets: every
score element costs O(1) in K.

Key side: ``q_i . rk[r]`` for the K buckets below the clip is a ``[BLOCK_M, K]`` GEMM per query
block, written to a scratch slot the program owns (L1/L2-resident), with the clip bucket K in
column K, and read back per score element at a computed address (one unpredicated load). The
backward does the same for ``dO_i . rv[r]``.

Value side and table gradients need the per-row bucket sums ``W`` of ``P~`` (and of ``dS``):
a scatter, which Triton lacks. Chosen: **integer atomics into the program's own scratch slot**.
Each score element below the clip adds its value, in fixed point, to ``W[i, r_ij]``;
integer addition is associative, so the sums are bitwise reproducible whatever order the atomics
land in, and they are exact sums of the truncated fp32 values. The fixed-point scale needs a
bound on the row's total: ``1/(1-p)`` for ``P~`` (a normalised row; int32 in the forward, down
to 2^-30 of the bound, see ``P_FIXED_BITS``), and for ``dS`` the per-row bound
``2 scale (|dO_i| max_j |v_j| + max_r |dO_i . rv[r]|) / (1-p)`` (Cauchy-Schwarz;
``|D_i| <= max_j |dP~_ij|``), doubled as slack and rounded to a power of two so that the
conversions are exact. The backward adds a bucket's ``P~`` and ``dS`` with one 64-bit atomic, the
two fixed-point values packed (``PACK_SHIFT``: ``P~`` down to 2^-26, ``dS`` to 2^-33 of the bound).
The clip bucket K (often most pairs) is summed in registers instead. After the key loop the
program reads its slot back (atomic exchange with 0, which also clears it for the next block)
and applies ``W`` with GEMMs: ``o += W rv``, ``dq += W_dS rk``, and per-program partial table
gradients ``W_dS^T q``, ``W_P~^T dO`` in its own rows of a partial buffer, summed by a second
kernel in a fixed order (deterministic, no float atomics). The tables are built, and the sums
read back, only over the 64-bucket chunks the query block's elements may use (bounded by the
smallest and largest time steps of the block's rows and keys): per query row the tables cost
O(K) at most, less when the block's times span fewer than K steps. Rows past the end of the
sequence add nothing, so the chunks a block skips stay clear.
The fixed point costs one fp32 -> integer conversion and one predicated integer reduction per
element below the clip (32-bit for the forward's ``P~``; in the backward one 64-bit reduction
for ``P~`` and ``dS`` packed, see ``PACK_SHIFT``: ptxas compiles each predicated atomic to a
branch around it; see benchmarks/results/static_sm90_tisas.md for the instruction counts).

The alternatives weighed: a per-row sort by bucket (``tl.sort`` on packed keys) with a segmented
scan keeps float sums but costs O(log^2 BLOCK_N) compare-exchange stages per element and a
``[BLOCK_M, BLOCK_N]`` int64 key tile in registers; relying on sorted timestamps (buckets
monotone on either side of the diagonal) needs an unsorted-row fallback anyway. Atomics cost one
L2 reduction per element below the clip, keep no sorted tile, and take timestamps in any order.

Within a program, ``tl.debug_barrier`` orders the slot's table stores, the atomics and the
read-back between its threads (the pattern of a block-wide histogram in global memory). The
interpreter runs programs one thread at a time, so only the GPU tests (marked ``gpu``) check it.

Forward: programs are persistent (one scratch slot each, so scratch is bounded by the number of
programs, not the batch) and walk (batch*head, query block) tiles. ``P`` is normalised before
it is accumulated (fixed point needs a known bound): with one key block per sequence (the usual
case, L <= BLOCK_N) the block's logits give the row max and sum directly; with several, a first
pass computes them (the log-sum-exp) and a second one accumulates.

Backward: persistent programs own whole (batch, head) sequences; per query block they recompute
``P`` from the log-sum-exp, accumulate ``dq`` in registers and ``dk, dv`` in registers too when
one key block holds the sequence (L <= BLOCK_N, as the RMHA kernels do), else in float32 rows of
the sequence (load-add-store by the owning program: deterministic), and the bucket sums as above.

Fully padded key blocks are skipped, padded keys and values are never read (they may hold NaN),
rows with no allowed key give output 0 and zero gradients. Dropout: Philox as in
:mod:`fastpe.kernels.triton.rmha` (rates multiples of 1/256), with 16-bit draws, eight per call for
one row (:func:`_keep_tile`); the backward regenerates the forward's keep decisions.
Head sizes are padded to a multiple of 16 as two power-of-two chunks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastpe.backends import triton_interpreter_enabled
from fastpe.kernels.triton import _launch
from fastpe.kernels.triton._launch import Launch
from fastpe.kernels.triton._limits import MAX_INTERVAL_BUCKETS
from fastpe.kernels.triton.rmha import (
    LOG2E,
    PHILOX_ROUNDS,
    WARPGROUP_ROWS,
    _bias_strides,
    _dot_add_rows,
    _key_bit_tiles,
    _key_bits,
    _key_columns,
    _key_end,
    _load_rows,
    _load_split,
    _log2,
    _masked_logits,
    _operand_barrier,
    _row_alignment,
    _store_rows,
    _sum_row_groups_kernel,
    _table_strides,
    _tile_keys,
    check_kernel_inputs,
)

# The backward packs a bucket's two sums into one int64, dS above bit PACK_SHIFT and P~ below it,
# and adds both with one atomic: total = sum(dS) * 2**PACK_SHIFT + sum(P~), exact in int64 (modulo
# 2**64 on the way). P~ sums are >= 0 and below 2**(PACK_P_BITS - 1) (the proof under
# P_FIXED_BITS, with 27 bits for 31), so the low PACK_SHIFT bits are the P~ sum and the arithmetic
# shift right is the dS sum. dS sums stay below 2**FIXED_BITS (half the doubled bound) in
# magnitude, so the total stays below 2**(FIXED_BITS + PACK_SHIFT) <= 2**62.
PACK_SHIFT = 28
PACK_P_BITS = 27  # P~ resolution 2**-26 of a row's mass (p = 0)
FIXED_BITS = 34  # dS resolution 2**-33 of the row's bound
_FIXED_BITS = tl.constexpr(FIXED_BITS)
_PACK_SHIFT = tl.constexpr(PACK_SHIFT)
_PACK_P_MASK = tl.constexpr((1 << PACK_SHIFT) - 1)
# Fixed-point P~ bucket sums are int32. Proof that they cannot overflow: a row of P (normalised)
# sums to 1, so the row of P~ = P * keep / (1 - p) sums to at most 1 / (1 - p); the scale is
# S = 2**(P_FIXED_BITS - ceil(log2(2 / (1 - p)))) <= 2**30 (1 - p), so every element, every bucket
# sum and the row's total are at most S / (1 - p) <= 2**30 in fixed point (truncation only
# lowers them). fp32 rounding of the softmax, of the 1 / (1 - p) factor and of p * S adds a
# relative few units in 2**-24 per element: the row total stays below 2**30 (1 + 2**-10), far
# under 2**31 - 1. Resolution: 2**-30 of the bound, 1e-9 of the row's mass for p <= 0.5.
P_FIXED_BITS = 31


# ----------------------------------------------------------------------------------------------
# helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _draw_halves(r):
    """The two 16-bit draws of a 32-bit Philox word, low half first, as a new last dimension."""
    return tl.join(r & 0xFFFF, r >> 16)


@triton.jit
def _keep_tile(seed, bh, offs_m, start_n, dropout_p, BLOCK_N: tl.constexpr):
    """Dropout keep mask of the tile ``offs_m x [start_n, start_n + BLOCK_N)``, kept where a 16-bit
    draw >= p * 2**16 (``p`` a multiple of 1/256, see :func:`fastpe.kernels.triton.rmha.dropout_rate`:
    exact). Key ``j`` of row ``i`` takes half ``j % 2`` of word ``(j // 8) % 4`` of the Philox call
    (seed; ``(j // 32) * 4 + (j // 2) % 4``, i, batch*head, 0): a call's eight draws serve keys
    ``32a + 8t + 2q + {0, 1}`` (t = 0..3) of one row.
    Not the relative attention's 8-bit draws for two rows per call: these kernels' tiles (16 or 32
    rows, warps side by side along the keys) took them through shared memory, and cost more per
    element (sm_90a: S1 backward 130.4 -> 142.2, S2 backward 142.6 -> 148.3 instructions per
    element with dropout). (The tiles' dot operands that derive from the mask pass
    ``rmha._operand_barrier``: its ``tl.join`` would narrow their register fragments.)"""
    M: tl.constexpr = offs_m.shape[0]
    SPANS: tl.constexpr = (BLOCK_N + 31) // 32
    calls = ((start_n // 32 + tl.arange(0, SPANS)) * 4)[:, None] + tl.arange(0, 4)[None, :]
    c0 = calls[None, :, :] + tl.zeros([M, SPANS, 4], tl.int32)
    c1 = offs_m[:, None, None] + tl.zeros([M, SPANS, 4], tl.int32)
    c2 = tl.zeros(c0.shape, tl.int32) + bh
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c2 * 0, PHILOX_ROUNDS)
    if BLOCK_N >= 32:
        # [M, span, q, half, t % 2, t // 2] -> [M, span, t // 2, t % 2, q, half]: key 32 span + 8 t + 2 q + half
        u = tl.join(tl.join(_draw_halves(r0), _draw_halves(r1)), tl.join(_draw_halves(r2), _draw_halves(r3)))
        u = tl.permute(u, (0, 1, 5, 4, 2, 3))
    else:  # 16 keys: words 0, 1 or 2, 3 by the half of its 32-key span the tile is
        upper = (start_n // 16) % 2 == 1
        u = tl.join(_draw_halves(tl.where(upper, r2, r0)), _draw_halves(tl.where(upper, r3, r1)))
        u = tl.permute(u, (0, 1, 4, 2, 3))  # [M, 1, t % 2, q, half]
    return tl.reshape(u, [M, BLOCK_N]) >= tl.ceil(dropout_p * 65536.0).to(tl.uint32)


@triton.jit
def _buckets(tau_m, tau_n, KT: tl.constexpr):
    """``min(|tau_i - tau_j|, K)`` of a tile (int32 steps, see :func:`interval_steps`)."""
    return tl.minimum(tl.abs(tau_m[:, None] - tau_n[None, :]), KT)


@triton.jit
def _key_block(start_n, TAU, b, stb, KPM, skpb, skpn, tau_m, L, KT: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_KPM: tl.constexpr, col_bits=0, block_bits=0, KEY_BITS: tl.constexpr = 0):
    """The key block at ``start_n``: its key offsets, which keys exist and are not padding (and
    whether any does; from the packed bits of ``rmha._key_bits`` when ``KEY_BITS``) and each
    element's bucket."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < L
    col_ok, any_key = _tile_keys(KPM, b, skpb, skpn, offs_n, n_mask, start_n, col_bits, block_bits,
                                 HAS_KPM, KEY_BITS, BLOCK_N, tau_m.shape[0] < WARPGROUP_ROWS)
    tau_n = tl.load(TAU + b * stb + offs_n, mask=n_mask, other=0)
    return offs_n, n_mask, col_ok, any_key, _buckets(tau_m, tau_n, KT)


@triton.jit
def _address(table, idx):
    """Byte address of ``table[idx]`` per element, for inline PTX."""
    return table.to(tl.int64, bitcast=True) + idx.to(tl.int64) * table.dtype.element_ty.primitive_bitwidth // 8


@triton.jit
def _gather(table, idx, PTX: tl.constexpr):
    """Per-element value of a per-row bucket table in a scratch slot (``table``: the slot, ``idx``:
    row * KP + bucket, one int32 offset per element shared by every table of the slot). Column K
    holds the clip bucket, so every element reads its own column, unpredicated (a load predicated
    on "below the clip and valid" with the clip's value as the default, and that validity tile,
    cost 17 more instructions per element: B256 h2 L200 dh64 forward, sm_90a). Elements not valid
    (padding keys, rows past the sequence) may read columns of chunks nobody built: stale or
    never-written scratch, harmless for logits the mask replaces; the backward starts its
    ``dO . rv`` table at zero, so their ``dS = P~ (...)`` stays 0 (see the tests).

    ``PTX``: one ``ld.global`` per element, in the layout the element already has (the score
    tile's MMA layout). ``tl.load`` of a computed address takes a layout of its own (the
    coalescing pass gives every gather a blocked one), and the compiler then recomputed the
    buckets, and reloaded the time steps and the padding mask, in that layout too, or moved tiles
    through shared memory. The load is marked pure (a side effect here cost 7% of the S1
    forward's loop: the compiler then keeps every copy), so ``table`` must come from
    :func:`_published` after the barrier that publishes the table: nothing can move it above."""
    if PTX:
        return tl.inline_asm_elementwise(
            "ld.global.b32 $0, [$1];", "=r,l", [_address(table, idx)], dtype=tl.int32, is_pure=True,
            pack=1).to(tl.float32, bitcast=True)
    return tl.load(table + idx)


@triton.jit
def _published(table, PTX: tl.constexpr):
    """``table`` passed through an identity that is not pure, placed after the barrier that
    publishes the table: operations that are not pure keep their order, so the gathers, whose
    addresses derive from this one, cannot be computed before the barrier."""
    if PTX:
        addr = tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [table.to(tl.int64, bitcast=True)],
                                         dtype=tl.int64, is_pure=False, pack=1)
        return addr.to(table.dtype, bitcast=True)
    return table


@triton.jit
def _red_add(table, idx, val, PTX: tl.constexpr):
    """``table[idx] += val`` per element where ``val != 0`` (int32 or int64 fixed-point sums in a
    scratch slot; unordered, the result is not read). ``PTX``: one ``red.global.add`` per element
    in the element's own layout (see :func:`_gather`; ``tl.atomic_add`` also returns the old
    value and moved the values, the addresses and the mask through shared memory)."""
    if PTX:
        if val.dtype == tl.int64:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s64 p, $2, 0; @p red.global.add.u64 [$1], $2; mov.b32 $0, 0; }",
                "=r,l,l", [_address(table, idx), val], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p red.global.add.u32 [$1], $2; mov.b32 $0, 0; }",
                "=r,l,r", [_address(table, idx), val], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_add(table + idx, val, mask=val != 0, sem="relaxed")


@triton.jit
def _chunks(lo, hi, RC: tl.constexpr):
    """The table chunks ``[c0, c1)`` (steps of RC) covering buckets ``lo .. hi`` (empty when
    ``hi < lo``): a query block's tables are built, and its bucket sums read back, only there.
    With sorted times and gaps beyond K most rows use a few buckets, not K."""
    return lo // RC * RC, hi + 1


_NO_STEP = tl.constexpr(2**29)  # beyond every time step (below (L - 1)(K + 1) + 1, see interval_steps)


@triton.jit
def _step_range(tau, ok):
    """Smallest and largest time step where ``ok`` (``[N]`` vectors; an empty range if none)."""
    return tl.min(tl.where(ok, tau, _NO_STEP)), tl.max(tl.where(ok, tau, -_NO_STEP))


@triton.jit
def _step_chunks(tau_m, m_mask, TAU, b, stb, KPM, skpb, skpn, hi, L, KT: tl.constexpr, RC: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr):
    """:func:`_chunks` covering every bucket below the clip between the query block's rows and its
    keys ``[0, hi)``, bounded by four numbers: the smallest and largest time step of the rows and
    of the keys. A superset of the buckets the elements use: reducing the bucket tile itself
    instead kept a second copy of every bucket in the layout of that reduction (sm_90a S1
    forward: 2660 SASS instructions per tile against 2117 with the bound), and on MovieLens-100K
    the bound builds 3.52 instead of 3.29 of the 4 chunks per 50-row block (3.84 instead of 3.72
    per 32-row block at L = 200)."""
    row_lo, row_hi = _step_range(tau_m, m_mask)
    col_lo = _NO_STEP
    col_hi = -_NO_STEP
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        col_ok, _any = _key_columns(KPM, b, skpb, skpn, offs_n, n_mask, HAS_KPM)
        lo_t, hi_t = _step_range(tl.load(TAU + b * stb + offs_n, mask=n_mask, other=0), col_ok)
        col_lo = tl.minimum(col_lo, lo_t)
        col_hi = tl.maximum(col_hi, hi_t)
    nearest = tl.maximum(tl.maximum(col_lo - row_hi, row_lo - col_hi), 0)
    farthest = tl.maximum(row_hi - col_lo, col_hi - row_lo)
    some = (row_lo <= row_hi) & (col_lo <= col_hi) & (nearest < KT)
    return _chunks(tl.where(some, nearest, KT), tl.where(some, tl.minimum(farthest, KT - 1), -1), RC)


@triton.jit
def _row_vector(base, stride_d, C0: tl.constexpr, C: tl.constexpr, CMAX: tl.constexpr):
    cols = C0 + tl.arange(0, C)
    return tl.load(base + cols * stride_d, mask=cols < CMAX, other=0.0).to(tl.float32)


@triton.jit
def _dot_row(x_a, x_b, base, stride_d, DA: tl.constexpr, DB: tl.constexpr, D: tl.constexpr):
    """``x . t`` per row of ``x`` (split at DA) for one table row ``t`` at ``base``: ``[M]``."""
    out = tl.sum(x_a.to(tl.float32) * _row_vector(base, stride_d, 0, DA, D)[None, :], axis=1)
    if DB > 0:
        out += tl.sum(x_b.to(tl.float32) * _row_vector(base, stride_d, DA, DB, D)[None, :], axis=1)
    return out


@triton.jit
def _build_table(x_a, x_b, tab, t_base, st_r, st_d, c0, c1, KT: tl.constexpr, KP: tl.constexpr, RC: tl.constexpr,
                 DA: tl.constexpr, DB: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr):
    """Write ``x_i . t[r]`` for the buckets r < K of chunks ``[c0, c1)`` into the slot rows (column
    K holds the clip bucket, written apart); returns ``max_r |x_i . t[r]|`` over them."""
    cols = tl.arange(0, RC)
    absmax = tl.zeros([x_a.shape[0]], tl.float32)
    for c in range(c0, c1, RC):
        rows = c + cols
        t_a = _load_rows(t_base + c * st_r, cols, rows < KT, st_r, st_d, 0, DA, D, ALIGN)
        xt = tl.dot(x_a, tl.trans(t_a), input_precision=DOT_PREC)
        if DB > 0:
            t_b = _load_rows(t_base + c * st_r, cols, rows < KT, st_r, st_d, DA, DB, D, ALIGN)
            xt = tl.dot(x_b, tl.trans(t_b), xt, input_precision=DOT_PREC)
        tl.store(tab + tl.arange(0, x_a.shape[0])[:, None] * KP + rows[None, :], xt, mask=rows[None, :] < KT)
        absmax = tl.maximum(absmax, tl.max(tl.abs(xt), axis=1))
    return absmax


@triton.jit
def _pow2(e):
    """``2**e`` exactly for integer ``e`` in [-126, 127] (int32 in, float32 out)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _ceil_log2(x):
    """``ceil(log2(x))`` for finite float32 ``x > 0``, exactly, from its bits (the exponent, one up
    unless ``x`` is a power of two): ``2**result >= x`` always (-126 for subnormals, whose callers
    clamp there). ``ceil(tl.log2(x))`` (libdevice's log2f, a polynomial) cost more instructions."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def _logits(q_a, q_b, k_a, k_b, qtab, idx, offs_m, offs_n, m_mask, n_mask, col_ok, b, h,
            BIAS, sbb, sbh, sbm, sbn, qk_scale, KT: tl.constexpr, DB: tl.constexpr, HAS_BIAS: tl.constexpr,
            IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, PTX: tl.constexpr):
    """Masked logits of a tile in log2 units."""
    qk = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
    if DB > 0:
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PREC)
    s = (qk + _gather(qtab, idx, PTX)) * qk_scale
    return _masked_logits(s, offs_m, offs_n, m_mask, n_mask, col_ok, b, h, BIAS, sbb, sbh, sbm, sbn,
                          HAS_BIAS, IS_CAUSAL)


@triton.jit
def _read_back(w, c, cols, KP: tl.constexpr, BLOCK_M: tl.constexpr, RC: tl.constexpr):
    """Columns ``c .. c+RC`` of the slot's fixed-point sums (integers), cleared for the next query block."""
    ptrs = w + tl.arange(0, BLOCK_M)[:, None] * KP + c + cols[None, :]
    return tl.atomic_xchg(ptrs, tl.zeros([BLOCK_M, RC], w.dtype.element_ty), sem="relaxed")


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(acc_a, acc_b, far, s, idx, below_clip, m_use, inv_l, start_n, offs_m, m_mask, offs_n, col_ok, v_base,
               svn, svd, wtab,
               bh, seed, dropout_p, p_fixed, KT: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr,
               DVA: tl.constexpr, DVB: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
               ALIGN: tl.constexpr, PTX: tl.constexpr):
    """Normalised P~ of one key block into ``acc += P~ V``, the fixed-point bucket sums (atomics into
    the slot) and, with dropout, into ``far`` the row's kept mass (the read-back subtracts the
    other buckets' sums from it, leaving the clip bucket's). ``below_clip``: bucket < K, whether
    the element is valid or not (P~ = 0 where not: its logit is masked, and rows past the sequence
    are zeroed here, so their slot rows stay clear: only the chunks valid elements use are read
    back and cleared)."""
    p = tl.where(m_mask[:, None], tl.exp2(s - m_use[:, None]) * inv_l[:, None], 0.0)
    if HAS_DROPOUT:
        keep = _keep_tile(seed, bh, offs_m, start_n, dropout_p, BLOCK_N)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    # bucket sums first: P~ in float32 dies before the GEMM
    _red_add(wtab, idx, tl.where(below_clip, (p * p_fixed).to(tl.int32), 0), PTX)
    if HAS_DROPOUT:  # (the row's kept mass; without dropout it is 1, see the read-back)
        far += tl.sum(p, axis=1)
    p_lo = _operand_barrier(p.to(v_base.dtype.element_ty), HAS_DROPOUT and offs_m.shape[0] < WARPGROUP_ROWS)
    v_a = _load_rows(v_base, offs_n, col_ok, svn, svd, 0, DVA, DV, ALIGN)  # padded values are never read
    acc_a = tl.dot(p_lo, v_a, acc_a, input_precision=DOT_PREC)
    if DVB > 0:
        v_b = _load_rows(v_base, offs_n, col_ok, svn, svd, DVA, DVB, DV, ALIGN)
        acc_b = tl.dot(p_lo, v_b, acc_b, input_precision=DOT_PREC)
    return acc_a, acc_b, far


@triton.jit
def _tisas_fwd_kernel(
    Q, K, V, RK, RV, TAU, KPM, BIAS, SEED, O, LSE, QTAB, WTAB,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srkh, srkr, srkd,
    srvh, srvr, srvd,
    stb, skpb, skpn,
    sbb, sbh, sbm, sbn,
    sob, soh, som, sod,
    H, L, NUM_MB, N_TILES, qk_scale, dropout_p, p_fixed,
    KT: tl.constexpr, KP: tl.constexpr, RC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DH: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ONE_KEY_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr = 0, PTX: tl.constexpr = False,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dt = Q.dtype.element_ty
    offs_ml = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, RC)
    # this program's scratch slot: q . rk per bucket (float32) and the fixed-point bucket sums
    qtab = QTAB + pid.to(tl.int64) * (BLOCK_M * KP)
    wtab = WTAB + pid.to(tl.int64) * (BLOCK_M * KP)
    row_start = offs_ml[:, None] * KP  # + bucket: an element's offset in the slot's tables
    for c in range(0, KT, RC):  # (the bucket sums' chunks; column K, the far one, takes no sums)
        tl.store(wtab + row_start + c + cols[None, :], tl.zeros([BLOCK_M, RC], tl.int32))
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    inv_fixed = 1.0 / p_fixed

    for tile in range(pid, N_TILES, nprog):
        bh = tile // NUM_MB
        b = bh // H
        h = bh % H
        start_m = (tile % NUM_MB) * BLOCK_M
        offs_m = start_m + offs_ml
        m_mask = offs_m < L
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        tl.debug_barrier()  # the previous tile's table reads and read-back are done
        q_a, q_b = _load_split(q_base, offs_m, m_mask, sqm, sqd, DA, DB, DH, ALIGN)
        qr_far = _dot_row(q_a, q_b, RK + h * srkh + KT * srkr, srkd, DA, DB, DH)
        tl.store(qtab + offs_ml * KP + KT, qr_far)  # (published with the table, below)
        tau_m = tl.load(TAU + b * stb + offs_m, mask=m_mask, other=0)
        hi = _key_end(start_m, L, IS_CAUSAL, BLOCK_M)
        acc_a = tl.zeros([BLOCK_M, DVA], tl.float32)
        acc_b = tl.zeros([BLOCK_M, DVB if DVB > 0 else 16], tl.float32)
        far = tl.zeros([BLOCK_M], tl.float32)
        if ONE_KEY_BLOCK:
            offs_n, n_mask, col_ok, _any, bucket = _key_block(0, TAU, b, stb, KPM, skpb, skpn, tau_m, L, KT, BLOCK_N,
                                                              HAS_KPM)
            idx = row_start + bucket
            # (its loads of the block's time steps and padding are _key_block's: the compiler merges them)
            c0, c1 = _step_chunks(tau_m, m_mask, TAU, b, stb, KPM, skpb, skpn, BLOCK_N, L, KT, RC, BLOCK_N, HAS_KPM)
            _build_table(q_a, q_b, qtab, RK + h * srkh, srkr, srkd, c0, c1, KT, KP, RC, DA, DB, DH, DOT_PREC, ALIGN)
            tl.debug_barrier()  # the table is written
            table = _published(qtab, PTX)
            k_a, k_b = _load_split(k_base, offs_n, col_ok, skn, skd, DA, DB, DH, ALIGN)
            s = _logits(q_a, q_b, k_a, k_b, table, idx, offs_m, offs_n, m_mask, n_mask, col_ok, b, h,
                        BIAS, sbb, sbh, sbm, sbn, qk_scale, KT, DB, HAS_BIAS, IS_CAUSAL, DOT_PREC, PTX)
            m_i = tl.max(s, axis=1)
            m_use = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows with no allowed key: p = 0, no NaN
            l_i = tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
            inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
            acc_a, acc_b, far = _fwd_block(acc_a, acc_b, far, s, idx, bucket < KT, m_use, inv_l, 0, offs_m, m_mask,
                                           offs_n, col_ok,
                                           v_base, svn, svd, wtab, bh, seed, dropout_p, p_fixed,
                                           KT, BLOCK_N, DV, DVA, DVB, HAS_DROPOUT, DOT_PREC, ALIGN, PTX)
        else:
            c0, c1 = _step_chunks(tau_m, m_mask, TAU, b, stb, KPM, skpb, skpn, hi, L, KT, RC, BLOCK_N, HAS_KPM)
            _build_table(q_a, q_b, qtab, RK + h * srkh, srkr, srkd, c0, c1, KT, KP, RC, DA, DB, DH, DOT_PREC, ALIGN)
            tl.debug_barrier()  # the table is written
            table = _published(qtab, PTX)
            # pass 1: the row max and sum (online), so that pass 2 accumulates normalised P~
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, hi, BLOCK_N):
                offs_n, n_mask, col_ok, any_key, bucket = _key_block(
                    start_n, TAU, b, stb, KPM, skpb, skpn, tau_m, L, KT, BLOCK_N, HAS_KPM)
                if any_key:
                    k_a, k_b = _load_split(k_base, offs_n, col_ok, skn, skd, DA, DB, DH, ALIGN)
                    idx = row_start + bucket
                    s = _logits(q_a, q_b, k_a, k_b, table, idx, offs_m, offs_n, m_mask, n_mask, col_ok,
                                b, h, BIAS, sbb, sbh, sbm, sbn, qk_scale, KT, DB, HAS_BIAS, IS_CAUSAL, DOT_PREC, PTX)
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    m_new_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_i = l_i * tl.exp2(m_i - m_new_use) + tl.sum(tl.exp2(s - m_new_use[:, None]), axis=1)
                    m_i = m_new
            m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
            inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
            for start_n in range(0, hi, BLOCK_N):
                offs_n, n_mask, col_ok, any_key, bucket = _key_block(
                    start_n, TAU, b, stb, KPM, skpb, skpn, tau_m, L, KT, BLOCK_N, HAS_KPM)
                if any_key:
                    k_a, k_b = _load_split(k_base, offs_n, col_ok, skn, skd, DA, DB, DH, ALIGN)
                    idx = row_start + bucket
                    s = _logits(q_a, q_b, k_a, k_b, table, idx, offs_m, offs_n, m_mask, n_mask, col_ok,
                                b, h, BIAS, sbb, sbh, sbm, sbn, qk_scale, KT, DB, HAS_BIAS, IS_CAUSAL, DOT_PREC, PTX)
                    acc_a, acc_b, far = _fwd_block(acc_a, acc_b, far, s, idx, bucket < KT, m_use, inv_l, start_n,
                                                   offs_m, m_mask, offs_n, col_ok, v_base, svn, svd, wtab, bh, seed,
                                                   dropout_p, p_fixed,
                                                   KT, BLOCK_N, DV, DVA, DVB, HAS_DROPOUT, DOT_PREC, ALIGN, PTX)

        # log2-sum-exp; 0 for rows without keys (their logits are all -inf, so P recomputes as 0)
        lse = tl.where(l_i > 0.0, m_use + _log2(tl.where(l_i > 0.0, l_i, 1.0), PTX), 0.0)
        tl.debug_barrier()  # every atomic of the block has landed
        rv_base = RV + h * srvh
        # The clip bucket's P~ sum is the row's total less the other buckets' (a select and an add
        # per element fewer than summing it in the tiles). Its error: the fp32 rounding of the
        # total, and the other buckets' fixed-point truncation, below 2**-30 per element.
        if not HAS_DROPOUT:
            far = tl.where((l_i > 0.0) & m_mask, 1.0, 0.0)
        for c in range(c0, c1, RC):
            w32 = _read_back(wtab, c, cols, KP, BLOCK_M, RC).to(tl.float32) * inv_fixed
            far -= tl.sum(w32, axis=1)
            w = w32.to(dt)
            rv_a = _load_rows(rv_base + c * srvr, cols, c + cols < KT, srvr, srvd, 0, DVA, DV, ALIGN)
            acc_a = tl.dot(w, rv_a, acc_a, input_precision=DOT_PREC)
            if DVB > 0:
                rv_b = _load_rows(rv_base + c * srvr, cols, c + cols < KT, srvr, srvd, DVA, DVB, DV, ALIGN)
                acc_b = tl.dot(w, rv_b, acc_b, input_precision=DOT_PREC)
        o_base = O + b * sob + h * soh
        acc_a += far[:, None] * _row_vector(rv_base + KT * srvr, srvd, 0, DVA, DV)[None, :]
        _store_rows(o_base, acc_a, offs_m, m_mask, som, sod, 0, DVA, DV, ALIGN)
        if DVB > 0:
            acc_b += far[:, None] * _row_vector(rv_base + KT * srvr, srvd, DVA, DVB, DV)[None, :]
            _store_rows(o_base, acc_b, offs_m, m_mask, som, sod, DVA, DVB, DV, ALIGN)
        tl.store(LSE + bh * L + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _add_rows(base, rows, row_mask, stride_r, x, C0: tl.constexpr, C: tl.constexpr, CMAX: tl.constexpr):
    """``base[rows, C0:C0+C] += x`` (float32 rows the program owns)."""
    cols = C0 + tl.arange(0, C)
    ptrs = base + rows[:, None] * stride_r + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < CMAX)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + x, mask=mask)


@triton.jit
def _tisas_bwd_kernel(
    Q, K, V, RK, RV, TAU, KPM, BIAS, SEED, O, DO, LSE, DQ, DK, DV_, DKACC, DVACC, TABS, WTABS, PART,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srkh, srkr, srkd,
    srvh, srvr, srvd,
    stb, skpb, skpn,
    sbb, sbh, sbm, sbn,
    sob, soh, som, sod,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    B, H, L, qk_scale, scale, dropout_p, p_fixed,
    KT: tl.constexpr, KP: tl.constexpr, RC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DH: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ZC: tl.constexpr, DOT_PREC: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr, SHARED_TABLES: tl.constexpr,
    ALIGN: tl.constexpr = 0, PTX: tl.constexpr = False, CVT_ASM: tl.constexpr = False, KEY_BITS: tl.constexpr = 0,
):
    PAIRS: tl.constexpr = CVT_ASM and ALIGN < 16  # (rows not 16-byte aligned: rmha._store_rows)
    R: tl.constexpr = KT + 1
    # float32 rows (dk, dv copies, table-gradient partials) 8-byte aligned: _dot_add_rows pairs columns
    ACC_ALIGN: tl.constexpr = 8 if DH % 2 == 0 and DV % 2 == 0 else 0
    WIDTH: tl.constexpr = R * (DH + DV)
    DBX: tl.constexpr = DB if DB > 0 else 16
    DVBX: tl.constexpr = DVB if DVB > 0 else 16
    WARP_MMA: tl.constexpr = BLOCK_M < WARPGROUP_ROWS  # (see rmha._mask_barrier)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dt = Q.dtype.element_ty
    offs_ml = tl.arange(0, BLOCK_M)
    offs_nl = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, RC)
    # this program's scratch slot: q . rk and dO . rv per bucket, fixed-point sums of P~ and dS
    slot = pid.to(tl.int64) * (2 * BLOCK_M * KP)
    qtab = TABS + slot
    dtab = qtab + BLOCK_M * KP
    wtab = WTABS + pid.to(tl.int64) * (BLOCK_M * KP)  # packed sums of P~ and dS (see PACK_SHIFT)
    row_start = offs_ml[:, None] * KP  # + bucket: an element's offset in each of the slot's tables
    for c in range(0, KT, RC):  # (column K, the far one, takes no sums)
        tl.store(wtab + row_start + c + cols[None, :], tl.zeros([BLOCK_M, RC], tl.int64))
        # Elements that are not valid read dO . rv at columns no chunk may have written: finite
        # there, their dS = P~ (...) = 0 holds (their logits are masked, so P~ = 0).
        tl.store(dtab + row_start + c + cols[None, :], tl.zeros([BLOCK_M, RC], tl.float32))
    # this program's rows of the partial table gradients, one per head (one for all heads when
    # both tables are shared by the heads): [drk (R x DH) | drv (R x DV)]
    pcols = tl.arange(0, ZC)
    for hh in range(0, 1 if SHARED_TABLES else H):
        prow = PART + (pid.to(tl.int64) + hh * nprog) * WIDTH
        for c0 in range(0, WIDTH, ZC):
            tl.store(prow + c0 + pcols, tl.zeros([ZC], tl.float32), mask=c0 + pcols < WIDTH)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    inv_p_fixed = 1.0 / p_fixed
    inv_keep = 1.0 / (1.0 - dropout_p)

    for bh in range(pid, B * H, nprog):
        b = bh // H
        h = bh % H
        col_bits, block_bits = _key_bits(KPM, b, skpb, skpn, L, BLOCK_M, BLOCK_N, KEY_BITS, Q.dtype.element_ty,
                                         HAS_KPM)
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        o_base = O + b * sob + h * soh
        do_base = DO + b * sdob + h * sdoh
        dkacc = DKACC + bh * L * DH  # (float32 copies of dk, dv: int32 offsets, as for dk, dv)
        dvacc = DVACC + bh * L * DV
        prow = PART + pid.to(tl.int64) * WIDTH
        if not SHARED_TABLES:
            prow += h * nprog * WIDTH
        rk_base = RK + h * srkh
        rv_base = RV + h * srvh
        # the largest value norm of the sequence (for the dS bound), and zeroed dk, dv accumulators
        vsq_max = tl.zeros([BLOCK_N], tl.float32)
        for start_n in range(0, L, BLOCK_N):
            offs_n = start_n + offs_nl
            n_mask = offs_n < L
            col_ok, _any = _key_columns(KPM, b, skpb, skpn, offs_n, n_mask, HAS_KPM)
            v_a, v_b = _load_split(v_base, offs_n, col_ok, svn, svd, DVA, DVB, DV, ALIGN)
            vsq = tl.sum(v_a.to(tl.float32) * v_a.to(tl.float32), axis=1)
            if DVB > 0:
                vsq += tl.sum(v_b.to(tl.float32) * v_b.to(tl.float32), axis=1)
            vsq_max = tl.maximum(vsq_max, vsq)
            if not ONE_KEY_BLOCK:
                _store_rows(dkacc, tl.zeros([BLOCK_N, DA], tl.float32), offs_n, n_mask, DH, 1, 0, DA, DH, ALIGN)
                _store_rows(dvacc, tl.zeros([BLOCK_N, DVA], tl.float32), offs_n, n_mask, DV, 1, 0, DVA, DV, ALIGN)
                if DB > 0:
                    _store_rows(dkacc, tl.zeros([BLOCK_N, DBX], tl.float32), offs_n, n_mask, DH, 1, DA, DB, DH, ALIGN)
                if DVB > 0:
                    _store_rows(dvacc, tl.zeros([BLOCK_N, DVBX], tl.float32), offs_n, n_mask, DV, 1, DVA, DVB, DV, ALIGN)
        vmax = tl.sqrt(tl.max(vsq_max, axis=0))
        if ONE_KEY_BLOCK:  # dk, dv of the sequence stay in registers across its query blocks
            dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
            dk_b = tl.zeros([BLOCK_N, DBX], tl.float32)
            dv_a = tl.zeros([BLOCK_N, DVA], tl.float32)
            dv_b = tl.zeros([BLOCK_N, DVBX], tl.float32)

        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + offs_ml
            m_mask = offs_m < L
            tl.debug_barrier()  # accumulator rows, tables and read-back of the previous block are done
            q_a, q_b = _load_split(q_base, offs_m, m_mask, sqm, sqd, DA, DB, DH, ALIGN)
            do_a, do_b = _load_split(do_base, offs_m, m_mask, sdom, sdod, DVA, DVB, DV, ALIGN)
            o_a, o_b = _load_split(o_base, offs_m, m_mask, som, sod, DVA, DVB, DV, ALIGN)
            di = tl.sum(do_a.to(tl.float32) * o_a.to(tl.float32), axis=1)
            do_sq = tl.sum(do_a.to(tl.float32) * do_a.to(tl.float32), axis=1)
            if DVB > 0:
                di += tl.sum(do_b.to(tl.float32) * o_b.to(tl.float32), axis=1)
                do_sq += tl.sum(do_b.to(tl.float32) * do_b.to(tl.float32), axis=1)
            lse = tl.load(LSE + bh * L + offs_m, mask=m_mask, other=0.0)
            tau_m = tl.load(TAU + b * stb + offs_m, mask=m_mask, other=0)
            hi = _key_end(start_m, L, IS_CAUSAL, BLOCK_M)
            c0, c1 = _step_chunks(tau_m, m_mask, TAU, b, stb, KPM, skpb, skpn, hi, L, KT, RC, BLOCK_N, HAS_KPM)
            _build_table(q_a, q_b, qtab, rk_base, srkr, srkd, c0, c1, KT, KP, RC, DA, DB, DH, DOT_PREC, ALIGN)
            dorv_max = _build_table(do_a, do_b, dtab, rv_base, srvr, srvd, c0, c1, KT, KP, RC, DVA, DVB, DV, DOT_PREC, ALIGN)
            qr_far = _dot_row(q_a, q_b, rk_base + KT * srkr, srkd, DA, DB, DH)
            dorv_far = _dot_row(do_a, do_b, rv_base + KT * srvr, srvd, DVA, DVB, DV)
            tl.store(qtab + offs_ml * KP + KT, qr_far)  # (published with the tables, below)
            tl.store(dtab + offs_ml * KP + KT, dorv_far)
            dorv_max = tl.maximum(dorv_max, tl.abs(dorv_far))
            # fixed-point scale of the row's dS sums: 2**(61 - ceil(log2(bound))), bound >= sum_j |dS_ij|
            bound = 4.0 * scale * inv_keep * (tl.sqrt(do_sq) * vmax + dorv_max)
            ok = (bound > 0.0) & (bound < float("inf"))
            expo = _FIXED_BITS - _ceil_log2(tl.where(ok, bound, 1.0))
            expo = tl.where(ok, tl.minimum(tl.maximum(expo, -126), 126), 0)
            ds_fixed = _pow2(expo)
            tl.debug_barrier()  # the tables are written
            table = _published(qtab, PTX)
            dtable = _published(dtab, PTX)

            dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
            dq_b = tl.zeros([BLOCK_M, DBX], tl.float32)
            far_p = tl.zeros([BLOCK_M], tl.float32)
            far_ds = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, hi, BLOCK_N):
                offs_n, n_mask, col_ok, any_key, bucket = _key_block(
                    start_n, TAU, b, stb, KPM, skpb, skpn, tau_m, L, KT, BLOCK_N, HAS_KPM, col_bits, block_bits,
                    KEY_BITS)
                if any_key:
                    k_a, k_b = _load_split(k_base, offs_n, col_ok, skn, skd, DA, DB, DH, ALIGN)
                    v_a, v_b = _load_split(v_base, offs_n, col_ok, svn, svd, DVA, DVB, DV, ALIGN)
                    idx = row_start + bucket
                    s = _logits(q_a, q_b, k_a, k_b, table, idx, offs_m, offs_n, m_mask, n_mask, col_ok,
                                b, h, BIAS, sbb, sbh, sbm, sbn, qk_scale, KT, DB, HAS_BIAS, IS_CAUSAL, DOT_PREC, PTX)
                    p = tl.where(m_mask[:, None], tl.exp2(s - lse[:, None]), 0.0)
                    # dP~_ij = dO_i . (v_j + rv[r_ij])
                    dpt = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PREC)
                    if DVB > 0:
                        dpt = tl.dot(do_b, tl.trans(v_b), dpt, input_precision=DOT_PREC)
                    dpt = dpt + _gather(dtable, idx, PTX)
                    if HAS_DROPOUT:
                        keep = _keep_tile(seed, bh, offs_m, start_n, dropout_p, BLOCK_N)
                        p_drop = tl.where(keep, p * inv_keep, 0.0)
                        dprob = tl.where(keep, dpt * inv_keep, 0.0)
                    else:
                        p_drop = p
                        dprob = dpt
                    ds = p * (dprob - di[:, None]) * scale
                    # bucket sums first: P~ and dS in float32 die before the GEMMs
                    # (P~ = dS = 0 where not valid: below the clip suffices)
                    below_clip = bucket < KT
                    packed = ((ds * ds_fixed[:, None]).to(tl.int64) << _PACK_SHIFT) + (p_drop * p_fixed).to(tl.int64)
                    _red_add(wtab, idx, tl.where(below_clip, packed, 0), PTX)
                    far_p += tl.sum(tl.where(below_clip, 0.0, p_drop), axis=1)
                    far_ds += tl.sum(tl.where(below_clip, 0.0, ds), axis=1)
                    ds_lo = _operand_barrier(ds.to(dt), HAS_DROPOUT and WARP_MMA)
                    p_lo = _operand_barrier(p_drop.to(dt), HAS_DROPOUT and WARP_MMA)
                    dq_a = tl.dot(ds_lo, k_a, dq_a, input_precision=DOT_PREC)
                    if ONE_KEY_BLOCK:
                        dk_a = tl.dot(tl.trans(ds_lo), q_a, dk_a, input_precision=DOT_PREC)
                        dv_a = tl.dot(tl.trans(p_lo), do_a, dv_a, input_precision=DOT_PREC)
                        if DB > 0:
                            dq_b = tl.dot(ds_lo, k_b, dq_b, input_precision=DOT_PREC)
                            dk_b = tl.dot(tl.trans(ds_lo), q_b, dk_b, input_precision=DOT_PREC)
                        if DVB > 0:
                            dv_b = tl.dot(tl.trans(p_lo), do_b, dv_b, input_precision=DOT_PREC)
                    else:
                        _dot_add_rows(dkacc, offs_n, n_mask, DH, ds_lo, q_a, 0, DA, DH, DOT_PREC, PTX, ACC_ALIGN)
                        _dot_add_rows(dvacc, offs_n, n_mask, DV, p_lo, do_a, 0, DVA, DV, DOT_PREC, PTX, ACC_ALIGN)
                        if DB > 0:
                            dq_b = tl.dot(ds_lo, k_b, dq_b, input_precision=DOT_PREC)
                            _dot_add_rows(dkacc, offs_n, n_mask, DH, ds_lo, q_b, DA, DB, DH, DOT_PREC, PTX, ACC_ALIGN)
                        if DVB > 0:
                            _dot_add_rows(dvacc, offs_n, n_mask, DV, p_lo, do_b, DVA, DVB, DV, DOT_PREC, PTX, ACC_ALIGN)

            tl.debug_barrier()  # every atomic of the block has landed
            inv_ds_fixed = _pow2(-expo)
            for c in range(c0, c1, RC):
                rows = c + cols
                r_ok = rows < KT
                sums = _read_back(wtab, c, cols, KP, BLOCK_M, RC)
                wp = ((sums & _PACK_P_MASK).to(tl.float32) * inv_p_fixed).to(dt)
                wd = ((sums >> _PACK_SHIFT).to(tl.float32) * inv_ds_fixed[:, None]).to(dt)
                # dq_i += sum_r W_dS[i, r] rk[r]; drk[r] += sum_i W_dS[i, r] q_i; drv[r] += sum_i W_P~[i, r] dO_i
                rk_a = _load_rows(rk_base + c * srkr, cols, r_ok, srkr, srkd, 0, DA, DH, ALIGN)
                dq_a = tl.dot(wd, rk_a, dq_a, input_precision=DOT_PREC)
                _dot_add_rows(prow, rows, r_ok, DH, wd, q_a, 0, DA, DH, DOT_PREC, PTX, ACC_ALIGN)
                _dot_add_rows(prow + R * DH, rows, r_ok, DV, wp, do_a, 0, DVA, DV, DOT_PREC, PTX, ACC_ALIGN)
                if DB > 0:
                    rk_b = _load_rows(rk_base + c * srkr, cols, r_ok, srkr, srkd, DA, DB, DH, ALIGN)
                    dq_b = tl.dot(wd, rk_b, dq_b, input_precision=DOT_PREC)
                    _dot_add_rows(prow, rows, r_ok, DH, wd, q_b, DA, DB, DH, DOT_PREC, PTX, ACC_ALIGN)
                if DVB > 0:
                    _dot_add_rows(prow + R * DH, rows, r_ok, DV, wp, do_b, DVA, DVB, DV, DOT_PREC, PTX, ACC_ALIGN)
            # the clip bucket K
            one = tl.arange(0, 1) + KT
            one_ok = one < R
            dq_a += far_ds[:, None] * _row_vector(rk_base + KT * srkr, srkd, 0, DA, DH)[None, :]
            _add_rows(prow, one, one_ok, DH, tl.sum(far_ds[:, None] * q_a.to(tl.float32), axis=0)[None, :], 0, DA, DH)
            _add_rows(prow + R * DH, one, one_ok, DV, tl.sum(far_p[:, None] * do_a.to(tl.float32), axis=0)[None, :],
                      0, DVA, DV)
            dq_base = DQ + b * sdqb + h * sdqh
            _store_rows(dq_base, dq_a, offs_m, m_mask, sdqm, sdqd, 0, DA, DH, ALIGN, False, PAIRS)
            if DB > 0:
                dq_b += far_ds[:, None] * _row_vector(rk_base + KT * srkr, srkd, DA, DB, DH)[None, :]
                _add_rows(prow, one, one_ok, DH, tl.sum(far_ds[:, None] * q_b.to(tl.float32), axis=0)[None, :],
                          DA, DB, DH)
                _store_rows(dq_base, dq_b, offs_m, m_mask, sdqm, sdqd, DA, DB, DH, ALIGN, False, PAIRS)
            if DVB > 0:
                _add_rows(prow + R * DH, one, one_ok, DV,
                          tl.sum(far_p[:, None] * do_b.to(tl.float32), axis=0)[None, :], DVA, DVB, DV)

        tl.debug_barrier()  # the dk, dv accumulators are complete
        for start_n in range(0, L, BLOCK_N):
            offs_n = start_n + offs_nl
            n_mask = offs_n < L
            if ONE_KEY_BLOCK:
                dk_out_a, dk_out_b, dv_out_a, dv_out_b = dk_a, dk_b, dv_a, dv_b
            else:
                dk_out_a, dk_out_b = _load_split(dkacc, offs_n, n_mask, DH, 1, DA, DB, DH, ALIGN)
                dv_out_a, dv_out_b = _load_split(dvacc, offs_n, n_mask, DV, 1, DVA, DVB, DV, ALIGN)
            dk_base = DK + b * sdkb + h * sdkh
            dv_base = DV_ + b * sdvb + h * sdvh
            _store_rows(dk_base, dk_out_a, offs_n, n_mask, sdkn, sdkd, 0, DA, DH, ALIGN, False, PAIRS)
            _store_rows(dv_base, dv_out_a, offs_n, n_mask, sdvn, sdvd, 0, DVA, DV, ALIGN, False, PAIRS)
            if DB > 0:
                _store_rows(dk_base, dk_out_b, offs_n, n_mask, sdkn, sdkd, DA, DB, DH, ALIGN, False, PAIRS)
            if DVB > 0:
                _store_rows(dv_base, dv_out_b, offs_n, n_mask, sdvn, sdvd, DVA, DVB, DV, ALIGN, False, PAIRS)


# ----------------------------------------------------------------------------------------------
# host side: time steps, checks, configs, launch records
# ----------------------------------------------------------------------------------------------


def interval_steps(tau: torch.Tensor, time_span: int) -> torch.Tensor:
    """int32 time steps ``[B, L]`` with the same clipped intervals ``min(|tau_i - tau_j|, K)`` as the
    int64 ``tau``: per row, gaps between sorted neighbours larger than K become K + 1 (a clipped
    interval stays clipped, the others are unchanged), so the steps stay below ``L (K + 1)``.
    A few [B, L] torch ops, no host synchronisation."""
    ordered, order = tau.sort(dim=1)
    gaps = ordered.diff(dim=1).clamp_(max=time_span + 1)
    steps = torch.cat([torch.zeros_like(ordered[:, :1]), gaps.cumsum(dim=1)], dim=1)
    return torch.empty_like(steps).scatter_(1, order, steps).to(torch.int32)


def check_supported(q, k, v, rel_k) -> None:
    check_kernel_inputs("time_interval_attention", q, v, rel_k, MAX_INTERVAL_BUCKETS,
                        f"time spans K <= {MAX_INTERVAL_BUCKETS - 1}")
    _launch.check_int32_indexing("time_interval_attention", q, k, v)


def _slots(device, num_warps: int) -> int:
    """Persistent programs: as many as fit the card at once (each owns one scratch slot)."""
    return _launch.num_sms(device) * (2 if num_warps <= 4 else 1)


def _table_chunk(kp: int) -> int:
    """Buckets per table GEMM: 64 keeps the [BLOCK_M, 64] tiles in registers; the interpreter takes
    the whole table at once (it pays per operation, not per element)."""
    return kp if triton_interpreter_enabled() else min(kp, 64)


def fwd_config(b, h, length, dh, dv, device):
    """Block sizes for the forward. One key block per sequence when it fits (up to 256 keys at
    head sizes up to 64): the forward then needs one pass instead of two (sm_90a static counts at
    B256 h2 L200 dh64: 123 instead of 176 instructions per score element, fewer spills)."""
    widest = max(_launch.pad16(dh), _launch.pad16(dv))
    whole = max(16, _launch.next_pow2(length))
    if widest <= 64 and whole <= 256:
        block_n = whole
        block_m = min(64, max(16, 8192 // whole), whole)
    elif widest <= 128 and whole <= 128:
        # wider heads: one key block still, with 16-row query blocks (sm_90a, B128 h1 L75 dh90:
        # 15.5 -> 10.2 us modelled, though 780 -> 1432 spilled bytes; L128 dh128: 14.3 -> 10.4 us,
        # 0 -> 448 B)
        block_n, block_m = whole, 16
    else:
        block_n = min(whole, 128 if widest <= 64 else 64)
        block_m = min(whole, 64 if widest <= 64 else 32)
    return _launch.knobs("tisas_fwd", block_m=block_m, block_n=block_n,
                         num_warps=4 if block_m * block_n <= 64 * 64 else 8, programs=0, table_chunk=0)


def bwd_config(b, h, length, dh, dv, device):
    widest = max(_launch.pad16(dh), _launch.pad16(dv))
    block_n = min(max(16, _launch.next_pow2(length)), 64)
    block_m = min(max(16, _launch.next_pow2(length)), 32 if widest <= 64 else 16)
    if length <= block_n:
        # one key block: dk, dv take registers; 16-row query blocks leave room for them (sm_90a at
        # B512 h2 L50 dh32: 8 spilled bytes instead of 1012, modelled 41.0 -> 39.7 us, with dropout
        # 16 B instead of 1240, 45.5 -> 36.2 us; with several key blocks, as at L = 200, 16 rows
        # spill less but model slower)
        block_m = 16
    return _launch.knobs("tisas_bwd", block_m=block_m, block_n=block_n, num_warps=4, programs=0, table_chunk=0,
                         key_bits=-1)


def _constexprs(q, v, rel_k, kpm, bias, is_causal, dropout_p, cfg):
    """``KP``: the slot rows' width, buckets 0 .. K - 1 in chunks of ``RC`` and column K (see
    ``_gather``): four more columns when K is a power of two, so rows stay 16-byte aligned (a
    next power of two would double the scratch)."""
    da, db = _launch.split_pow2(q.shape[-1])
    dva, dvb = _launch.split_pow2(v.shape[-1])
    kt = rel_k.shape[-2] - 1
    kp = max(16, _launch.next_pow2(kt))
    rc = min(kp, cfg["table_chunk"]) or _table_chunk(kp)
    if kt == kp:
        kp += 4
    return dict(
        KT=kt, KP=kp, RC=rc,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        DH=q.shape[-1], DV=v.shape[-1], DA=da, DB=db, DVA=dva, DVB=dvb,
        HAS_KPM=kpm is not None, HAS_BIAS=bias is not None, IS_CAUSAL=bool(is_causal),
        HAS_DROPOUT=dropout_p > 0.0, DOT_PREC=_launch.dot_precision(q.dtype),
        PTX=_launch.inline_ptx(q.device),  # (see _gather, _red_add)
    )


def _p_fixed(dropout_p: float, bits: int = P_FIXED_BITS) -> float:
    """Fixed-point scale of the P~ sums: a row of P~ sums to at most 1 / (1 - p) (twice that as
    slack), see P_FIXED_BITS; ``bits``: 31 for the forward's int32 sums, PACK_P_BITS for the
    backward's packed ones."""
    return 2.0 ** (bits - math.ceil(math.log2(2.0 / (1.0 - dropout_p))))


def _common_args(q, k, v, rel_k, rel_v, tau, kpm, bias, seed):
    args = dict(
        Q=q, K=k, V=v, RK=rel_k, RV=rel_v, TAU=tau, KPM=kpm.view(torch.uint8) if kpm is not None else q,
        BIAS=bias if bias is not None else q, SEED=seed if seed is not None else q,
        sqb=q.stride(0), sqh=q.stride(1), sqm=q.stride(2), sqd=q.stride(3),
        skb=k.stride(0), skh=k.stride(1), skn=k.stride(2), skd=k.stride(3),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svd=v.stride(3),
    )
    args.update(zip(("srkh", "srkr", "srkd"), _table_strides(rel_k)))
    args.update(zip(("srvh", "srvr", "srvd"), _table_strides(rel_v)))
    args.update(stb=tau.stride(0), skpb=kpm.stride(0) if kpm is not None else 0,
                skpn=kpm.stride(1) if kpm is not None else 0)
    args.update(zip(("sbb", "sbh", "sbm", "sbn"), _bias_strides(bias)))
    return args


def plan_forward(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p, scale):
    """Allocate ``out [B, h, L, dv]``, ``lse [B, h, L]`` and the scratch slots; plan the launch.
    ``tau``: int32 ``[B, L]`` steps (:func:`interval_steps`); tables ``[Ht, K+1, d]``."""
    check_supported(q, k, v, rel_k)
    b, h, length, dh = q.shape
    dv = v.shape[-1]
    cfg = fwd_config(b, h, length, dh, dv, q.device)
    consts = _constexprs(q, v, rel_k, kpm, bias, is_causal, dropout_p, cfg)
    num_mb = triton.cdiv(length, cfg["block_m"])
    tiles = b * h * num_mb
    programs = max(1, min(tiles, cfg["programs"] or _slots(q.device, cfg["num_warps"])))
    out = _launch.empty((b, h, length, dv), q.dtype, q.device)
    lse = _launch.empty((b, h, length), torch.float32, q.device)
    qtab = _launch.empty((programs, cfg["block_m"], consts["KP"]), torch.float32, q.device)
    wtab = _launch.empty((programs, cfg["block_m"], consts["KP"]), torch.int32, q.device)
    args = _common_args(q, k, v, rel_k, rel_v, tau, kpm, bias, seed)
    args.update(O=out, LSE=lse, QTAB=qtab, WTAB=wtab,
                sob=out.stride(0), soh=out.stride(1), som=out.stride(2), sod=out.stride(3),
                H=h, L=length, NUM_MB=num_mb, N_TILES=tiles, qk_scale=float(scale) * LOG2E,
                dropout_p=float(dropout_p), p_fixed=_p_fixed(dropout_p))
    consts["ONE_KEY_BLOCK"] = length <= cfg["block_n"]
    consts["ALIGN"] = _row_alignment(q, k, v, rel_k, rel_v, out)
    launch = Launch(_tisas_fwd_kernel, (programs,), args, consts, num_warps=cfg["num_warps"], num_stages=1)
    return out, lse, [launch]


def plan_reduce(partial: torch.Tensor, drk: torch.Tensor, drv: torch.Tensor) -> list[Launch]:
    """Launches summing the partial table gradients ``partial [h * programs, R (dh + dv)]`` (or
    ``[programs, ...]`` when both tables are shared: the heads are summed in the rows) over the
    programs (and the heads, for a shared table) in a fixed order into ``drk [Ht, R, dh]`` and
    ``drv [Ht, R, dv]``: the kernel of :mod:`fastpe.kernels.triton.rmha` with wider column tiles
    (a row holds K + 1 = 257 table rows here, not 2k + 1 = 9)."""
    c = partial.shape[1]
    c1 = drk[0].numel()
    spans = [(drk.shape[0], 0, c)] if drk.shape[0] == drv.shape[0] else [(drk.shape[0], 0, c1), (drv.shape[0], c1, c)]
    wide = triton_interpreter_enabled()  # every program instance costs milliseconds there
    launches = []
    for groups, col0, col1 in spans:
        rows = partial.shape[0] // groups
        block_r = max(1, min(64, _launch.next_pow2(rows)))
        block_c = min(4096 if wide else 64, _launch.next_pow2(max(col1 - col0, 16)))
        launches.append(Launch(
            _sum_row_groups_kernel, (groups, triton.cdiv(col1 - col0, block_c)),
            dict(P=partial, OUT1=drk, OUT2=drv, ROWS_PER_OUT=rows, C=c, C1=c1, COL0=col0, COL1=col1),
            dict(BLOCK_R=block_r, BLOCK_C=block_c), num_warps=4,
        ))
    return launches


def plan_backward(dout, q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse, is_causal, dropout_p, scale):
    """Allocate ``dq, dk, dv, drk, drv``, the scratch slots and the partial table gradients; plan the
    main kernel and the fixed-order reduction of the partials."""
    b, h, length, dh = q.shape
    dv = v.shape[-1]
    cfg = bwd_config(b, h, length, dh, dv, q.device)
    consts = _constexprs(q, v, rel_k, kpm, bias, is_causal, dropout_p, cfg)
    programs = max(1, min(b * h, cfg["programs"] or _slots(q.device, cfg["num_warps"])))
    n_buckets = rel_k.shape[-2]
    kp = consts["KP"]
    dq = _launch.empty(q.shape, q.dtype, q.device)
    dk = _launch.empty(k.shape, k.dtype, k.device)
    dvv = _launch.empty(v.shape, v.dtype, v.device)
    one_key_block = length <= cfg["block_n"]  # dk, dv in registers: no float32 accumulator rows
    acc_rows = 0 if one_key_block else length
    dk_acc = _launch.empty((b, h, acc_rows, dh), torch.float32, q.device)
    dv_acc = _launch.empty((b, h, acc_rows, dv), torch.float32, q.device)
    tabs = _launch.empty((programs, 2, cfg["block_m"], kp), torch.float32, q.device)
    wtabs = _launch.empty((programs, cfg["block_m"], kp), torch.int64, q.device)
    # both tables shared by the heads: one partial row per program sums every head (h times less)
    shared_tables = rel_k.shape[0] == 1 and rel_v.shape[0] == 1
    partial = _launch.empty(((1 if shared_tables else h) * programs, n_buckets * (dh + dv)), torch.float32, q.device)
    drk = _launch.empty((rel_k.shape[0], n_buckets, dh), rel_k.dtype, q.device)
    drv = _launch.empty((rel_v.shape[0], n_buckets, dv), rel_v.dtype, q.device)
    args = _common_args(q, k, v, rel_k, rel_v, tau, kpm, bias, seed)
    args.update(O=out, DO=dout, LSE=lse, DQ=dq, DK=dk, DV_=dvv, DKACC=dk_acc, DVACC=dv_acc, TABS=tabs, WTABS=wtabs,
                PART=partial)
    for prefix, t in (("so", out), ("sdo", dout), ("sdq", dq), ("sdk", dk), ("sdv", dvv)):
        args.update({f"{prefix}b": t.stride(0), f"{prefix}h": t.stride(1)})
        args.update({f"{prefix}{'n' if prefix in ('sdk', 'sdv') else 'm'}": t.stride(2), f"{prefix}d": t.stride(3)})
    args.update(B=b, H=h, L=length, qk_scale=float(scale) * LOG2E, scale=float(scale), dropout_p=float(dropout_p),
                p_fixed=_p_fixed(dropout_p, PACK_P_BITS))
    consts["ZC"] = 4096 if triton_interpreter_enabled() else 256  # columns zeroed per store
    consts["ONE_KEY_BLOCK"] = one_key_block
    consts["SHARED_TABLES"] = shared_tables
    consts["ALIGN"] = _row_alignment(dout, q, k, v, rel_k, rel_v, out, dq, dk, dvv, dk_acc, dv_acc)
    # dq, dk, dv rows that are not 16-byte aligned stored in column pairs (rmha._store_rows; S3:
    # 6589 -> 6577 instructions; the forward's o stored so cost more, 3533 -> 3556 per tile)
    consts["CVT_ASM"] = _launch.packed_cvt(q.device)
    # (a sequence's key padding packed once per program: rmha._key_bits; sm_90a, B256 h2 L200 dh64,
    # four 64-key blocks: 119.6 -> 98.9 us modelled, 130.7 -> 119.9 with dropout)
    consts["KEY_BITS"] = _key_bit_tiles(kpm, length, cfg["block_n"], cfg["key_bits"])
    main = Launch(_tisas_bwd_kernel, (programs,), args, consts, num_warps=cfg["num_warps"], num_stages=1)
    return dq, dk, dvv, drk, drv, [main, *plan_reduce(partial, drk, drv)]
