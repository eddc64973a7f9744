"""Attention-mask conventions.

fastpe follows ``nn.MultiheadAttention``: a bool mask is True where attention is NOT allowed,
a float mask is added to the logits. The functional ops normalise whatever the user passed into
one canonical form that every backend receives:

* ``key_padding_mask``: bool ``[B, Lk]`` (True = padding) or None;
* ``attn_bias``: float ``[B or 1, h or 1, Lq, Lk]`` added to the logits (``-inf`` = masked) or None;
* ``is_causal``: bool, key ``j`` is masked for query ``i`` when ``j > i`` (top-left aligned, as SDPA).

A query row whose keys are all masked (a fully padded sequence) gets output 0 and zero
gradients, never NaN.
"""

from __future__ import annotations

import torch


def relative_buckets(lq: int, lk: int, max_distance: int, device: torch.device | None = None) -> torch.Tensor:
    """``r(i, j) = clamp(j - i, -k, k) + k`` as an int64 ``[Lq, Lk]`` tensor."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return (j - i).clamp(-max_distance, max_distance) + max_distance


def causal_mask(lq: int, lk: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool ``[Lq, Lk]``, True where ``j > i`` (not allowed)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).triu(1)


def combined_bias(
    key_padding_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    is_causal: bool,
    lq: int,
    lk: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """All masks as one additive float tensor broadcastable to ``[B, h, Lq, Lk]``, or None."""
    bias = None if attn_bias is None else attn_bias.to(dtype)
    if key_padding_mask is not None:
        kpm = torch.zeros(key_padding_mask.shape, dtype=dtype, device=device)
        kpm = kpm.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        bias = kpm if bias is None else bias + kpm
    if is_causal:
        causal = torch.zeros(lq, lk, dtype=dtype, device=device).masked_fill(causal_mask(lq, lk, device), float("-inf"))
        bias = causal if bias is None else bias + causal
    return bias


def masked_softmax(scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(scores + bias) over the last dim, with rows that are entirely ``-inf`` set to 0.

    Such rows are unmasked before the softmax (so no NaN is produced in the forward or the
    backward pass) and multiplied by 0 after it, which also zeroes their gradients.
    """
    if bias is None:
        return torch.softmax(scores, dim=-1)
    fully_masked = torch.isneginf(bias).all(dim=-1, keepdim=True)
    safe_bias = bias.masked_fill(fully_masked, 0.0)
    probs = torch.softmax(scores + safe_bias, dim=-1)
    return probs.masked_fill(fully_masked, 0.0)
