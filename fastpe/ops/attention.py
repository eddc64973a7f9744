"""Plain scaled-dot-product attention with fastpe's mask conventions and no NaN on empty rows.

``torch.nn.functional.scaled_dot_product_attention`` returns NaN for a query whose keys are all
masked (a fully padded sequence); here such rows give 0 with zero gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpe._masks import combined_bias, masked_softmax
from fastpe._validation import check_float, check_same_device
from fastpe.ops.relative_attention import normalize_masks


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
):
    """Attention without positional terms; arguments as :func:`fastpe.ops.relative_attention`.

    Returns ``out [B, h, Lq, dh_v]``, or ``(out, weights [B, h, Lq, Lk])`` with ``need_weights``.
    """
    check_float(query, "query", 4, "[B, h, Lq, dh]")
    check_float(key, "key", 4, "[B, h, Lk, dh]")
    check_float(value, "value", 4, "[B, h, Lk, dh_v]")
    check_same_device(query=query, key=key, value=value)
    b, h, lq, dh = query.shape
    lk = key.shape[2]
    if key.shape != (b, h, lk, dh) or value.shape[:3] != (b, h, lk):
        raise ValueError(
            f"key/value: expected [B={b}, h={h}, Lk, dh={dh}] and [B, h, Lk, dh_v], "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    kpm, bias = normalize_masks(key_padding_mask, attn_mask, b, h, lq, lk, query.dtype, query.device)
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    if need_weights:
        probs = masked_softmax((query @ key.transpose(-1, -2)) * scale, combined_bias(kpm, bias, is_causal, lq, lk, query.dtype, query.device))
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        return probs @ value, probs
    if kpm is None and bias is None:
        # At most a causal mask: every row keeps key 0, so SDPA's fast path cannot produce NaN.
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    full = combined_bias(kpm, bias, is_causal, lq, lk, query.dtype, query.device)
    fully_masked = torch.isneginf(full).all(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=full.masked_fill(fully_masked, 0.0), dropout_p=dropout_p, scale=scale
    )
    return out.masked_fill(fully_masked, 0.0)
