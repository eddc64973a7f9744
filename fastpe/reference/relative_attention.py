"""Relative multi-head attention (Shaw et al., 2018), written plainly.

Shapes: ``q [B, h, Lq, dh]``, ``k, v [B, h, Lk, dh]``; relative tables ``rel_k, rel_v`` of shape
``[Ht, 2k+1, dh]`` with ``Ht`` 1 (shared across heads) or ``h``. Masks in the canonical form of
:mod:`fastpe._masks`.

    r(i, j) = clamp(j - i, -k, k) + k
    s_ij    = (q_i . k_j + q_i . rel_k[r(i, j)]) * scale          (+ mask)
    P       = softmax_j(s)                     (rows with no allowed key -> 0)
    o_i     = sum_j P_ij (v_j + rel_v[r(i, j)])
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
    lq, lk, dh = q.shape[-2], k.shape[-2], q.shape[-1]
    max_distance = (rel_k.shape[-2] - 1) // 2
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    buckets = relative_buckets(lq, lk, max_distance, q.device)
    rk = rel_k[:, buckets]  # [Ht, Lq, Lk, dh]
    rv = rel_v[:, buckets]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) + torch.einsum("bhid,hijd->bhij", q, rk)
    probs = _probabilities(scores * scale, key_padding_mask, attn_bias, is_causal, dropout_p)
    out = torch.einsum("bhij,bhjd->bhid", probs, v) + torch.einsum("bhij,hijd->bhid", probs, rv)
    return (out, probs) if return_weights else out


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
