"""Relative multi-head attention (Shaw et al., 2018) and time-interval attention (TiSASRec), written plainly.

Shapes: ``q [B, h, Lq, dh]``, ``k, v [B, h, Lk, dh]``; relative tables ``rel_k, rel_v`` of shape
``[Ht, 2k+1, dh]`` with ``Ht`` 1 (shared across heads) or ``h``. Masks in the canonical form of
:mod:`fastpe._masks`.

    r(i, j) = clamp(j - i, -k, k) + k
    s_ij    = (q_i . k_j + q_i . rel_k[r(i, j)]) * scale          (+ mask)
    P       = softmax_j(s)                     (rows with no allowed key -> 0)
    o_i     = sum_j P_ij (v_j + rel_v[r(i, j)])

Time-interval attention is the same family with another bucket function, ``r(i, j) =
min(|tau_i - tau_j|, K)`` from the timestamps (:func:`time_interval_buckets_reference`) and tables
of ``K + 1`` rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpe._masks import combined_bias, masked_softmax, relative_buckets


def _probabilities(scores, key_padding_mask, attn_bias, is_causal, dropout_p):
    lq, lk = scores.shape[-2:]
    bias = combined_bias(key_padding_mask, attn_bias, is_causal, lq, lk, scores.dtype, scores.device)
    probs = masked_softmax(scores, bias)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs


def bucketed_attention_reference(q, k, v, rel_k, rel_v, buckets, key_padding_mask=None, attn_bias=None,
                                 is_causal=False, dropout_p=0.0, scale=None, return_weights=False):
    """The relative-attention family with any bucket function: ``buckets`` ``[Lq, Lk]`` (shared by
    the batch) or ``[B, Lq, Lk]`` (one per sequence) indexes rows of ``rel_k, rel_v [Ht, R, dh]``.
    Gathers the tables per (i, j) pair and uses einsum."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rk = rel_k[:, buckets]  # [Ht, Lq, Lk, dh] or [Ht, B, Lq, Lk, dh]
    rv = rel_v[:, buckets]
    pairs = "hijd" if buckets.dim() == 2 else "hbijd"
    scores = torch.einsum("bhid,bhjd->bhij", q, k) + torch.einsum(f"bhid,{pairs}->bhij", q, rk)
    probs = _probabilities(scores * scale, key_padding_mask, attn_bias, is_causal, dropout_p)
    out = torch.einsum("bhij,bhjd->bhid", probs, v) + torch.einsum(f"bhij,{pairs}->bhid", probs, rv)
    return (out, probs) if return_weights else out


def relative_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
):
    """The oracle: gathers the tables per (i, j) pair into ``[Ht, Lq, Lk, dh]`` and uses einsum."""
    lq, lk = q.shape[-2], k.shape[-2]
    buckets = relative_buckets(lq, lk, (rel_k.shape[-2] - 1) // 2, q.device)
    return bucketed_attention_reference(q, k, v, rel_k, rel_v, buckets, key_padding_mask, attn_bias, is_causal,
                                        dropout_p, scale, return_weights)


def time_interval_buckets_reference(timestamps: torch.Tensor, time_unit: torch.Tensor | None,
                                    key_padding_mask: torch.Tensor | None, time_span: int) -> torch.Tensor:
    """TiSASRec's clipped interval ``r_ij = min(|tau_i - tau_j|, K)`` as int64 ``[B, L, L]``, from the
    definition, pair by pair.

    ``tau_i = round((t_i - t_first) / u)``: ``t_first`` is the user's first (smallest) timestamp and
    ``u`` the user's unit, by default (``time_unit=None``) the smallest nonzero interval between two
    of the user's timestamps, 1 when all are equal. Padding positions (``key_padding_mask`` True)
    are not read: they count as ``t_first``.
    """
    t = timestamps.double()
    valid = torch.ones_like(t, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    pair_valid = valid[:, :, None] & valid[:, None, :]
    gaps = (t[:, :, None] - t[:, None, :]).abs()
    if time_unit is None:
        positive = pair_valid & (gaps > 0)
        smallest = gaps.masked_fill(~positive, float("inf")).flatten(1).amin(dim=1)
        unit = torch.where(positive.flatten(1).any(dim=1), smallest, torch.ones_like(smallest))
    else:
        unit = time_unit.double()
    first = t.masked_fill(~valid, float("inf")).amin(dim=1)
    first = torch.where(valid.any(dim=1), first, torch.zeros_like(first))
    t = torch.where(valid, t, first[:, None])
    tau = torch.round((t - first[:, None]) / unit[:, None])
    return (tau[:, :, None] - tau[:, None, :]).abs().clamp(max=time_span).long()


def time_interval_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    timestamps: torch.Tensor,
    time_unit: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
):
    """TiSASRec's time-interval attention (Li, Wang, McAuley, WSDM 2020) from its formula:
    ``s_ij = q_i . (k_j + rel_k[r_ij]) * scale``, ``o_i = sum_j P_ij (v_j + rel_v[r_ij])`` with
    ``r_ij`` from :func:`time_interval_buckets_reference` and ``K = rows - 1``. Materialises the
    ``[Ht, B, L, L, dh]`` interval keys and values. (The absolute-position tables are already
    added to ``k`` and ``v``.)"""
    buckets = time_interval_buckets_reference(timestamps, time_unit, key_padding_mask, rel_k.shape[-2] - 1)
    return bucketed_attention_reference(q, k, v, rel_k, rel_v, buckets, key_padding_mask, attn_bias, is_causal,
                                        dropout_p, scale, return_weights)


def time_interval_attention_materialized(q, k, v, rel_k, rel_v, buckets, key_padding_mask=None, is_causal=False,
                                         scale=None):
    """What TiSASRec's public implementations do: embed the ``[B, L, L]`` interval matrix into
    ``[B, L, L, d]`` key and value tensors (per head ``[B, h, L, L, dh]``) and reduce elementwise
    products. The baseline the benchmarks measure against."""
    b, h, lq, dh = q.shape
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    rk = rel_k[:, buckets].transpose(0, 1).expand(b, h, lq, k.shape[-2], dh)  # [B, h, L, L, dh]
    rv = rel_v[:, buckets].transpose(0, 1).expand(b, h, lq, k.shape[-2], v.shape[-1])
    scores = q @ k.transpose(-1, -2) + (rk @ q.unsqueeze(-1)).squeeze(-1)
    probs = _probabilities(scores * scale, key_padding_mask, None, is_causal, 0.0)
    return probs @ v + (probs.unsqueeze(-2) @ rv).squeeze(-2)


def relative_attention_direct_port(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
):
    """What a line-by-line port of relative attention does: broadcast the relative tables to
    ``[B, h, Lq, Lk, dh]`` and reduce elementwise products. Correct, but memory-bound and
    ``O(B h L^2 dh)`` in memory; kept as the baseline the benchmarks measure against."""
    b, h, lq, dh = q.shape
    lk = k.shape[-2]
    max_distance = (rel_k.shape[-2] - 1) // 2
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    buckets = relative_buckets(lq, lk, max_distance, q.device)
    rk = rel_k[:, buckets].unsqueeze(0).expand(b, h, lq, lk, dh).contiguous()
    rv = rel_v[:, buckets].unsqueeze(0).expand(b, h, lq, lk, dh).contiguous()
    scores = q @ k.transpose(-1, -2) + (q.unsqueeze(3) * rk).sum(-1)
    probs = _probabilities(scores * scale, key_padding_mask, attn_bias, is_causal, dropout_p)
    return probs @ v + (probs.unsqueeze(-1) * rv).sum(-2)
