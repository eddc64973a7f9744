"""Rotary (pairwise rotation by learnable angles) and Rotatory (additive code) in Triton.

One kernel family, four modes (``theta = angles[pos(b, l), m]``, pair ``m`` = ``(a, b)``):

* ``ROTATE_FWD``: ``y_a = x_a cos - x_b sin``, ``y_b = x_a sin + x_b cos``;
* ``ROTATE_BWD``: ``dx_a = dy_a cos + dy_b sin``, ``dx_b = -dy_a sin + dy_b cos`` and
  ``g = dy_b y_a - dy_a y_b`` (the angle gradient of one element);
* ``ADD_FWD``: ``y[2j] = x[2j] + (-1)^j sin``, ``y[2j+1] = x[2j+1] + cos``;
* ``ADD_BWD``: ``g = (-1)^j dy[2j] cos - dy[2j+1] sin`` (``dx = dy`` needs no kernel).

A program owns a block of positions and a chunk of the batch and holds all heads and pairs of
them; ``cos``/``sin`` are computed once per (position, pair) and reused across heads (and across
the batch chunk when positions are shared by the batch). ``x`` may have any strides.

Angle gradients are reduced deterministically in two steps: the backward kernel sums ``g``
over heads and its batch chunk into one partial row per (chunk, position); a second kernel sums
the partials in a fixed order into the angle rows (directly for default positions, or through a
one-hot matrix product when explicit positions may repeat).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpe.kernels.triton import _launch
from fastpe.kernels.triton._launch import Launch

ROTATE_FWD, ROTATE_BWD, ADD_FWD, ADD_BWD = 0, 1, 2, 3


@triton.jit
def _rot_kernel(
    X, DY, Y, ANG, POS, PART,
    sxb, sxl, sxh, sxd,
    sdb, sdl, sdh, sdd,
    syb, syl, syh, syd,
    sar, sac, spb, spl,
    B, L, H, B_PER_PROG,
    HALF: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, MODE: tl.constexpr, HAS_POS: tl.constexpr, POS_PER_BATCH: tl.constexpr,
):
    chunk = tl.program_id(0)  # the large grid axis (axes 1 and 2 stop at 65535)
    pid_l = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    l_mask = offs_l < L
    lp_mask = l_mask[:, None] & (offs_p < HALF)[None, :]
    mask3 = lp_mask[:, None, :] & (offs_h < H)[None, :, None]
    if INTERLEAVED:
        col_a = 2 * offs_p
        col_b = 2 * offs_p + 1
    else:
        col_a = offs_p
        col_b = offs_p + HALF
    # (-1)^j for the additive code
    sign = 1.0 - 2.0 * (offs_p % 2).to(tl.float32)

    b0 = chunk * B_PER_PROG
    rows = offs_l
    if HAS_POS:
        rows = tl.load(POS + b0 * spb + offs_l * spl, mask=l_mask, other=0)
    theta = tl.load(ANG + rows[:, None] * sar + offs_p[None, :] * sac, mask=lp_mask, other=0.0).to(tl.float32)
    cos = tl.cos(theta)[:, None, :]
    sin = tl.sin(theta)[:, None, :]
    gacc = tl.zeros([BLOCK_L, BLOCK_P], tl.float32)

    for b in range(b0, tl.minimum(B, b0 + B_PER_PROG)):
        if POS_PER_BATCH:
            rows = tl.load(POS + b * spb + offs_l * spl, mask=l_mask, other=0)
            theta = tl.load(ANG + rows[:, None] * sar + offs_p[None, :] * sac, mask=lp_mask, other=0.0).to(tl.float32)
            cos = tl.cos(theta)[:, None, :]
            sin = tl.sin(theta)[:, None, :]
        base3 = b * sxb + offs_l[:, None, None] * sxl + offs_h[None, :, None] * sxh
        out3 = b * syb + offs_l[:, None, None] * syl + offs_h[None, :, None] * syh
        dy3 = b * sdb + offs_l[:, None, None] * sdl + offs_h[None, :, None] * sdh
        if MODE == 0:
            xa = tl.load(X + base3 + col_a[None, None, :] * sxd, mask=mask3, other=0.0).to(tl.float32)
            xb = tl.load(X + base3 + col_b[None, None, :] * sxd, mask=mask3, other=0.0).to(tl.float32)
            tl.store(Y + out3 + col_a[None, None, :] * syd, (xa * cos - xb * sin).to(Y.dtype.element_ty), mask=mask3)
            tl.store(Y + out3 + col_b[None, None, :] * syd, (xa * sin + xb * cos).to(Y.dtype.element_ty), mask=mask3)
        elif MODE == 1:
            xa = tl.load(X + base3 + col_a[None, None, :] * sxd, mask=mask3, other=0.0).to(tl.float32)
            xb = tl.load(X + base3 + col_b[None, None, :] * sxd, mask=mask3, other=0.0).to(tl.float32)
            ga = tl.load(DY + dy3 + col_a[None, None, :] * sdd, mask=mask3, other=0.0).to(tl.float32)
            gb = tl.load(DY + dy3 + col_b[None, None, :] * sdd, mask=mask3, other=0.0).to(tl.float32)
            tl.store(Y + out3 + col_a[None, None, :] * syd, (ga * cos + gb * sin).to(Y.dtype.element_ty), mask=mask3)
            tl.store(Y + out3 + col_b[None, None, :] * syd, (gb * cos - ga * sin).to(Y.dtype.element_ty), mask=mask3)
            g = gb * (xa * cos - xb * sin) - ga * (xa * sin + xb * cos)
            gacc += tl.sum(g, axis=1)
        elif MODE == 2:
            xa = tl.load(X + base3 + col_a[None, None, :] * sxd, mask=mask3, other=0.0).to(tl.float32)
            xb = tl.load(X + base3 + col_b[None, None, :] * sxd, mask=mask3, other=0.0).to(tl.float32)
            tl.store(Y + out3 + col_a[None, None, :] * syd, (xa + sign[None, None, :] * sin).to(Y.dtype.element_ty), mask=mask3)
            tl.store(Y + out3 + col_b[None, None, :] * syd, (xb + cos).to(Y.dtype.element_ty), mask=mask3)
        else:
            ga = tl.load(DY + dy3 + col_a[None, None, :] * sdd, mask=mask3, other=0.0).to(tl.float32)
            gb = tl.load(DY + dy3 + col_b[None, None, :] * sdd, mask=mask3, other=0.0).to(tl.float32)
            g = sign[None, None, :] * ga * cos - gb * sin
            gacc += tl.sum(g, axis=1)

    if MODE == 1 or MODE == 3:
        part = PART + (chunk * L + offs_l[:, None]) * HALF + offs_p[None, :]
        tl.store(part, gacc, mask=lp_mask)


@triton.jit
def _angle_grad_reduce_kernel(
    PART, POS, OUT, NCHUNK, L, P, spb, spl, soc, sor,
    C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_POS: tl.constexpr,
):
    """``OUT[p, c] = sum over partial rows (chunk, l) whose position is p`` in a fixed order.

    ``PART [NCHUNK, L, C]`` float32. Without positions, row ``(chunk, l)`` belongs to ``p = l``
    (``BLOCK_R`` chunks are summed per step); with them, to ``POS[chunk * spb + l * spl]`` and
    ``BLOCK_R`` rows at a time are gathered by a one-hot product.
    """
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    if HAS_POS:
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        n_rows = NCHUNK * L
        for r0 in range(0, n_rows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < n_rows
            idx = tl.load(POS + (offs_r // L) * spb + (offs_r % L) * spl, mask=r_mask, other=-1)
            onehot = (idx[None, :] == offs_p[:, None]).to(tl.float32)
            tile = tl.load(PART + offs_r[:, None] * C + offs_c[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            acc = tl.dot(onehot, tile, acc, input_precision="ieee")
        total = acc
    else:
        acc3 = tl.zeros([BLOCK_R, BLOCK_P, BLOCK_C], tl.float32)
        pc_mask = (offs_p < L)[:, None] & c_mask[None, :]
        for ch0 in range(0, NCHUNK, BLOCK_R):
            offs_ch = ch0 + tl.arange(0, BLOCK_R)
            ptrs = PART + (offs_ch[:, None, None] * L + offs_p[None, :, None]) * C + offs_c[None, None, :]
            acc3 += tl.load(ptrs, mask=(offs_ch < NCHUNK)[:, None, None] & pc_mask[None, :, :], other=0.0)
        total = tl.sum(acc3, axis=0)
    tl.store(OUT + offs_p[:, None] * sor + offs_c[None, :] * soc, total.to(OUT.dtype.element_ty),
             mask=(offs_p < P)[:, None] & c_mask[None, :])


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name}: the triton backend supports float16, bfloat16 and float32, got {x.dtype}")
    _launch.check_int32_indexing("rotary/rotatory", x)


def _config(b, L, h, half, device, per_batch_partials):
    """Tiles of (positions x heads x pairs); batch chunks of up to ~32 per grid column, positions
    split over enough programs to fill the card. Few chunks keep the angle-gradient partials
    (one row per chunk and position) small, so their reduction is one short pass."""
    sms = _launch.num_sms(device)
    block_h = _launch.next_pow2(h)
    block_p = _launch.next_pow2(half)
    chunks = b if per_batch_partials else min(b, 32)
    l_programs = max(1, triton.cdiv(2 * sms, chunks))
    block_l = max(1, min(_launch.next_pow2(triton.cdiv(L, l_programs)), max(1, 2048 // (block_h * block_p))))
    cfg = _launch.knobs("rotary", block_l=block_l, b_per_prog=triton.cdiv(b, chunks), num_warps=4)
    if per_batch_partials:
        cfg["b_per_prog"] = 1
    return cfg


def _positions(positions, b, L, device):
    """(tensor, batch stride, position stride, per_batch) for the kernels."""
    if positions is None:
        return None, 0, 0, False
    if positions.dim() == 1:
        return positions, 0, positions.stride(0), False
    return positions, positions.stride(0), positions.stride(1), True


def _plan(mode, x4, dy4, y4, angles, positions, interleaved, need_partials):
    """x4/dy4/y4: [B, L, H, D] views (any strides); returns (launches, partial or None, cfg)."""
    ref = x4 if x4 is not None else dy4
    b, L, h, d = ref.shape
    half = d // 2
    pos, spb, spl, per_batch = _positions(positions, b, L, ref.device)
    cfg = _config(b, L, h, half, ref.device, per_batch_partials=per_batch and need_partials)
    block_l, bpp = cfg["block_l"], cfg["b_per_prog"]
    if per_batch:
        bpp = 1 if need_partials else bpp
    chunks = triton.cdiv(b, bpp)
    partial = _launch.empty((chunks, L, half), torch.float32, ref.device) if need_partials else None
    dummy = ref
    xs = x4.stride() if x4 is not None else (0, 0, 0, 0)
    ds = dy4.stride() if dy4 is not None else (0, 0, 0, 0)
    ys = y4.stride() if y4 is not None else (0, 0, 0, 0)
    args = dict(
        X=x4 if x4 is not None else dummy, DY=dy4 if dy4 is not None else dummy, Y=y4 if y4 is not None else dummy,
        ANG=angles, POS=pos if pos is not None else angles, PART=partial if partial is not None else angles,
        sxb=xs[0], sxl=xs[1], sxh=xs[2], sxd=xs[3], sdb=ds[0], sdl=ds[1], sdh=ds[2], sdd=ds[3],
        syb=ys[0], syl=ys[1], syh=ys[2], syd=ys[3], sar=angles.stride(0), sac=angles.stride(1),
        spb=spb, spl=spl, B=b, L=L, H=h, B_PER_PROG=bpp,
    )
    constexprs = dict(
        HALF=half, BLOCK_L=block_l, BLOCK_H=_launch.next_pow2(h), BLOCK_P=_launch.next_pow2(half),
        INTERLEAVED=bool(interleaved), MODE=mode, HAS_POS=pos is not None, POS_PER_BATCH=per_batch,
    )
    return [Launch(_rot_kernel, (chunks, triton.cdiv(L, block_l)), args, constexprs, num_warps=cfg["num_warps"])], partial, pos, spb, spl


def _plan_reduce(partial, pos, spb, spl, angles):
    """Sum the partial angle gradients into ``dangles`` shaped like ``angles``."""
    chunks, L, half = partial.shape
    rows = angles.shape[0]
    out = _launch.empty(angles.shape, angles.dtype, angles.device)
    block_c = max(16, min(64, _launch.next_pow2(half)))
    if pos is not None:
        block_p, block_r = 16, 64
    else:
        block_p, block_r = 8, max(1, min(32, _launch.next_pow2(chunks)))
    args = dict(PART=partial, POS=pos if pos is not None else partial, OUT=out, NCHUNK=chunks, L=L, P=rows,
                spb=spb, spl=spl, soc=out.stride(1), sor=out.stride(0))
    constexprs = dict(C=half, BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_C=block_c, HAS_POS=pos is not None)
    return out, Launch(_angle_grad_reduce_kernel, (triton.cdiv(rows, block_p), triton.cdiv(half, block_c)), args, constexprs)


def plan_rotary_forward(x, angles, positions, interleaved):
    _check(x, "x")
    y = _launch.empty_like(x)
    launches, *_ = _plan(ROTATE_FWD, x, None, y, angles, positions, interleaved, need_partials=False)
    return y, launches


def plan_rotary_backward(dy, x, angles, positions, interleaved, need_dangles=True):
    dx = _launch.empty_like(x)
    launches, partial, pos, spb, spl = _plan(ROTATE_BWD, x, dy, dx, angles, positions, interleaved, need_partials=True)
    dangles = None
    if need_dangles:
        dangles, reduce = _plan_reduce(partial, pos, spb, spl, angles)
        launches.append(reduce)
    return dx, dangles, launches


def plan_rotatory_forward(x, angles, positions):
    _check(x, "x")
    y = _launch.empty_like(x)
    launches, *_ = _plan(ADD_FWD, x.unsqueeze(2), None, y.unsqueeze(2), angles, positions, True, need_partials=False)
    return y, launches


def plan_rotatory_backward(dy, angles, positions):
    launches, partial, pos, spb, spl = _plan(ADD_BWD, None, dy.unsqueeze(2), None, angles, positions, True, need_partials=True)
    dangles, reduce = _plan_reduce(partial, pos, spb, spl, angles)
    return dangles, launches + [reduce]
