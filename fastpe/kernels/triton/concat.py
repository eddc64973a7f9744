"""Concat-projection ``Linear(concat(x, table[p]))`` in Triton, never building the concat.

    y = x Wx^T + T[p],   T = table Wp^T + b   (one row per table row, computed once per call)

Forward: a small GEMM for ``T`` (table rows x d_pos x d_out, float32), then one GEMM over the
tokens whose epilogue adds ``T[p]`` (bias included).

Backward, with ``S`` the one-hot ``[tokens, table rows]`` position matrix:

    dx = dy Wx,   [dWx | dWp | dT^T | db] = dy^T [x | table[p] | S | 1],   dtable = dT Wp

The second line is a single split-K GEMM over the tokens whose right operand is assembled on
the fly (``x``, gathered table rows, the one-hot columns and a ones column; ``[tokens, *]`` is
never materialised), followed by a fixed-order reduction of the split partials: the weight,
bias and table gradients are reductions over the batch made deterministic without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpe.kernels.triton import _launch
from fastpe.kernels.triton._launch import Launch
from fastpe.kernels.triton._limits import MAX_TABLE_ROWS



@triton.jit
def _gemm_kernel(
    A, Bm, C, ROWT, POS, BIAS,
    M, MA, N, K, L,
    sam, sak, sbk, sbn, scm, scn, srr, srn, spb, spl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ROW_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``C = A @ B (+ ROWT[row(m)]) (+ BIAS)``; rows ``m >= MA`` of A read as zeros.

    ROW_MODE 0: no row term; 1: row ``m % L``; 2: row ``POS[(m // L) * spb + (m % L) * spl]``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    am_mask = offs_m < MA
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(A + offs_m[:, None] * sam + offs_k[None, :] * sak, mask=am_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(Bm + offs_k[:, None] * sbk + offs_n[None, :] * sbn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PREC)
    m_mask = offs_m < M
    if ROW_MODE == 1:
        rows = offs_m % L
        acc += tl.load(ROWT + rows[:, None] * srr + offs_n[None, :] * srn, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    if ROW_MODE == 2:
        rows = tl.load(POS + (offs_m // L) * spb + (offs_m % L) * spl, mask=m_mask, other=0)
        acc += tl.load(ROWT + rows[:, None] * srr + offs_n[None, :] * srn, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(C + offs_m[:, None] * scm + offs_n[None, :] * scn, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _wgrad_kernel(
    DY, X, TAB, POS, PART,
    M, L, DOUT, DIN, DPOS, ROWS, NEXT, K_PER_SPLIT,
    sdm, sdn, sxm, sxk, str_, stc, spb, spl,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_POS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One split of ``dy^T [x | table[p] | onehot(p) | 1]``: partial ``[DOUT, NEXT]`` float32."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_mask = offs_o < DOUT
    is_x = offs_c < DIN
    is_t = (offs_c >= DIN) & (offs_c < DIN + DPOS)
    is_s = (offs_c >= DIN + DPOS) & (offs_c < DIN + DPOS + ROWS)
    is_one = offs_c == DIN + DPOS + ROWS
    dt = DY.dtype.element_ty
    acc = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(M, k_lo + K_PER_SPLIT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        a = tl.load(DY + offs_k[None, :] * sdm + offs_o[:, None] * sdn, mask=o_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_POS:
            rows = tl.load(POS + (offs_k // L) * spb + (offs_k % L) * spl, mask=k_mask, other=0)
        else:
            rows = offs_k % L
        xb = tl.load(X + offs_k[:, None] * sxm + offs_c[None, :] * sxk, mask=k_mask[:, None] & is_x[None, :], other=0.0)
        tb = tl.load(TAB + rows[:, None] * str_ + (offs_c - DIN)[None, :] * stc, mask=k_mask[:, None] & is_t[None, :], other=0.0)
        onehot = (rows[:, None] == (offs_c - DIN - DPOS)[None, :]) & is_s[None, :]
        ext = xb.to(tl.float32) + tb.to(tl.float32) + tl.where(onehot | is_one[None, :], 1.0, 0.0)
        ext = tl.where(k_mask[:, None], ext, 0.0)
        acc = tl.dot(a, ext.to(dt), acc, input_precision=DOT_PREC)
    part = PART + split.to(tl.int64) * DOUT * NEXT
    tl.store(part + offs_o[:, None] * NEXT + offs_c[None, :], acc, mask=o_mask[:, None] & (offs_c < NEXT)[None, :])


@triton.jit
def _wgrad_reduce_kernel(
    PART, DW, DT, DB, SPLITS, DOUT, DIN, DPOS, ROWS, NEXT,
    sdwo, sdwc, sdtr, sdto,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Sum the split partials in order; columns go to dW, dT (transposed) and db."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_o < DOUT)[:, None] & (offs_c < NEXT)[None, :]
    acc = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(PART + s * DOUT * NEXT + offs_o[:, None] * NEXT + offs_c[None, :], mask=mask, other=0.0)
    w_cols = DIN + DPOS
    tl.store(DW + offs_o[:, None] * sdwo + offs_c[None, :] * sdwc, acc.to(DW.dtype.element_ty), mask=mask & (offs_c < w_cols)[None, :])
    r = offs_c - w_cols
    tl.store(DT + r[None, :] * sdtr + offs_o[:, None] * sdto, acc.to(DT.dtype.element_ty),
             mask=mask & ((offs_c >= w_cols) & (offs_c < w_cols + ROWS))[None, :])
    if HAS_BIAS:
        last = (offs_c == w_cols + ROWS)[None, :]
        db = tl.sum(tl.where(last & mask, acc, 0.0), axis=1)
        tl.store(DB + offs_o, db.to(DB.dtype.element_ty), mask=(offs_o < DOUT) & (tl.program_id(1) == (w_cols + ROWS) // BLOCK_C))


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
    if positions is None:
        return None, 0, 0
    if positions.dim() == 1:
        return positions, 0, positions.stride(0)
    return positions, positions.stride(0), positions.stride(1)


def plan_gemm(a, b, out, *, rows_valid=None, rowterm=None, positions=None, length=1, bias=None, dot_dtype=None):
    """``out[:M] = a @ b (+ rowterm[row(m)]) (+ bias)``; ``a [MA, K]``, ``b [K, N]``, ``out [M, N]``
    (views with any strides). Rows of ``out`` beyond ``a``'s get only the epilogue (zeros here)."""
    m, n = out.shape
    ma, k = a.shape
    cfg = _launch.knobs(
        "concat_gemm",
        block_m=64 if m >= 64 else max(16, _launch.next_pow2(m)),
        block_n=max(16, min(128, _launch.next_pow2(n))),
        block_k=max(16, min(64, _launch.next_pow2(k))),
        num_warps=4, num_stages=3,
    )
    pos, spb, spl = _pos_args(positions)
    row_mode = 0 if rowterm is None else (1 if pos is None else 2)
    args = dict(
        A=a, Bm=b, C=out, ROWT=rowterm if rowterm is not None else out, POS=pos if pos is not None else out,
        BIAS=bias if bias is not None else out, M=m, MA=ma, N=n, K=k, L=length,
        sam=a.stride(0), sak=a.stride(1), sbk=b.stride(0), sbn=b.stride(1), scm=out.stride(0), scn=out.stride(1),
        srr=rowterm.stride(0) if rowterm is not None else 0, srn=rowterm.stride(1) if rowterm is not None else 0,
        spb=spb, spl=spl,
    )
    constexprs = dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                      ROW_MODE=row_mode, HAS_BIAS=bias is not None,
                      DOT_PREC=_launch.dot_precision(dot_dtype or a.dtype))
    grid = (triton.cdiv(m, cfg["block_m"]), triton.cdiv(n, cfg["block_n"]))
    return Launch(_gemm_kernel, grid, args, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def plan_forward(x, table, weight, bias, positions):
    _check(x, table, positions)
    b, L, d_in = x.shape
    d_out = weight.shape[0]
    rows = L if positions is None else table.shape[0]
    w_x = weight[:, :d_in]
    w_p = weight[:, d_in:]
    # T = table[:rows] Wp^T + b, float32 so the epilogue adds it without double rounding
    pos_term = _launch.empty((rows, d_out), torch.float32, x.device)
    t_launch = plan_gemm(table[:rows], w_p.t(), pos_term, bias=bias, dot_dtype=x.dtype)
    y = _launch.empty((b, L, d_out), x.dtype, x.device)
    y_launch = plan_gemm(_rows_2d(x), w_x.t(), y.view(b * L, d_out), rowterm=pos_term, positions=positions, length=L)
    return y, [t_launch, y_launch]


def wgrad_config(m, d_out, next_cols, device):
    sms = _launch.num_sms(device)
    block_o = max(16, min(64, _launch.next_pow2(d_out)))
    block_c = max(16, min(64, _launch.next_pow2(next_cols)))
    block_k = 32 if m < 4096 else 64
    tiles = triton.cdiv(d_out, block_o) * triton.cdiv(next_cols, block_c)
    splits = max(1, min(triton.cdiv(m, block_k), (4 * sms) // tiles or 1))
    # keep the float32 partials under ~32 MiB
    splits = max(1, min(splits, (32 << 20) // (4 * d_out * next_cols)))
    return _launch.knobs("concat_wgrad", block_o=block_o, block_c=block_c, block_k=block_k, splits=splits,
                         num_warps=4, num_stages=2)


def plan_backward(dy, x, table, weight, positions, has_bias, need_dx=True, need_w=True, need_table=True):
    """Gradients ``(dx, dtable, dweight, dbias)`` (None where not needed) and their launches."""
    b, L, d_in = x.shape
    d_out, d_pos = weight.shape[0], table.shape[1]
    rows = L if positions is None else table.shape[0]
    m = b * L
    dy2 = _rows_2d(dy)
    launches = []
    dx = dtable = dweight = dbias = None
    if need_dx:
        dx = _launch.empty((b, L, d_in), x.dtype, x.device)
        launches.append(plan_gemm(dy2, weight[:, :d_in], dx.view(m, d_in)))
    if need_w or need_table or has_bias:
        next_cols = d_in + d_pos + rows + 1
        cfg = wgrad_config(m, d_out, next_cols, x.device)
        per_split = triton.cdiv(triton.cdiv(m, cfg["splits"]), cfg["block_k"]) * cfg["block_k"]
        splits = triton.cdiv(m, per_split)
        partial = _launch.empty((splits, d_out, next_cols), torch.float32, x.device)
        pos, spb, spl = _pos_args(positions)
        x2 = _rows_2d(x)
        args = dict(
            DY=dy2, X=x2, TAB=table, POS=pos if pos is not None else table, PART=partial,
            M=m, L=L, DOUT=d_out, DIN=d_in, DPOS=d_pos, ROWS=rows, NEXT=next_cols, K_PER_SPLIT=per_split,
            sdm=dy2.stride(0), sdn=dy2.stride(1), sxm=x2.stride(0), sxk=x2.stride(1),
            str_=table.stride(0), stc=table.stride(1), spb=spb, spl=spl,
        )
        constexprs = dict(BLOCK_O=cfg["block_o"], BLOCK_C=cfg["block_c"], BLOCK_K=cfg["block_k"],
                          HAS_POS=pos is not None, DOT_PREC=_launch.dot_precision(x.dtype))
        grid = (triton.cdiv(d_out, cfg["block_o"]), triton.cdiv(next_cols, cfg["block_c"]), splits)
        launches.append(Launch(_wgrad_kernel, grid, args, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        dweight = _launch.empty((d_out, d_in + d_pos), weight.dtype, x.device)
        dt = _launch.empty((rows, d_out), x.dtype, x.device)
        dbias = _launch.empty((d_out,), weight.dtype, x.device) if has_bias else None
        block_o = max(16, min(32, _launch.next_pow2(d_out)))
        block_c = max(16, min(128, _launch.next_pow2(next_cols)))
        r_args = dict(
            PART=partial, DW=dweight, DT=dt, DB=dbias if dbias is not None else dweight, SPLITS=splits,
            DOUT=d_out, DIN=d_in, DPOS=d_pos, ROWS=rows, NEXT=next_cols,
            sdwo=dweight.stride(0), sdwc=dweight.stride(1), sdtr=dt.stride(0), sdto=dt.stride(1),
        )
        launches.append(Launch(_wgrad_reduce_kernel, (triton.cdiv(d_out, block_o), triton.cdiv(next_cols, block_c)),
                               r_args, dict(BLOCK_O=block_o, BLOCK_C=block_c, HAS_BIAS=has_bias)))
        if need_table:
            dtable = _launch.empty(table.shape, table.dtype, x.device)
            # rows of the table beyond the used ones (default positions) get zeros
            launches.append(plan_gemm(dt, weight[:, d_in:], dtable))
        if not need_w:
            dweight = None
    return dx, dtable, dweight, dbias, launches
