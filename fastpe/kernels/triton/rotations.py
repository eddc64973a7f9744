"""Rotary (pairwise rotation by learnable angles) and Rotatory (additive code) in Triton.

One kernel family, four modes (``theta = angles[pos(b, l), m]``, pair ``m`` = ``(a, b)``):

* ``ROTATE_FWD``: ``y_a = x_a cos - x_b sin``, ``y_b = x_a sin + x_b cos``;
* ``ROTATE_BWD``: ``dx_a = dy_a cos + dy_b sin``, ``dx_b = -dy_a sin + dy_b cos`` and
  ``g = dy_b y_a - dy_a y_b`` (the angle gradient of one element);
* ``ADD_FWD``: ``y[2j] = x[2j] + (-1)^j sin``, ``y[2j+1] = x[2j+1] + cos``;
* ``ADD_BWD``: ``g = (-1)^j dy[2j] cos - dy[2j+1] sin`` (``dx = dy`` needs no kernel).

A program owns one tile of ``[batches x positions x heads x pairs]`` and makes a single pass
over it: one load of every operand, no loop, so all of its batches are in flight at once and
the grid (batch blocks x position blocks) has enough programs to keep every SM streaming.
Every load and store runs along a head's contiguous columns (interleaved pairs as one ``[.., 2P]``
row, reshaped and split in registers; split halves as two ``[.., P]`` rows), so that a warp
touches whole lines: a ``[.., P, 2]`` pointer tile let Triton spread a warp's lanes over the
batch instead, with 32-bit accesses (sm_90a SASS of Rotatory at S2: 16 LDG.E and 16 STG.E per
thread, now 4 LDG.E.128 and 4 STG.E.128).
``cos``/``sin`` are computed once per (position, pair) and broadcast over the tile's batches
and heads when positions are shared by the batch. For 16-bit data they come from the SFU after a
range reduction (:func:`_cos_sin`), for float32 from libdevice. ``x`` may have any strides.

Angle gradients are reduced deterministically: the backward kernel sums ``g`` over heads and
its batch block into one float32 partial row per (batch block, position), or per token when
every sequence has its own positions; a second kernel sums the partials in a fixed order into
the angle rows: directly for default positions (one launch), or for explicit positions, which
may repeat, by one-hot matrix products over ranges of the partial rows, one range per program
along a third grid axis, followed by a launch of the same kernel that sums the ranges.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastpe.kernels.triton import _launch
from fastpe.kernels.triton._launch import Launch

ROTATE_FWD, ROTATE_BWD, ADD_FWD, ADD_BWD = 0, 1, 2, 3

# 2*pi as HI + LO for the range reduction of the fast cos/sin: HI has 8 significant bits, so
# k * HI is exact for |k| < 2**16 (angles up to about 4e5)
INV_TWO_PI = tl.constexpr(0.15915494309189535)
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(1.9353071795864769e-03)


@triton.jit
def _cos_sin(theta, FAST_TRIG: tl.constexpr):
    """cos and sin of float32 angles. ``FAST_TRIG`` (16-bit data): reduce to [-pi, pi] and use
    the SFU's ``cos.approx`` / ``sin.approx`` (absolute error under 1e-6 there, far below the
    data's bf16/fp16 rounding), a few instructions per angle; otherwise libdevice's 1-ulp
    ``cosf`` / ``sinf``, about 25 instructions per call on the fast path plus an inlined
    Payne-Hanek slow path for each call site (sm_90a SASS of Rotatory at S1: 2774 instructions,
    2560 of them in 32 such call sites)."""
    if FAST_TRIG:
        k = libdevice.rint(theta * INV_TWO_PI)
        r = (theta - k * TWO_PI_HI) - k * TWO_PI_LO
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    else:
        return tl.cos(theta), tl.sin(theta)


@triton.jit
def _pair_halves(BASE, tile, tile_mask, offs_p, sd, HALF: tl.constexpr, BLOCK_P: tl.constexpr,
                 INTERLEAVED: tl.constexpr):
    """The two halves ``(a, b)`` of every pair of a ``[B, L, H, P]`` tile, as float32. ``tile`` is
    the tile's offsets up to the head (``b * sb + l * sl + h * sh``). Every load runs along the
    head's contiguous columns, so a warp reads whole lines: interleaved pairs as one
    ``[.., 2P]`` row split in registers, split halves as two ``[.., P]`` rows."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_P)[None, None, None, :]
        x = tl.load(BASE + tile + cols * sd, mask=tile_mask & (cols < 2 * HALF), other=0.0).to(tl.float32)
        return tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2], BLOCK_P, 2)))
    else:
        p4 = offs_p[None, None, None, :]
        mask = tile_mask & (p4 < HALF)
        a = tl.load(BASE + tile + p4 * sd, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(BASE + tile + (p4 + HALF) * sd, mask=mask, other=0.0).to(tl.float32)
        return a, b


@triton.jit
def _store_pair_halves(BASE, tile, tile_mask, offs_p, sd, a, b, HALF: tl.constexpr, BLOCK_P: tl.constexpr,
                       INTERLEAVED: tl.constexpr):
    """The inverse of :func:`_pair_halves`: ``(a, b)`` back into the pairs' columns."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_P)[None, None, None, :]
        x = tl.reshape(tl.join(a, b), (a.shape[0], a.shape[1], a.shape[2], 2 * BLOCK_P))
        tl.store(BASE + tile + cols * sd, x.to(BASE.dtype.element_ty), mask=tile_mask & (cols < 2 * HALF))
    else:
        p4 = offs_p[None, None, None, :]
        mask = tile_mask & (p4 < HALF)
        tl.store(BASE + tile + p4 * sd, a.to(BASE.dtype.element_ty), mask=mask)
        tl.store(BASE + tile + (p4 + HALF) * sd, b.to(BASE.dtype.element_ty), mask=mask)


@triton.jit
def _rot_kernel(
    X, DY, Y, ANG, POS, PART,
    sxb, sxl, sxh, sxd,
    sdb, sdl, sdh, sdd,
    syb, syl, syh, syd,
    sar, sac, spb, spl,
    B, L, H,
    HALF: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr, INTERLEAVED: tl.constexpr, MODE: tl.constexpr, POS_KIND: tl.constexpr,
    FAST_TRIG: tl.constexpr,
):
    """POS_KIND 0: position ``l``; 1: ``POS[l * spl]`` (shared by the batch); 2: ``POS[b * spb + l * spl]``."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # axis 0: the large one (1 and 2 stop at 65535)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    bl_mask = (offs_b < B)[:, None] & (offs_l < L)[None, :]
    p_mask = offs_p < HALF
    # [B, L, H, P] tiles of the pairs' halves
    b4 = offs_b[:, None, None, None]
    l4 = offs_l[None, :, None, None]
    h4 = offs_h[None, None, :, None]
    tile_mask = bl_mask[:, :, None, None] & (offs_h < H)[None, None, :, None]

    if POS_KIND == 2:
        rows = tl.load(POS + offs_b[:, None] * spb + offs_l[None, :] * spl, mask=bl_mask, other=0)
        theta = tl.load(ANG + rows[:, :, None] * sar + offs_p[None, None, :] * sac,
                        mask=bl_mask[:, :, None] & p_mask[None, None, :], other=0.0).to(tl.float32)
        theta = theta[:, :, None, :]  # [B, L, 1, P]
    else:
        l_mask = offs_l < L
        if POS_KIND == 1:
            rows = tl.load(POS + offs_l * spl, mask=l_mask, other=0)
        else:
            rows = offs_l
        theta = tl.load(ANG + rows[:, None] * sar + offs_p[None, :] * sac,
                        mask=l_mask[:, None] & p_mask[None, :], other=0.0).to(tl.float32)
        theta = theta[None, :, None, :]  # [1, L, 1, P]: computed once, shared by batches and heads
    cos, sin = _cos_sin(theta, FAST_TRIG)

    if MODE != 3:
        xa, xb = _pair_halves(X, b4 * sxb + l4 * sxl + h4 * sxh, tile_mask, offs_p, sxd, HALF, BLOCK_P, INTERLEAVED)
    if MODE == 1 or MODE == 3:
        ga, gb = _pair_halves(DY, b4 * sdb + l4 * sdl + h4 * sdh, tile_mask, offs_p, sdd, HALF, BLOCK_P, INTERLEAVED)
    if MODE == 0:
        ya, yb = xa * cos - xb * sin, xa * sin + xb * cos
    elif MODE == 1:
        ya, yb = ga * cos + gb * sin, gb * cos - ga * sin
        g = gb * (xa * cos - xb * sin) - ga * (xa * sin + xb * cos)
    elif MODE == 2:
        sign = 1.0 - 2.0 * (offs_p % 2).to(tl.float32)  # (-1)^j
        ya, yb = xa + sign[None, None, None, :] * sin, xb + cos
    else:
        sign = 1.0 - 2.0 * (offs_p % 2).to(tl.float32)
        g = sign[None, None, None, :] * ga * cos - gb * sin
    if MODE != 3:
        _store_pair_halves(Y, b4 * syb + l4 * syl + h4 * syh, tile_mask, offs_p, syd, ya, yb, HALF, BLOCK_P,
                           INTERLEAVED)

    if MODE == 1 or MODE == 3:
        g = tl.sum(g, axis=2)  # over heads: [B, L, P]
        if POS_KIND == 2:  # one partial row per token
            part = PART + ((offs_b[:, None] * L + offs_l[None, :]) * HALF)[:, :, None] + offs_p[None, None, :]
            tl.store(part, g, mask=bl_mask[:, :, None] & p_mask[None, None, :])
        else:  # one partial row per (batch block, position)
            part = PART + ((tl.program_id(0) * L + offs_l) * HALF)[:, None] + offs_p[None, :]
            tl.store(part, tl.sum(g, axis=0), mask=(offs_l < L)[:, None] & p_mask[None, :])


@triton.jit
def _angle_grad_reduce_kernel(
    PART, POS, OUT, NCHUNK, L, P, KEYS_PER_SPLIT, spb, spl, soc, sor, sos,
    C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_POS: tl.constexpr,
):
    """``OUT[p, c] = sum over partial rows (chunk, l) whose position is p`` in a fixed order.

    ``PART [NCHUNK, L, C]`` float32. Without positions, row ``(chunk, l)`` belongs to ``p = l``
    (``BLOCK_R`` chunks are summed per step). With them, to ``POS[chunk * spb + l * spl]``:
    ``BLOCK_R`` rows at a time are gathered by a one-hot product, and the flattened rows are
    split into ranges of ``KEYS_PER_SPLIT`` (grid axis 2), each summed into its own
    ``OUT + split * sos``, so that many programs share the scan (the splits are then summed
    by a second launch of this kernel without positions).
    """
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    out = OUT
    if HAS_POS:
        split = tl.program_id(2)
        out += split.to(tl.int64) * sos
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        r_lo = split * KEYS_PER_SPLIT
        r_hi = tl.minimum(NCHUNK * L, r_lo + KEYS_PER_SPLIT)
        for r0 in range(r_lo, r_hi, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < r_hi
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
    tl.store(out + offs_p[:, None] * sor + offs_c[None, :] * soc, total.to(OUT.dtype.element_ty),
             mask=(offs_p < P)[:, None] & c_mask[None, :])


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name}: the triton backend supports float16, bfloat16 and float32, got {x.dtype}")
    _launch.check_int32_indexing("rotary/rotatory", x)


# Elements of one program's tile (pairs count twice): 32 fp32 values per thread at 4 warps
TILE_ELEMENTS = 4096


def _config(b, L, h, half, device):
    """Block sizes of the ``[batches x positions]`` tile: about ``TILE_ELEMENTS`` elements, as
    many batches as reach 16 (the angle-gradient partials shrink with them), halved until the
    grid has two full waves on the card."""
    sms = _launch.num_sms(device)
    per_token = 2 * _launch.next_pow2(h) * _launch.next_pow2(half)
    tokens = max(1, TILE_ELEMENTS // per_token)
    while True:
        block_b = min(_launch.next_pow2(b), 16, tokens)
        block_l = min(_launch.next_pow2(L), max(1, tokens // block_b))
        block_b = min(_launch.next_pow2(b), max(block_b, tokens // block_l))
        if tokens == 1 or triton.cdiv(b, block_b) * triton.cdiv(L, block_l) >= 2 * sms:
            break
        tokens //= 2
    return _launch.knobs("rotary", block_b=block_b, block_l=block_l, num_warps=4)


def _positions(positions):
    """(tensor, batch stride, position stride, POS_KIND) for the kernels."""
    if positions is None:
        return None, 0, 0, 0
    if positions.dim() == 1:
        return positions, 0, positions.stride(0), 1
    return positions, positions.stride(0), positions.stride(1), 2


def _plan(mode, x4, dy4, y4, angles, positions, interleaved, need_partials):
    """x4/dy4/y4: [B, L, H, D] views (any strides); returns (launches, partial, pos, spb, spl)."""
    ref = x4 if x4 is not None else dy4
    b, L, h, d = ref.shape
    half = d // 2
    pos, spb, spl, pos_kind = _positions(positions)
    cfg = _config(b, L, h, half, ref.device)
    block_b, block_l = cfg["block_b"], cfg["block_l"]
    chunks = triton.cdiv(b, block_b)
    partial = None
    if need_partials:  # per token with per-sequence positions, else per (batch block, position)
        partial = _launch.empty((b if pos_kind == 2 else chunks, L, half), torch.float32, ref.device)
    xs = x4.stride() if x4 is not None else (0, 0, 0, 0)
    ds = dy4.stride() if dy4 is not None else (0, 0, 0, 0)
    ys = y4.stride() if y4 is not None else (0, 0, 0, 0)
    args = dict(
        X=x4 if x4 is not None else ref, DY=dy4 if dy4 is not None else ref, Y=y4 if y4 is not None else ref,
        ANG=angles, POS=pos if pos is not None else angles, PART=partial if partial is not None else angles,
        sxb=xs[0], sxl=xs[1], sxh=xs[2], sxd=xs[3], sdb=ds[0], sdl=ds[1], sdh=ds[2], sdd=ds[3],
        syb=ys[0], syl=ys[1], syh=ys[2], syd=ys[3], sar=angles.stride(0), sac=angles.stride(1),
        spb=spb, spl=spl, B=b, L=L, H=h,
    )
    constexprs = dict(
        HALF=half, BLOCK_B=block_b, BLOCK_L=block_l, BLOCK_H=_launch.next_pow2(h), BLOCK_P=_launch.next_pow2(half),
        INTERLEAVED=bool(interleaved), MODE=mode, POS_KIND=pos_kind,
        # (the interpreter has no libdevice: it runs the accurate path)
        FAST_TRIG=ref.dtype in (torch.float16, torch.bfloat16) and _launch.approximate_math(ref.device),
    )
    launch = Launch(_rot_kernel, (chunks, triton.cdiv(L, block_l)), args, constexprs, num_warps=cfg["num_warps"])
    return [launch], partial, pos, spb, spl


def _plan_sum(partial, out):
    """``out[p] = sum over chunks of partial[chunk, p]`` (rows past the partial's get zeros)."""
    chunks, L, half = partial.shape
    rows = out.shape[0]
    # [chunks x rows x pairs] loads summed over chunks, at most 4096 values at a time
    block_c = min(64, _launch.next_pow2(half))
    block_p = 8
    block_r = max(1, min(_launch.next_pow2(chunks), 4096 // (block_p * block_c)))
    args = dict(PART=partial, POS=partial, OUT=out, NCHUNK=chunks, L=L, P=rows, KEYS_PER_SPLIT=0,
                spb=0, spl=0, soc=out.stride(1), sor=out.stride(0), sos=0)
    constexprs = dict(C=half, BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_C=block_c, HAS_POS=False)
    return Launch(_angle_grad_reduce_kernel, (triton.cdiv(rows, block_p), triton.cdiv(half, block_c)), args, constexprs)


def _plan_reduce(partial, pos, spb, spl, angles):
    """Launches summing the partial angle gradients into ``dangles`` shaped like ``angles``."""
    chunks, L, half = partial.shape
    rows = angles.shape[0]
    out = _launch.empty(angles.shape, angles.dtype, angles.device)
    if pos is None:
        return out, [_plan_sum(partial, out)]
    # explicit positions: one-hot products (every dot dimension at least 16) over ranges of the
    # partial rows, enough ranges for two programs per SM, then a sum over the ranges
    block_c = max(16, min(64, _launch.next_pow2(half)))
    block_p = 16
    keys = chunks * L
    tiles = triton.cdiv(rows, block_p) * triton.cdiv(half, block_c)
    cfg = _launch.knobs("rotary_reduce", block_r=64, key_splits=max(1, min(triton.cdiv(keys, 8 * 64),
                                                                         2 * _launch.num_sms(angles.device) // tiles)))
    block_r = cfg["block_r"]
    per_split = max(1, triton.cdiv(triton.cdiv(keys, cfg["key_splits"]), block_r)) * block_r
    splits = max(1, triton.cdiv(keys, per_split))  # one (empty) range still writes the zeros
    target = out if splits == 1 else _launch.empty((splits, rows, half), torch.float32, angles.device)
    args = dict(PART=partial, POS=pos, OUT=target, NCHUNK=chunks, L=L, P=rows, KEYS_PER_SPLIT=per_split,
                spb=spb, spl=spl, soc=target.stride(-1), sor=target.stride(-2), sos=target.stride(0) if splits > 1 else 0)
    constexprs = dict(C=half, BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_C=block_c, HAS_POS=True)
    launches = [Launch(_angle_grad_reduce_kernel, (triton.cdiv(rows, block_p), triton.cdiv(half, block_c), splits),
                       args, constexprs)]
    if splits > 1:
        launches.append(_plan_sum(target, out))
    return out, launches


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
        launches += reduce
    return dx, dangles, launches


def plan_rotatory_forward(x, angles, positions):
    _check(x, "x")
    y = _launch.empty_like(x)
    launches, *_ = _plan(ADD_FWD, x.unsqueeze(2), None, y.unsqueeze(2), angles, positions, True, need_partials=False)
    return y, launches


def plan_rotatory_backward(dy, angles, positions):
    launches, partial, pos, spb, spl = _plan(ADD_BWD, None, dy.unsqueeze(2), None, angles, positions, True, need_partials=True)
    dangles, reduce = _plan_reduce(partial, pos, spb, spl, angles)
    return dangles, launches + reduce
