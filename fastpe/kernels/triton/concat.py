"""Concat-projection ``Linear(concat(x, table[p]))`` in Triton, never building the concat.

    y = [x | table[p]] W^T + b

Forward: one GEMM over the tokens whose left operand is gathered on the fly (``x`` columns,
then the token's table row), bias in the epilogue. One launch, as for ``nn.Linear``.

Backward: two launches. With ``G = S^T dy`` the ``[table rows, d_out]`` segment sum of ``dy``
over the tokens at each position (``S`` the one-hot position matrix, never built):

    dx = dy Wx,   dW = dy^T [x | table[p]],   db = 1^T dy,   dtable = G Wp

1. ``_bwd_kernel``: the tokens are split into groups (a block of positions x a range of
   batches); each program streams its group once, writes ``dx`` for its tokens (``dy`` is in
   registers already) and one float32 partial of ``dW``, ``db`` and ``G`` per group (split-K
   over the tokens). The partial holds the table columns of ``dW`` only when every sequence has
   its own positions; otherwise they are ``dWp = G^T table[p]``, from the summed ``G``.
   ``G``'s partial is a plain sum over the group's batches per position when the positions are
   shared by the batch (default or ``[L]``), or a one-hot product per block of table rows when
   every sequence has its own positions.
2. ``_bwd_finish_kernel``: all its programs run at once: most sum one slice of the ``dW``/``db``
   partials in a fixed order; some form a tile of ``dWp`` from the ``G`` partials; the others
   sum the ``G`` partials of a block of table rows and multiply by ``Wp`` into ``dtable``.
   Deterministic, no atomics.

``dx`` needs all of ``d_out`` in one tile; above 128 output features it is a separate GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpe.kernels.triton import _launch
from fastpe.kernels.triton._launch import Launch
from fastpe.kernels.triton._limits import MAX_TABLE_ROWS
from fastpe.kernels.triton.rmha import _tile

MAX_FUSED_DOUT = 128  # widest d_out whose dx the backward kernel writes itself


@triton.jit
def _token_rows(POS, b, l, spb, spl, mask, POS_KIND: tl.constexpr):
    """Table row of token (b, l): ``l``, ``POS[l]`` or ``POS[b, l]``."""
    if POS_KIND == 0:
        return l
    elif POS_KIND == 1:
        return tl.load(POS + l * spl, mask=mask, other=0)
    else:
        return tl.load(POS + b * spb + l * spl, mask=mask, other=0)


@triton.jit
def _k_block(acc, L_, rows, m_mask, slr, slc, B_ROW0: tl.constexpr, Bm, offs_n, n_mask, sbk, sbn, k0,
             WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, dt, DOT_PREC: tl.constexpr, ALIGN_L: tl.constexpr,
             ALIGN_B: tl.constexpr):
    """``acc += left[rows, k0:k0 + BLOCK_K] @ Bm[B_ROW0 + k0:, offs_n]``, columns past ``WIDTH`` zero;
    the left operand is ``x`` or the table (rows: tokens or their table rows), taken in ``dt``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < WIDTH
    a = tl.load(_tile(L_, rows, offs_k, slr, slc, ALIGN_L), mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    b = tl.load(_tile(Bm, B_ROW0 + offs_k, offs_n, sbk, sbn, ALIGN_B), mask=k_mask[:, None] & n_mask[None, :],
                other=0.0)
    return tl.dot(a.to(dt), b.to(dt), acc, input_precision=DOT_PREC)


@triton.jit
def _k_blocks(acc, L_, rows, m_mask, slr, slc, B_ROW0: tl.constexpr, Bm, offs_n, n_mask, sbk, sbn,
              WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, dt, DOT_PREC: tl.constexpr, ALIGN_L: tl.constexpr,
              ALIGN_B: tl.constexpr, UNROLL: tl.constexpr):
    """:func:`_k_block` over the ``WIDTH`` columns of one left source; ``UNROLL``: unrolled."""
    if UNROLL:
        for k0 in tl.static_range(0, WIDTH, BLOCK_K):
            acc = _k_block(acc, L_, rows, m_mask, slr, slc, B_ROW0, Bm, offs_n, n_mask, sbk, sbn, k0, WIDTH, BLOCK_K,
                           dt, DOT_PREC, ALIGN_L, ALIGN_B)
    else:
        for k0 in range(0, WIDTH, BLOCK_K):
            acc = _k_block(acc, L_, rows, m_mask, slr, slc, B_ROW0, Bm, offs_n, n_mask, sbk, sbn, k0, WIDTH, BLOCK_K,
                           dt, DOT_PREC, ALIGN_L, ALIGN_B)
    return acc


@triton.jit
def _gemm_kernel(
    A, TAB, POS, Bm, BIAS, C,
    M, L,
    sam, sak, str_, stc, spb, spl, sbk, sbn, scm, scn,
    KA: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    POS_KIND: tl.constexpr, HAS_TAB: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIGN_A: tl.constexpr = 0, ALIGN_T: tl.constexpr = 0, ALIGN_B: tl.constexpr = 0, ALIGN_C: tl.constexpr = 0,
    UNROLL: tl.constexpr = False,
):
    """``C = [A | TAB[row(m)]] @ B (+ BIAS)``: columns ``k < KA`` of the left operand come from
    ``A [M, KA]``, the rest from the token's table row (token ``m`` is ``(m // L, m % L)``).
    The widths are compile-time constants (a model has a few): the masks of a width such as 90
    are then known to hold in pairs, so aligned pairs load as one 32-bit word. ``UNROLL``: the K
    loops unrolled (a few blocks, see plan_gemm), so each block's column mask is a constant."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if HAS_TAB:
        rows = _token_rows(POS, offs_m // L, offs_m % L, spb, spl, m_mask, POS_KIND)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dt = A.dtype.element_ty
    # Two loops, the x columns then the table's: each K block loads one source, not both masked.
    acc = _k_blocks(acc, A, offs_m, m_mask, sam, sak, 0, Bm, offs_n, n_mask, sbk, sbn, KA, BLOCK_K, dt, DOT_PREC,
                    ALIGN_A, ALIGN_B, UNROLL)
    if HAS_TAB:
        acc = _k_blocks(acc, TAB, rows, m_mask, str_, stc, KA, Bm, offs_n, n_mask, sbk, sbn, K - KA, BLOCK_K, dt,
                        DOT_PREC, ALIGN_T, ALIGN_B, UNROLL)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(_tile(C, offs_m, offs_n, scm, scn, ALIGN_C), acc.to(C.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _bwd_kernel(
    DY, X, TAB, POS, W, DX, PART_W, PART_G,
    B, L, ROWS, BATCHES_PER_GROUP, L_BLOCKS,
    sdm, sdn, sxm, sxk, str_, stc, spb, spl, swo, swi, sxo_m, sxo_k,
    DOUT: tl.constexpr, DIN: tl.constexpr, WCOLS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, POS_KIND: tl.constexpr, FUSE_DX: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIGN_DY: tl.constexpr = 0, ALIGN_X: tl.constexpr = 0, ALIGN_T: tl.constexpr = 0, ALIGN_W: tl.constexpr = 0,
    ALIGN_DX: tl.constexpr = 0,
):
    """One (token group, concat-column tile, d_out tile): partial ``dy^T [x | table[p]]``
    ``[BLOCK_O, BLOCK_C]`` into ``PART_W[group]`` over its first ``WCOLS`` columns (all of them
    with per-sequence positions; the ``x`` columns otherwise, the table columns then come from
    ``G`` in the finish kernel), and with the first column tile ``db`` (column ``WCOLS``) and ``G``
    into ``PART_G``; ``dx`` for the tile's x columns when ``FUSE_DX``.

    Token group ``g``: positions ``[lb * BLOCK_L, +BLOCK_L)`` (``lb = g % L_BLOCKS``) of batches
    ``[s * BATCHES_PER_GROUP, +BATCHES_PER_GROUP)`` (``s = g // L_BLOCKS``), ``BLOCK_B`` at a time.
    ``PART_G``: ``[groups // L_BLOCKS, L, DOUT]`` per-position sums over the group's batches
    (POS_KIND 0, 1), or ``[groups, ROWS, DOUT]`` per table row (POS_KIND 2).
    """
    group = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_o = tl.program_id(2)
    lb = group % L_BLOCKS
    split = group // L_BLOCKS
    BLOCK_M: tl.constexpr = BLOCK_B * BLOCK_L
    offs_r = tl.arange(0, BLOCK_M)
    l = lb * BLOCK_L + offs_r % BLOCK_L
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_mask = offs_o < DOUT
    is_x = offs_c < DIN
    is_t = (offs_c >= DIN) & (offs_c < WCOLS)  # none unless per-sequence positions (else WCOLS = DIN)
    b_lo = split * BATCHES_PER_GROUP
    b_hi = tl.minimum(B, b_lo + BATCHES_PER_GROUP)
    first_tile = pid_c == 0
    has_x = pid_c * BLOCK_C < DIN
    if FUSE_DX:  # Wx[o, c] for this tile's x columns: dx = dy @ Wx
        wx = tl.load(_tile(W, offs_o, offs_c, swo, swi, ALIGN_W), mask=o_mask[:, None] & is_x[None, :], other=0.0)

    acc = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
    acc_db = tl.zeros([BLOCK_O], tl.float32)
    acc_g = tl.zeros([BLOCK_O, BLOCK_L], tl.float32)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        b = b0 + offs_r // BLOCK_L
        valid = (b < b_hi) & (l < L)
        m = b * L + l
        dy_t = tl.load(_tile(DY, offs_o, m, sdn, sdm, ALIGN_DY), mask=o_mask[:, None] & valid[None, :], other=0.0)
        ext = tl.load(_tile(X, m, offs_c, sxm, sxk, ALIGN_X), mask=valid[:, None] & is_x[None, :], other=0.0)
        if POS_KIND == 2:
            rows = _token_rows(POS, b, l, spb, spl, valid, POS_KIND)
            tb = tl.load(_tile(TAB, rows, offs_c - DIN, str_, stc, ALIGN_T), mask=valid[:, None] & is_t[None, :], other=0.0)
            ext += tb.to(ext.dtype)
        acc = tl.dot(dy_t, ext.to(dy_t.dtype), acc, input_precision=DOT_PREC)
        if FUSE_DX:
            if has_x:
                dx = tl.dot(tl.trans(dy_t), wx.to(dy_t.dtype), input_precision=DOT_PREC)
                tl.store(_tile(DX, m, offs_c, sxo_m, sxo_k, ALIGN_DX), dx.to(DX.dtype.element_ty),
                         mask=valid[:, None] & is_x[None, :])
        if first_tile:
            dy_f = dy_t.to(tl.float32)
            acc_db += tl.sum(dy_f, axis=1)
            if POS_KIND != 2:  # positions shared by the batch: sum this chunk's batches per position
                acc_g += tl.sum(tl.reshape(dy_f, (BLOCK_O, BLOCK_B, BLOCK_L)), axis=1)

    part = PART_W + group.to(tl.int64) * DOUT * (WCOLS + 1)
    tl.store(part + offs_o[:, None] * (WCOLS + 1) + offs_c[None, :], acc, mask=o_mask[:, None] & (offs_c < WCOLS)[None, :])
    if first_tile:
        tl.store(part + offs_o * (WCOLS + 1) + WCOLS, acc_db, mask=o_mask)
        if POS_KIND != 2:
            offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
            part_g = PART_G + split.to(tl.int64) * L * DOUT
            tl.store(part_g + offs_l[None, :] * DOUT + offs_o[:, None], acc_g, mask=o_mask[:, None] & (offs_l < L)[None, :])
        else:  # per-sequence positions: one-hot products per block of table rows (a second pass over dy)
            part_g = PART_G + group.to(tl.int64) * ROWS * DOUT
            for r0 in range(0, ROWS, BLOCK_R):
                offs_t = r0 + tl.arange(0, BLOCK_R)
                acc_t = tl.zeros([BLOCK_R, BLOCK_O], tl.float32)
                for b0 in range(b_lo, b_hi, BLOCK_B):
                    b = b0 + offs_r // BLOCK_L
                    valid = (b < b_hi) & (l < L)
                    rows = tl.load(POS + b * spb + l * spl, mask=valid, other=-1)
                    dy = tl.load(_tile(DY, b * L + l, offs_o, sdm, sdn, ALIGN_DY), mask=valid[:, None] & o_mask[None, :],
                                 other=0.0)
                    onehot = (offs_t[:, None] == rows[None, :]).to(dy.dtype)
                    acc_t = tl.dot(onehot, dy, acc_t, input_precision=DOT_PREC)
                tl.store(part_g + offs_t[:, None] * DOUT + offs_o[None, :], acc_t, mask=(offs_t < ROWS)[:, None] & o_mask[None, :])


@triton.jit
def _position_g(PART_G, G_PARTS, L, DOUT, offs_k, k_mask, offs_o, o_mask, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
    """``G`` of positions ``offs_k`` (``[BLOCK_K, BLOCK_O]``): the sum of its ``G_PARTS``
    per-position partials ``PART_G [G_PARTS, L, DOUT]``, in a fixed order."""
    g = tl.zeros([BLOCK_K, BLOCK_O], tl.float32)
    for s in range(0, G_PARTS):
        g += tl.load(PART_G + (s * L + offs_k[:, None]) * DOUT + offs_o[None, :],
                     mask=k_mask[:, None] & o_mask[None, :], other=0.0)
    return g


@triton.jit
def _bwd_finish_kernel(
    PART_W, PART_G, POS, W, TAB, DW, DB, DT,
    GROUPS, G_PARTS, L, ROWS, TROWS, N_W_PROGS, N_P_PROGS, DP_TILES,
    spl, swo, swi, str_, stc, sdwo, sdwc, sdtr, sdtc,
    DOUT: tl.constexpr, DIN: tl.constexpr, WCOLS: tl.constexpr, DPOS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SG: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, POS_KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr, ALIGN_T: tl.constexpr = 0, ALIGN_WP: tl.constexpr = 0,
):
    """Programs ``< N_W_PROGS``: ``BLOCK_E`` elements of ``[dW | db]`` (the first ``WCOLS`` columns
    of ``dW``) summed over the groups. The next ``N_P_PROGS`` (positions shared by the batch): a
    ``[BLOCK_O, BLOCK_D]`` tile of the table columns of ``dW``, ``G^T table[p]``, from the ``G``
    partials (a ``[d_out, L] x [L, d_pos]`` product instead of a float32 partial of those
    columns per token group: at S1 that halves the partials' bytes).
    The others: a ``[BLOCK_T, BLOCK_D]`` tile of ``dtable = G Wp`` with ``G`` summed from its
    ``G_PARTS`` partials (and for ``[L]`` positions gathered from positions by a one-hot product);
    table rows no token uses get zeros."""
    pid = tl.program_id(0)
    if pid < N_W_PROGS:
        width = WCOLS + 1
        offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = offs_e < DOUT * width
        sums = tl.zeros([BLOCK_S, BLOCK_E], tl.float32)
        for g0 in range(0, GROUPS, BLOCK_S):
            offs_s = g0 + tl.arange(0, BLOCK_S)
            ptrs = PART_W + offs_s[:, None].to(tl.int64) * (DOUT * width) + offs_e[None, :]
            sums += tl.load(ptrs, mask=(offs_s < GROUPS)[:, None] & e_mask[None, :], other=0.0)
        total = tl.sum(sums, axis=0)
        o = offs_e // width
        c = offs_e % width
        tl.store(DW + o * sdwo + c * sdwc, total.to(DW.dtype.element_ty), mask=e_mask & (c < WCOLS))
        if HAS_BIAS:
            tl.store(DB + o, total.to(DB.dtype.element_ty), mask=e_mask & (c == WCOLS))
    elif pid < N_W_PROGS + N_P_PROGS:
        t = pid - N_W_PROGS
        offs_o = (t // DP_TILES) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_d = (t % DP_TILES) * BLOCK_D + tl.arange(0, BLOCK_D)
        o_mask = offs_o < DOUT
        d_mask = offs_d < DPOS
        dwp = tl.zeros([BLOCK_O, BLOCK_D], tl.float32)
        for k0 in range(0, L, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < L
            h = _position_g(PART_G, G_PARTS, L, DOUT, offs_k, k_mask, offs_o, o_mask, BLOCK_K, BLOCK_O)
            rows = _token_rows(POS, 0, offs_k, 0, spl, k_mask, POS_KIND)
            tab = tl.load(_tile(TAB, rows, offs_d, str_, stc, ALIGN_T), mask=k_mask[:, None] & d_mask[None, :],
                          other=0.0)
            dwp = tl.dot(tl.trans(h), tab.to(tl.float32), dwp, input_precision=DOT_PREC)
        tl.store(DW + offs_o[:, None] * sdwo + (DIN + offs_d)[None, :] * sdwc, dwp.to(DW.dtype.element_ty),
                 mask=o_mask[:, None] & d_mask[None, :])
    else:
        t = pid - N_W_PROGS - N_P_PROGS
        offs_t = (t // DP_TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = (t % DP_TILES) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < DPOS
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for o0 in range(0, DOUT, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            o_mask = offs_o < DOUT
            if POS_KIND == 1:  # G = onehot(POS)^T H, H[l] = sum of the partials of position l
                g = tl.zeros([BLOCK_T, BLOCK_O], tl.float32)
                for k0 in range(0, L, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_mask = offs_k < L
                    h = _position_g(PART_G, G_PARTS, L, DOUT, offs_k, k_mask, offs_o, o_mask, BLOCK_K, BLOCK_O)
                    rows = tl.load(POS + offs_k * spl, mask=k_mask, other=-1)
                    onehot = (offs_t[:, None] == rows[None, :]).to(tl.float32)
                    g = tl.dot(onehot, h, g, input_precision="ieee")
            else:  # partial rows are table rows already (rows past ROWS: unused, zero)
                g3 = tl.zeros([BLOCK_SG, BLOCK_T, BLOCK_O], tl.float32)
                tile_mask = (offs_t < ROWS)[:, None] & o_mask[None, :]
                for s0 in range(0, G_PARTS, BLOCK_SG):
                    offs_s = s0 + tl.arange(0, BLOCK_SG)
                    ptrs = PART_G + ((offs_s[:, None, None].to(tl.int64) * ROWS + offs_t[None, :, None]) * DOUT
                                     + offs_o[None, None, :])
                    g3 += tl.load(ptrs, mask=(offs_s < G_PARTS)[:, None, None] & tile_mask[None, :, :], other=0.0)
                g = tl.sum(g3, axis=0)
            wp = tl.load(_tile(W, offs_o, DIN + offs_d, swo, swi, ALIGN_WP), mask=o_mask[:, None] & d_mask[None, :],
                         other=0.0)
            acc = tl.dot(g, wp.to(tl.float32), acc, input_precision=DOT_PREC)
        tl.store(DT + offs_t[:, None] * sdtr + offs_d[None, :] * sdtc, acc.to(DT.dtype.element_ty),
                 mask=(offs_t < TROWS)[:, None] & d_mask[None, :])


def _check(x: torch.Tensor, table: torch.Tensor, positions) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"concat_projection: the triton backend supports float16, bfloat16 and float32, got {x.dtype}")
    _launch.check_int32_indexing("concat_projection", x)
    rows = x.shape[1] if positions is None else table.shape[0]
    if rows > MAX_TABLE_ROWS:
        raise ValueError(
            f"concat_projection: the triton backend supports tables of up to {MAX_TABLE_ROWS} used rows, got {rows}; "
            "use backend='torch'"
        )


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    """``[B, L, d]`` as ``[B*L, d]`` (a view when the strides allow, else a copy)."""
    return t.reshape(-1, t.shape[-1])


def _pos_args(positions):
    """(tensor or None, batch stride, position stride, POS_KIND)."""
    if positions is None:
        return None, 0, 0, 0
    if positions.dim() == 1:
        return positions, 0, positions.stride(0), 1
    return positions, positions.stride(0), positions.stride(1), 2


def plan_gemm(a, b, out, *, table=None, positions=None, length=1, bias=None):
    """``out = [a | table[row(m)]] @ b (+ bias)``; ``a [M, KA]``, ``b [K, N]``, ``out [M, N]``
    (views with any strides); without ``table``, ``K = KA``."""
    m, n = out.shape
    ka = a.shape[1]
    k = b.shape[0]
    one_n_tile = n <= 128  # SRS widths: 4 warps and 32-wide K blocks (sm_90a at B128 L75 d90: 3.0 ->
    # 2.3 us modelled; 16-wide blocks or 32-row tiles model slower; B512 L50 d32 and B256 L200 d64
    # stay memory-bound either way)
    cfg = _launch.knobs(
        "concat_gemm",
        block_m=64 if m >= 64 else max(16, _launch.next_pow2(m)),
        block_n=max(16, min(128, _launch.next_pow2(n))),
        block_k=max(16, min(32 if one_n_tile else 64, _launch.next_pow2(k))),
        num_warps=4 if one_n_tile else 8, num_stages=2, unroll=-1,
    )
    if cfg["unroll"] < 0:
        k_blocks = triton.cdiv(ka, cfg["block_k"]) + triton.cdiv(k - ka, cfg["block_k"])
        # Unrolled, each K block's column mask and offsets are constants: no per-block compares
        # and selects (sm_90a, B128 L75 d90, six blocks: 2.31 -> 1.08 us modelled; B128 L75 d50:
        # 1.16 -> 0.67). Only with one output tile: unrolled, the 8-warp kernel of wider outputs
        # issued 60 MMA instructions per warp where the loops issue 32 (B128 L200 d200: 8.71 ->
        # 14.69 us modelled).
        cfg["unroll"] = int(one_n_tile and k_blocks <= 8)
    pos, spb, spl, pos_kind = _pos_args(positions)
    args = dict(
        A=a, TAB=table if table is not None else a, POS=pos if pos is not None else a, Bm=b,
        BIAS=bias if bias is not None else out, C=out, M=m, L=length,
        sam=a.stride(0), sak=a.stride(1), str_=table.stride(0) if table is not None else 0,
        stc=table.stride(1) if table is not None else 0, spb=spb, spl=spl,
        sbk=b.stride(0), sbn=b.stride(1), scm=out.stride(0), scn=out.stride(1),
    )
    constexprs = dict(KA=ka, K=k, N=n, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                      POS_KIND=pos_kind, HAS_TAB=table is not None, HAS_BIAS=bias is not None,
                      DOT_PREC=_launch.dot_precision(a.dtype),
                      ALIGN_A=_launch.run_alignment(a), ALIGN_C=_launch.run_alignment(out),
                      ALIGN_T=_launch.run_alignment(table) if table is not None else 0,
                      # the weight is contiguous along K (W^T of a Linear) or along N; its table
                      # rows start KA rows in (KA = 90 in bf16: 180 bytes, so 4-byte runs at most)
                      ALIGN_B=min(max(_launch.run_alignment(b, 0), _launch.run_alignment(b, 1)),
                                  _launch.offset_alignment(ka * b.stride(0) * b.element_size())),
                      UNROLL=bool(cfg["unroll"]))
    grid = (triton.cdiv(m, cfg["block_m"]), triton.cdiv(n, cfg["block_n"]))
    return Launch(_gemm_kernel, grid, args, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def plan_forward(x, table, weight, bias, positions):
    _check(x, table, positions)
    b, L, d_in = x.shape
    d_out = weight.shape[0]
    y = _launch.empty((b, L, d_out), x.dtype, x.device)
    launch = plan_gemm(_rows_2d(x), weight.t(), y.view(b * L, d_out), table=table, positions=positions, length=L, bias=bias)
    return y, [launch]


# tokens one backward group streams at least: fewer groups, fewer float32 partials to sum
MIN_GROUP_TOKENS = 128
# tokens of one backward chunk: every gathered element costs a 64-bit pointer register
CHUNK_TOKENS = 32


def bwd_config(b, L, d_out, w_cols, rows, pos_kind, device):
    """Tiles and token groups of the backward kernel. A group is ``block_l`` positions of a
    range of batches, streamed in chunks of 32 tokens, at least ``MIN_GROUP_TOKENS`` tokens per
    group. The position block (4 preferred on ties) minimises the bytes moved, counting the
    token stream once per share of program slots its waves use (the kernel runs one 8-warp
    program per SM) plus the float32 ``dW`` partials, written once and read once per group:
    slot use alone chose one position per group at L = 200 (200 partials of 128 KiB, more
    bytes than the tokens)."""
    sms = _launch.num_sms(device)
    block_o = max(16, min(MAX_FUSED_DOUT, _launch.next_pow2(d_out)))
    block_c = max(16, min(128, 8192 // block_o, _launch.next_pow2(w_cols)))  # acc: at most 32 fp32 per thread
    tiles = triton.cdiv(d_out, block_o) * triton.cdiv(w_cols, block_c)
    max_groups = max(1, sms // tiles)
    if pos_kind == 2:  # keep the per-group [rows, d_out] partials of G under ~64 MiB
        max_groups = max(1, min(max_groups, (64 << 20) // (4 * rows * d_out)))
    max_groups = max(1, min(max_groups, triton.cdiv(b * L, MIN_GROUP_TOKENS)))
    best = None
    for block_l in dict.fromkeys(min(c, _launch.next_pow2(L)) for c in (4, 8, 2, 16, 1)):
        block_b = max(1, CHUNK_TOKENS // block_l)
        l_blocks = triton.cdiv(L, block_l)
        splits = max(1, min(triton.cdiv(b, block_b), max_groups // l_blocks))
        splits = max(1, triton.cdiv(b, max(1, triton.cdiv(triton.cdiv(b, splits), block_b)) * block_b))  # as plan_backward
        groups = l_blocks * splits
        used = groups / (triton.cdiv(groups, max_groups) * max_groups)  # share of the waves' program slots
        cost = b * L * (2 * d_out + w_cols) / used + 2 * groups * d_out * (w_cols + 1) * 2  # partials: fp32, 2x bf16
        if best is None or cost < best[0]:
            best = (cost, block_l, block_b, groups)
    _, block_l, block_b, groups = best
    warps = 8 if block_o * block_c >= 64 * 128 else 4
    return _launch.knobs("concat_bwd", block_o=block_o, block_c=block_c, block_l=block_l, block_b=block_b,
                         groups=groups, block_r=max(16, min(64, _launch.next_pow2(rows))), num_warps=warps, num_stages=2)


def plan_backward(dy, x, table, weight, positions, has_bias, need_dx=True, need_w=True, need_table=True):
    """Gradients ``(dx, dtable, dweight, dbias)`` (None where not needed) and their launches."""
    b, L, d_in = x.shape
    d_out, d_pos = weight.shape[0], table.shape[1]
    next_cols = d_in + d_pos
    pos, spb, spl, pos_kind = _pos_args(positions)
    rows = L if positions is None else table.shape[0]
    # columns of dW summed as per-group partials: the table columns only with per-sequence
    # positions; otherwise they are G^T table[p] in the finish kernel
    w_cols = next_cols if pos_kind == 2 else d_in
    m = b * L
    dy2, x2 = _rows_2d(dy), _rows_2d(x)
    cfg = bwd_config(b, L, d_out, w_cols, rows, pos_kind, x.device)
    block_l, block_b = cfg["block_l"], cfg["block_b"]
    l_blocks = triton.cdiv(L, block_l)
    splits = max(1, min(triton.cdiv(b, block_b), triton.cdiv(cfg["groups"], l_blocks)))
    per_group = max(1, triton.cdiv(triton.cdiv(b, splits), block_b)) * block_b
    splits = triton.cdiv(b, per_group)
    groups = splits * l_blocks
    fuse_dx = need_dx and d_out <= cfg["block_o"]

    launches = []
    dx = _launch.empty((b, L, d_in), x.dtype, x.device) if need_dx else None
    if need_dx and not fuse_dx:
        launches.append(plan_gemm(dy2, weight[:, :d_in], dx.view(m, d_in)))
    part_w = _launch.empty((groups, d_out, w_cols + 1), torch.float32, x.device)
    g_parts = groups if pos_kind == 2 else splits
    part_g = _launch.empty((g_parts, rows if pos_kind == 2 else L, d_out), torch.float32, x.device)
    dx2 = dx.view(m, d_in) if dx is not None else x2
    args = dict(
        DY=dy2, X=x2, TAB=table, POS=pos if pos is not None else table, W=weight, DX=dx2, PART_W=part_w, PART_G=part_g,
        B=b, L=L, ROWS=rows, BATCHES_PER_GROUP=per_group,
        L_BLOCKS=l_blocks,
        sdm=dy2.stride(0), sdn=dy2.stride(1), sxm=x2.stride(0), sxk=x2.stride(1), str_=table.stride(0),
        stc=table.stride(1), spb=spb, spl=spl, swo=weight.stride(0), swi=weight.stride(1),
        sxo_m=dx2.stride(0), sxo_k=dx2.stride(1),
    )
    constexprs = dict(DOUT=d_out, DIN=d_in, WCOLS=w_cols,
                      BLOCK_B=block_b, BLOCK_L=block_l, BLOCK_O=cfg["block_o"], BLOCK_C=cfg["block_c"],
                      BLOCK_R=cfg["block_r"], POS_KIND=pos_kind, FUSE_DX=fuse_dx, DOT_PREC=_launch.dot_precision(x.dtype),
                      ALIGN_DY=_launch.run_alignment(dy2), ALIGN_X=_launch.run_alignment(x2),
                      # the table's columns are read d_in columns into the concat tile
                      ALIGN_T=min(_launch.run_alignment(table),
                                  _launch.offset_alignment(d_in * table.stride(1) * table.element_size())),
                      ALIGN_W=_launch.run_alignment(weight),
                      ALIGN_DX=_launch.run_alignment(dx2))
    grid = (groups, triton.cdiv(w_cols, cfg["block_c"]), triton.cdiv(d_out, cfg["block_o"]))
    launches.append(Launch(_bwd_kernel, grid, args, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))

    dweight = _launch.empty((d_out, next_cols), weight.dtype, x.device)
    dbias = _launch.empty((d_out,), weight.dtype, x.device) if has_bias else None
    dtable = _launch.empty(table.shape, table.dtype, x.device) if need_table else None
    block_e, block_s = 128, 16
    n_w = triton.cdiv(d_out * (w_cols + 1), block_e)
    block_t = 16
    block_d = max(16, min(64, _launch.next_pow2(d_pos)))
    block_o = max(16, min(64, _launch.next_pow2(d_out)))
    dp_tiles = triton.cdiv(d_pos, block_d)
    n_p = triton.cdiv(d_out, block_o) * dp_tiles if pos_kind != 2 else 0
    n_t = triton.cdiv(table.shape[0], block_t) * dp_tiles if need_table else 0
    f_args = dict(
        PART_W=part_w, PART_G=part_g, POS=pos if pos is not None else part_g, W=weight, TAB=table, DW=dweight,
        DB=dbias if dbias is not None else dweight, DT=dtable if dtable is not None else dweight,
        GROUPS=groups, G_PARTS=g_parts, L=L, ROWS=rows if pos_kind != 1 else L,
        TROWS=table.shape[0], N_W_PROGS=n_w, N_P_PROGS=n_p, DP_TILES=dp_tiles,
        spl=spl, swo=weight.stride(0), swi=weight.stride(1), str_=table.stride(0), stc=table.stride(1),
        sdwo=dweight.stride(0), sdwc=dweight.stride(1),
        sdtr=dtable.stride(0) if dtable is not None else 0, sdtc=dtable.stride(1) if dtable is not None else 0,
    )
    f_constexprs = dict(DOUT=d_out, DIN=d_in, WCOLS=w_cols, DPOS=d_pos,
                        BLOCK_E=block_e, BLOCK_S=block_s, BLOCK_SG=max(1, 2048 // (block_t * block_o)),
                        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_D=block_d,
                        BLOCK_K=max(16, min(64, _launch.next_pow2(L))), POS_KIND=pos_kind, HAS_BIAS=has_bias,
                        DOT_PREC=_launch.dot_precision(x.dtype), ALIGN_T=_launch.run_alignment(table),
                        # Wp: the weight's columns from d_in on
                        ALIGN_WP=min(_launch.run_alignment(weight),
                                     _launch.offset_alignment(d_in * weight.stride(1) * weight.element_size())))
    launches.append(Launch(_bwd_finish_kernel, (n_w + n_p + n_t,), f_args, f_constexprs, num_warps=4))
    return dx, dtable, dweight if need_w else None, dbias, launches
