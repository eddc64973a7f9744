"""Relative multi-head attention (RMHA-k): functional API, input checks, the ``torch`` backend.

See :mod:`fastpe.reference.relative_attention` for the math and shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpe._masks import combined_bias, masked_softmax, relative_buckets
from fastpe._validation import check_float, check_same_device
from fastpe.ops._dispatch import implementation
from fastpe.reference.relative_attention import relative_attention_reference


def relative_attention_torch(
    q, k, v, rel_k, rel_v, key_padding_mask=None, attn_bias=None, is_causal=False, dropout_p=0.0, scale=None,
    return_weights=False,
):
    """Never builds ``[B, h, Lq, Lk, dh]``: the key term is ``2k+1`` dot products per query
    gathered into the logits, the value term ``2k+1`` bucket sums of the probabilities."""
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    n_buckets = rel_k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    buckets = relative_buckets(lq, lk, (n_buckets - 1) // 2, q.device).expand(b, h, lq, lk)
    q_rel = q @ rel_k.transpose(-1, -2)  # [B, h, Lq, 2k+1]
    scores = (q @ k.transpose(-1, -2) + q_rel.gather(-1, buckets)) * scale
    bias = combined_bias(key_padding_mask, attn_bias, is_causal, lq, lk, scores.dtype, scores.device)
    probs = masked_softmax(scores, bias)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    bucket_probs = torch.zeros(b, h, lq, n_buckets, dtype=probs.dtype, device=probs.device).scatter_add(-1, buckets, probs)
    out = probs @ v + bucket_probs @ rel_v
    return (out, probs) if return_weights else out


def _as_head_tables(table: torch.Tensor, name: str, heads: int, head_dim: int) -> torch.Tensor:
    check_float(table, name, (2, 3), "([2k+1, dh] shared or [h, 2k+1, dh] per head)")
    if table.dim() == 2:
        table = table.unsqueeze(0)
    if table.shape[0] not in (1, heads):
        raise ValueError(f"{name}: expected 1 or h={heads} tables, got shape {tuple(table.shape)}")
    if table.shape[-2] % 2 != 1:
        raise ValueError(f"{name}: expected 2k+1 rows (an odd number), got shape {tuple(table.shape)}")
    if table.shape[-1] != head_dim:
        raise ValueError(f"{name}: expected head size {head_dim} in the last dim, got shape {tuple(table.shape)}")
    return table


def normalize_masks(key_padding_mask, attn_mask, batch, heads, lq, lk, dtype, device):
    """User masks (nn.MultiheadAttention conventions) -> canonical ``(bool [B, Lk], float bias)``."""
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
        if mask is not None and mask.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} like the query, got one on {mask.device}")
    bias = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, lk):
            raise ValueError(
                f"key_padding_mask: expected shape [B={batch}, L={lk}], got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype != torch.bool:
            if not key_padding_mask.is_floating_point():
                raise TypeError(
                    "key_padding_mask: expected bool (True = padding) or an additive float mask, "
                    f"got dtype {key_padding_mask.dtype}"
                )
            bias = key_padding_mask.to(dtype)[:, None, None, :]
            key_padding_mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"attn_mask: expected bool (True = not allowed) or an additive float mask, got dtype {attn_mask.dtype}"
            )
        shape = tuple(attn_mask.shape)
        if attn_mask.dim() == 2 and shape == (lq, lk):
            mask = attn_mask[None, None]
        elif attn_mask.dim() == 3 and shape == (batch * heads, lq, lk):
            mask = attn_mask.view(batch, heads, lq, lk)
        elif attn_mask.dim() == 4 and shape[2:] == (lq, lk) and shape[0] in (1, batch) and shape[1] in (1, heads):
            mask = attn_mask
        else:
            raise ValueError(
                f"attn_mask: expected shape [L={lq}, S={lk}], [B*h={batch * heads}, {lq}, {lk}] or "
                f"[B or 1, h or 1, {lq}, {lk}], got {shape}"
            )
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        mask = mask.to(dtype)
        bias = mask if bias is None else bias + mask
    return key_padding_mask, bias


def relative_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    need_weights: bool = False,
):
    """Relative multi-head attention with clipped distance, relative keys and values.

    Args:
        query: ``[B, h, Lq, dh]``; key, value: ``[B, h, Lk, dh]`` (value may have another head size).
        rel_k, rel_v: relative tables ``[2k+1, dh]`` (shared by the heads) or ``[h, 2k+1, dh]``;
            the clipping distance ``k`` is read off their size.
        key_padding_mask: ``[B, Lk]``, bool True = padding, or additive float.
        attn_mask: ``[Lq, Lk]``, ``[B*h, Lq, Lk]`` or ``[B|1, h|1, Lq, Lk]``; bool True = not allowed,
            or additive float (as ``nn.MultiheadAttention``).
        is_causal: also mask keys after the query (``j > i``).
        dropout_p: attention dropout probability (pass 0 in evaluation).
        scale: logit scale, default ``1/sqrt(dh)``.
        backend: "auto", "reference", "torch", "triton" or "cuda".
        need_weights: also return the attention probabilities ``[B, h, Lq, Lk]``; only the
            reference and torch backends build them ("auto" picks torch).

    Returns ``[B, h, Lq, dh_v]`` (and the weights). Query rows with no allowed key give 0, never NaN.
    """
    check_float(query, "query", 4, "[B, h, Lq, dh]")
    check_float(key, "key", 4, "[B, h, Lk, dh]")
    check_float(value, "value", 4, "[B, h, Lk, dh_v]")
    check_same_device(query=query, key=key, value=value, rel_k=rel_k, rel_v=rel_v)
    b, h, lq, dh = query.shape
    lk = key.shape[2]
    if key.shape != (b, h, lk, dh):
        raise ValueError(f"key: expected shape [B={b}, h={h}, Lk, dh={dh}], got {tuple(key.shape)}")
    if value.shape[:3] != (b, h, lk):
        raise ValueError(f"value: expected shape [B={b}, h={h}, Lk={lk}, dh_v], got {tuple(value.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    rel_k = _as_head_tables(rel_k, "rel_k", h, dh).to(query.dtype)
    rel_v = _as_head_tables(rel_v, "rel_v", h, value.shape[-1]).to(query.dtype)
    if rel_k.shape[-2] != rel_v.shape[-2]:
        raise ValueError(f"rel_k and rel_v must have the same number of rows (2k+1), got {rel_k.shape[-2]} and {rel_v.shape[-2]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    kpm, bias = normalize_masks(key_padding_mask, attn_mask, b, h, lq, lk, query.dtype, query.device)
    args = (query, key, value, rel_k, rel_v, kpm, bias, bool(is_causal), float(dropout_p), scale)
    if need_weights:
        if backend not in ("auto", "torch", "reference"):
            raise ValueError(f"need_weights=True needs the 'torch' or 'reference' backend, got {backend!r}")
        fn = relative_attention_reference if backend == "reference" else relative_attention_torch
        return fn(*args, return_weights=True)
    fn = implementation("relative_attention", backend, query.device, relative_attention_reference,
                        relative_attention_torch, args)
    return fn(*args)
