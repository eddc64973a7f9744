"""What each benchmark compares: fastpe's backends and the baselines a user would otherwise pick.

Every factory returns ``fn(*inputs) -> Tensor`` for one implementation, or raises
``Unavailable`` with the reason it cannot run here (the benchmark then skips saying so).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fastpe.backends import BackendUnavailableError, resolve_backend
from fastpe.ops import concat_projection, relative_attention, rotary, rotatory, time_interval_attention
from fastpe.ops.concat_projection import concat_projection_torch
from fastpe.ops.rotary import rotary_torch
from fastpe.reference import (
    concat_projection_reference,
    relative_attention_direct_port,
    time_interval_attention_materialized,
    time_interval_buckets_reference,
)


class Unavailable(Exception):
    """This implementation cannot run in this environment (the message says why)."""


FUSED = ("triton", "cuda")


def check_fused(backend: str, op: str, device: torch.device) -> None:
    try:
        resolve_backend(backend, op, device)
    except BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from exc


@functools.lru_cache(maxsize=None)
def compiled(fn):
    # One compiled wrapper per function; shapes are static within a benchmark.
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------- relative attention (RMHA-4)
# inputs: q, k, v [B, h, L, dh]; rel_k, rel_v [2k+1, dh]; key_padding_mask [B, L] bool (True = pad)

RMHA_IMPLS = ("direct_port", "torch", "torch_compiled", "flex_keys_only", "sdpa_no_pos", "sdpa_no_pos_masked", *FUSED)


def _rmha_torch(q, k, v, rk, rv, kpm):
    return relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend="torch")


def _flex_relative_keys(q, k, v, rk, kpm):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, length, dh = q.shape
    kmax = (rk.shape[0] - 1) // 2
    q_rel = (q @ rk.t()) / math.sqrt(dh)  # [B, h, L, 2k+1]: the relative-key term per bucket

    def score_mod(score, bi, hi, qi, ki):
        return score + q_rel[bi, hi, qi, (ki - qi).clamp(-kmax, kmax) + kmax]

    def mask_mod(bi, hi, qi, ki):
        return ~kpm[bi, ki]

    block_mask = create_block_mask(mask_mod, b, None, length, length, device=q.device)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


def rmha_impl(name: str, device: torch.device):
    if name == "direct_port":
        return lambda q, k, v, rk, rv, kpm: relative_attention_direct_port(q, k, v, rk[None], rv[None], kpm)
    if name == "torch":
        return _rmha_torch
    if name == "torch_compiled":
        if device.type != "cuda":
            raise Unavailable("compiled baselines are measured on the GPU only")
        return compiled(_rmha_torch)
    if name == "flex_keys_only":
        if device.type != "cuda":
            raise Unavailable("FlexAttention is measured on the GPU only")
        # FlexAttention cannot express the relative-VALUE term (it is not a score modification):
        # this baseline computes relative keys only, so it does less work than RMHA-4.
        flex = compiled(_flex_relative_keys)
        return lambda q, k, v, rk, rv, kpm: flex(q, k, v, rk, kpm)
    if name == "sdpa_no_pos":
        return lambda q, k, v, rk, rv, kpm: F.scaled_dot_product_attention(q, k, v)
    if name == "sdpa_no_pos_masked":
        # the fair floor: sequences in this field carry padding, and a mask moves SDPA off its fastest path
        return lambda q, k, v, rk, rv, kpm: F.scaled_dot_product_attention(q, k, v, attn_mask=~kpm[:, None, None, :])
    if name in FUSED:
        check_fused(name, "relative_attention", device)
        return lambda q, k, v, rk, rv, kpm: relative_attention(q, k, v, rk, rv, key_padding_mask=kpm, backend=name)
    raise ValueError(name)


def rmha_inputs(b, h, length, dh, dtype, device, seed, kmax=4):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    lengths = torch.randint(max(1, length // 4), length + 1, (b,), generator=gen)
    kpm = (torch.arange(length)[None, :] < (length - lengths)[:, None]).to(device)  # left padding
    return (t(b, h, length, dh), t(b, h, length, dh), t(b, h, length, dh), t(2 * kmax + 1, dh), t(2 * kmax + 1, dh), kpm)


# ---------------------------------------------------------------- time-interval attention (TiSASRec)
# inputs: q, k, v [B, h, L, dh]; rel_k, rel_v [K+1, dh]; timestamps [B, L]; key_padding_mask [B, L] bool

# (no torch.compile baseline: its compilation alone would take this file's share of the GPU run)
TISAS_IMPLS = ("materialized", "torch", "sdpa_no_pos", "sdpa_no_pos_masked", *FUSED)


def _tisas_torch(q, k, v, rk, rv, t, kpm):
    return time_interval_attention(q, k, v, rk, rv, t, key_padding_mask=kpm, is_causal=True, backend="torch")


def tisas_impl(name: str, device: torch.device):
    if name == "materialized":
        # TiSASRec's public implementations: [B, L, L, dh] interval keys and values from the interval
        # matrix, which their data sampler computes ahead (so it is computed outside the timed call here)
        def materialized(q, k, v, rk, rv, t, kpm, _buckets={}):
            key = (t.data_ptr(), kpm.data_ptr())
            if key not in _buckets:
                _buckets.clear()
                _buckets[key] = time_interval_buckets_reference(t, None, kpm, rk.shape[0] - 1)
            return time_interval_attention_materialized(q, k, v, rk[None], rv[None], _buckets[key], kpm, True)
        return materialized
    if name == "torch":
        return _tisas_torch
    if name == "sdpa_no_pos":
        return lambda q, k, v, rk, rv, t, kpm: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "sdpa_no_pos_masked":
        # the floor: no positions or intervals, the same padding and causal mask
        def sdpa_masked(q, k, v, rk, rv, t, kpm):
            length = q.shape[-2]
            allowed = ~kpm[:, None, None, :] & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return sdpa_masked
    if name in FUSED:
        check_fused(name, "time_interval_attention", device)
        return lambda q, k, v, rk, rv, t, kpm: time_interval_attention(q, k, v, rk, rv, t, key_padding_mask=kpm,
                                                                       is_causal=True, backend=name)
    raise ValueError(name)


def tisas_inputs(b, h, length, dh, dtype, device, seed, span=256):
    """Left-padded sequences with Unix-second timestamps (gaps from minutes to months, some equal)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    lengths = torch.randint(max(1, length // 4), length + 1, (b,), generator=gen)
    kpm = (torch.arange(length)[None, :] < (length - lengths)[:, None]).to(device)
    gaps = (torch.rand(b, length, generator=gen, dtype=torch.float64) * 12).exp().mul(60)
    gaps = gaps.masked_fill(torch.rand(b, length, generator=gen) < 0.2, 0.0)
    times = (1_600_000_000 + gaps.cumsum(dim=1)).round().long().to(device)
    return (t(b, h, length, dh), t(b, h, length, dh), t(b, h, length, dh), t(span + 1, dh), t(span + 1, dh), times, kpm)


# ---------------------------------------------------------------- rotary / Rotatory
# rotary inputs: x [B, L, h, dh], angles [L, dh/2] (learnable); rotatory: x [B, L, d], angles [L, d/2]

ROTARY_IMPLS = ("torch", "torch_compiled", "clone", *FUSED)


def rotary_impl(name: str, device: torch.device, op: str = "rotary"):
    if op == "rotary":
        eager = lambda x, a: rotary(x, a, backend="torch")  # noqa: E731
    else:
        mode = op.split("-")[1]
        eager = lambda x, a: rotatory(x, a, mode=mode, backend="torch")  # noqa: E731
    if name == "torch":
        return eager
    if name == "torch_compiled":
        if device.type != "cuda":
            raise Unavailable("compiled baselines are measured on the GPU only")
        return compiled(rotary_torch) if op == "rotary" else compiled(eager)
    if name == "clone":
        return lambda x, a: x.clone()  # the bandwidth floor: read x once, write y once
    if name in FUSED:
        check_fused(name, "rotary" if op in ("rotary", "rotatory-rotate") else "rotatory_add", device)
        if op == "rotary":
            return lambda x, a: rotary(x, a, backend=name)
        mode = op.split("-")[1]
        return lambda x, a: rotatory(x, a, mode=mode, backend=name)
    raise ValueError(name)


def rotary_inputs(shape, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    angles = torch.randn(shape[1], shape[-1] // 2, generator=gen).to(device).requires_grad_()
    return x, angles


# ---------------------------------------------------------------- concat-projection
# inputs: x [B, L, d], table [L, d], weight [d, 2d], bias [d]

CONCAT_IMPLS = ("reference", "torch", "torch_compiled", "linear", *FUSED)


def concat_impl(name: str, device: torch.device):
    if name == "reference":
        return lambda x, t, w, b: concat_projection_reference(x, t, w, b)
    if name == "torch":
        return lambda x, t, w, b: concat_projection(x, t, w, b, backend="torch")
    if name == "torch_compiled":
        if device.type != "cuda":
            raise Unavailable("compiled baselines are measured on the GPU only")
        return compiled(concat_projection_torch)
    if name == "linear":
        # the floor: a plain Linear with the same output size (no position term)
        return lambda x, t, w, b: F.linear(x, w[:, : x.shape[-1]], b)
    if name in FUSED:
        check_fused(name, "concat_projection", device)
        return lambda x, t, w, b: concat_projection(x, t, w, b, backend=name)
    raise ValueError(name)


def concat_inputs(b, length, d, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    return t(b, length, d), t(length, d), t(d, 2 * d, scale=1 / math.sqrt(2 * d)), t(d)
