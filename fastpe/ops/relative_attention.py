"""The relative-attention family: functional API, input checks, the ``torch`` backend.

One op body, two bucket functions: positions (RMHA-k, ``clamp(j - i, -k, k) + k``) and time
intervals (TiSASRec, ``min(|tau_i - tau_j|, K)``). Both share the masks, the checks, the
dispatch and :func:`bucketed_attention_torch`. See :mod:`fastpe.reference.relative_attention`
for the math and shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpe._masks import combined_bias, masked_softmax, relative_buckets
from fastpe._time_steps import personal_time_steps
from fastpe._validation import _is_tracing, check_float, check_same_device
from fastpe.ops._dispatch import implementation
from fastpe.reference.relative_attention import (
    bucketed_attention_reference,
    relative_attention_reference,
    time_interval_attention_reference,
)


def _times_table(x: torch.Tensor, table: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x [B, h, L, c]`` times a per-head table ``[Ht, R, c]`` (``transpose``: ``x @ table^T``, giving
    ``[B, h, L, R]``) or ``[Ht, R, c']`` (``x @ table``). One 2-D GEMM for a shared table: a matmul
    that broadcasts the table over the batch runs its backward as slow strided batched GEMMs."""
    b, h, length, _ = x.shape
    if table.shape[0] == 1:
        matrix = table[0].t() if transpose else table[0]
        return (x.reshape(b * h * length, -1) @ matrix).view(b, h, length, -1)
    return torch.einsum("bhlc,hrc->bhlr" if transpose else "bhlr,hrc->bhlc", x, table)


def _table_gradient(x: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """``sum over the batch (and the heads, for a shared table) of x^T @ y``: ``x [c, h, L, R]``,
    ``y [c, h, L, C]`` -> ``[Ht, R, C]``."""
    if heads == 1:
        return (x.reshape(-1, x.shape[-1]).t() @ y.reshape(-1, y.shape[-1])).unsqueeze(0)
    return torch.einsum("bhlr,bhlc->hrc", x, y)


# Rows of the batch handled at once: their [rows, h, Lq, max(R, Lk)] temporaries stay near a
# quarter of the probabilities the backward keeps (and at least this many elements, so that small
# problems are not cut into tiny pieces). Wide tables (TiSASRec: R = 257 > L) and the [B, L, L]
# bucket ids thus never exist for the whole batch at once.
_CHUNK_ELEMENTS = 1 << 16


def _row_chunks(batch: int, per_row: int, kept: int):
    if _is_tracing():  # one chunk: no loop whose length depends on a traced batch size
        yield slice(0, batch)
        return
    rows = max(1, max(kept // 4, _CHUNK_ELEMENTS) // max(per_row, 1))
    for start in range(0, batch, rows):
        yield slice(start, min(start + rows, batch))


def _bucket_ids(buckets: torch.Tensor, time_span: int, rows: slice, shape: tuple) -> torch.Tensor:
    """The int64 ids of batch ``rows``, expanded (a view) to ``shape = [c, h, Lq, Lk]``:
    ``buckets`` holds ids ``[Lq, Lk]`` / ``[B, Lq, Lk]``, or, with ``time_span >= 0``, the
    personal time steps ``tau [B, L]`` from which the ids are computed here."""
    if time_span >= 0:
        return time_interval_buckets(buckets[rows], time_span)[:, None].expand(shape)
    return (buckets if buckets.dim() == 2 else buckets[rows][:, None]).expand(shape)


def _rows_of(bias: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return bias if bias is None or bias.shape[0] == 1 else bias[rows]


class _BucketedAttention(torch.autograd.Function):
    """The relative-attention family's torch backend, batch chunk by batch chunk.

    Keeps for the backward pass only the probabilities ``[B, h, Lq, Lk]`` (and the dropout mask),
    not the bucket ids, the logits or any ``[B, h, Lq, R]`` table: the backward recomputes the ids
    per chunk (from ``tau [B, L]`` for time intervals) and reduces the table gradients over the
    chunks in a fixed order (deterministic)."""

    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, attn_bias, key_padding_mask, is_causal, buckets, time_span, dropout_p,
                scale):
        b, h, lq, _ = q.shape
        lk, n_buckets = k.shape[2], rel_k.shape[-2]
        keep = None
        if dropout_p > 0.0:  # as F.dropout draws it, so a seed gives the reference's mask
            keep = torch.empty(b, h, lq, lk, dtype=q.dtype, device=q.device).bernoulli_(1.0 - dropout_p).bool()
        parts_p, parts_o = [], []
        for rows in _row_chunks(b, h * lq * max(n_buckets, lk), b * h * lq * lk):
            qc = q[rows]
            ids = _bucket_ids(buckets, time_span, rows, (qc.shape[0], h, lq, lk))
            scores = (qc @ k[rows].transpose(-1, -2) + _times_table(qc, rel_k, transpose=True).gather(-1, ids)) * scale
            kpm = None if key_padding_mask is None else key_padding_mask[rows]
            bias = combined_bias(kpm, _rows_of(attn_bias, rows), is_causal, lq, lk, scores.dtype, scores.device)
            probs = masked_softmax(scores, bias)
            parts_p.append(probs)
            if keep is not None:
                probs = probs * keep[rows] / (1.0 - dropout_p)
            bucket_probs = torch.zeros(*probs.shape[:3], n_buckets, dtype=probs.dtype, device=probs.device)
            bucket_probs.scatter_add_(-1, ids, probs)
            parts_o.append(probs @ v[rows] + _times_table(bucket_probs, rel_v, transpose=False))
        probs = parts_p[0] if len(parts_p) == 1 else torch.cat(parts_p)
        out = parts_o[0] if len(parts_o) == 1 else torch.cat(parts_o)
        ctx.save_for_backward(q, k, v, rel_k, rel_v, attn_bias, buckets, probs, keep)
        ctx.time_span, ctx.dropout_p, ctx.scale = time_span, dropout_p, scale
        weights = probs if keep is None else probs * keep / (1.0 - dropout_p)
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_weights):
        q, k, v, rel_k, rel_v, attn_bias, buckets, probs, keep = ctx.saved_tensors
        b, h, lq, _ = q.shape
        lk, n_buckets = k.shape[2], rel_k.shape[-2]
        grad_out = grad_out.to(q.dtype)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_rel_k, d_rel_v = torch.zeros_like(rel_k), torch.zeros_like(rel_v)
        d_bias = None
        if attn_bias is not None and ctx.needs_input_grad[5]:
            d_bias = torch.zeros(attn_bias.shape, dtype=q.dtype, device=q.device)
        for rows in _row_chunks(b, h * lq * max(n_buckets, lk), b * h * lq * lk):
            go, p = grad_out[rows], probs[rows]
            ids = _bucket_ids(buckets, ctx.time_span, rows, p.shape)
            dropped = p if keep is None else p * keep[rows] / (1.0 - ctx.dropout_p)
            # Value side: o = P v + (bucket sums of P) rel_v.
            d_dropped = go @ v[rows].transpose(-1, -2) + _times_table(go, rel_v, transpose=True).gather(-1, ids)
            dv[rows] = dropped.transpose(-1, -2) @ go
            bucket_probs = torch.zeros(*p.shape[:3], n_buckets, dtype=p.dtype, device=p.device)
            d_rel_v += _table_gradient(bucket_probs.scatter_add_(-1, ids, dropped), go, rel_v.shape[0])
            d_probs = d_dropped if keep is None else d_dropped * keep[rows] / (1.0 - ctx.dropout_p)
            # Softmax (rows with no allowed key have P = 0, hence zero gradients).
            d_scores = p * (d_probs - (d_probs * p).sum(dim=-1, keepdim=True))
            if d_bias is not None:
                if attn_bias.shape[0] == 1:
                    d_bias += d_scores.sum_to_size(attn_bias.shape)
                else:
                    d_bias[rows] = d_scores.sum_to_size(p.shape[0], *attn_bias.shape[1:])
            d_scores = d_scores * ctx.scale
            # Key side: s = q k^T + gather(q rel_k^T).
            d_table = torch.zeros(*p.shape[:3], n_buckets, dtype=p.dtype, device=p.device).scatter_add_(-1, ids, d_scores)
            dq[rows] = d_scores @ k[rows] + _times_table(d_table, rel_k, transpose=False)
            dk[rows] = d_scores.transpose(-1, -2) @ q[rows]
            d_rel_k += _table_gradient(d_table, q[rows], rel_k.shape[0])
        return dq, dk, dv, d_rel_k, d_rel_v, d_bias, None, None, None, None, None, None


def _bucketed(q, k, v, rel_k, rel_v, buckets, time_span, key_padding_mask, attn_bias, is_causal, dropout_p, scale,
              return_weights):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, weights = _BucketedAttention.apply(q, k, v, rel_k, rel_v, attn_bias, key_padding_mask, bool(is_causal),
                                            buckets, time_span, float(dropout_p), float(scale))
    return (out, weights) if return_weights else out


def bucketed_attention_torch(
    q, k, v, rel_k, rel_v, buckets, key_padding_mask=None, attn_bias=None, is_causal=False, dropout_p=0.0,
    scale=None, return_weights=False,
):
    """The relative-attention family for any bucket ids (``buckets`` ``[Lq, Lk]`` shared by the
    batch, or ``[B, Lq, Lk]``), never building ``[B, h, Lq, Lk, dh]``: the key term is one dot
    product per table row gathered into the logits, the value term the per-row bucket sums of the
    probabilities times the value table (see :class:`_BucketedAttention`). The returned weights
    carry no gradient."""
    return _bucketed(q, k, v, rel_k, rel_v, buckets, -1, key_padding_mask, attn_bias, is_causal, dropout_p, scale,
                     return_weights)


def relative_attention_torch(
    q, k, v, rel_k, rel_v, key_padding_mask=None, attn_bias=None, is_causal=False, dropout_p=0.0, scale=None,
    return_weights=False,
):
    """RMHA-k: buckets ``clamp(j - i, -k, k) + k``, ``2k+1`` dot products per query row."""
    buckets = relative_buckets(q.shape[-2], k.shape[-2], (rel_k.shape[-2] - 1) // 2, q.device)
    return _bucketed(q, k, v, rel_k, rel_v, buckets, -1, key_padding_mask, attn_bias, is_causal, dropout_p, scale,
                     return_weights)


def time_interval_buckets(tau: torch.Tensor, time_span: int) -> torch.Tensor:
    """``min(|tau_i - tau_j|, K)`` as int64 ``[B, L, L]``."""
    return (tau[:, :, None] - tau[:, None, :]).abs_().clamp_(max=time_span)


def time_interval_attention_torch(
    q, k, v, rel_k, rel_v, timestamps, time_unit=None, key_padding_mask=None, attn_bias=None, is_causal=False,
    dropout_p=0.0, scale=None, return_weights=False,
):
    """TiSASRec's attention without the ``[B, L, L, d]`` interval tensors: the interval buckets
    come from the per-position time steps ``tau [B, L]``, computed once; the int64 bucket ids
    (which the gather and the scatter index with) exist for one chunk of the batch at a time and
    are recomputed from ``tau`` in the backward pass rather than kept."""
    tau = personal_time_steps(timestamps, time_unit, key_padding_mask)
    return _bucketed(q, k, v, rel_k, rel_v, tau, rel_k.shape[-2] - 1, key_padding_mask, attn_bias, is_causal,
                     dropout_p, scale, return_weights)


def _as_head_tables(table: torch.Tensor, name: str, heads: int, head_dim: int, rows: str = "2k+1") -> torch.Tensor:
    check_float(table, name, (2, 3), f"([{rows}, dh] shared or [h, {rows}, dh] per head)")
    if table.dim() == 2:
        table = table.unsqueeze(0)
    if table.shape[0] not in (1, heads):
        raise ValueError(f"{name}: expected 1 or h={heads} tables, got shape {tuple(table.shape)}")
    if rows == "2k+1" and table.shape[-2] % 2 != 1:
        raise ValueError(f"{name}: expected 2k+1 rows (an odd number), got shape {tuple(table.shape)}")
    if table.shape[-2] < 1:
        raise ValueError(f"{name}: expected at least one row, got shape {tuple(table.shape)}")
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


def _check_attention(query, key, value, rel_k, rel_v, key_padding_mask, attn_mask, dropout_p, rows, **others):
    """The checks every member of the family shares; returns the canonical tables and masks."""
    check_float(query, "query", 4, "[B, h, Lq, dh]")
    check_float(key, "key", 4, "[B, h, Lk, dh]")
    check_float(value, "value", 4, "[B, h, Lk, dh_v]")
    check_same_device(query=query, key=key, value=value, rel_k=rel_k, rel_v=rel_v, **others)
    b, h, lq, dh = query.shape
    lk = key.shape[2]
    if key.shape != (b, h, lk, dh):
        raise ValueError(f"key: expected shape [B={b}, h={h}, Lk, dh={dh}], got {tuple(key.shape)}")
    if value.shape[:3] != (b, h, lk):
        raise ValueError(f"value: expected shape [B={b}, h={h}, Lk={lk}, dh_v], got {tuple(value.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    rel_k = _as_head_tables(rel_k, "rel_k", h, dh, rows).to(query.dtype)
    rel_v = _as_head_tables(rel_v, "rel_v", h, value.shape[-1], rows).to(query.dtype)
    if rel_k.shape[-2] != rel_v.shape[-2]:
        raise ValueError(f"rel_k and rel_v must have the same number of rows ({rows}), got {rel_k.shape[-2]} and {rel_v.shape[-2]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    kpm, bias = normalize_masks(key_padding_mask, attn_mask, b, h, lq, lk, query.dtype, query.device)
    return rel_k, rel_v, kpm, bias


def _run(op, backend, need_weights, reference, composed, args):
    if need_weights:
        if backend not in ("auto", "torch", "reference"):
            raise ValueError(f"need_weights=True needs the 'torch' or 'reference' backend, got {backend!r}")
        fn = reference if backend == "reference" else composed
        return fn(*args, return_weights=True)
    return implementation(op, backend, args[0].device, reference, composed, args)(*args)


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
        dropout_p: attention dropout probability (pass 0 in evaluation). The triton backend
            applies the nearest multiple of 1/256 (its draws are 8-bit; kept scores are scaled by
            the rate applied, so the expectation stays exact).
        scale: logit scale, default ``1/sqrt(dh)``.
        backend: "auto", "reference", "torch", "triton" or "cuda".
        need_weights: also return the attention probabilities ``[B, h, Lq, Lk]``; only the
            reference and torch backends build them ("auto" picks torch).

    Returns ``[B, h, Lq, dh_v]`` (and the weights). Query rows with no allowed key give 0, never NaN.
    """
    rel_k, rel_v, kpm, bias = _check_attention(query, key, value, rel_k, rel_v, key_padding_mask, attn_mask,
                                               dropout_p, "2k+1")
    args = (query, key, value, rel_k, rel_v, kpm, bias, bool(is_causal), float(dropout_p), scale)
    return _run("relative_attention", backend, need_weights, relative_attention_reference, relative_attention_torch,
                args)


def bucketed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    buckets: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    need_weights: bool = False,
):
    """The relative-attention family with the bucket of every (query, key) pair given:
    ``s_ij = q_i . (k_j + rel_k[b_ij]) * scale``, ``o_i = sum_j P_ij (v_j + rel_v[b_ij])``.

    For code that already holds the bucket ids, e.g. TiSASRec's ``[B, L, L]`` interval matrices.
    ``buckets``: integers in ``[0, R)`` of shape ``[Lq, Lk]`` (shared by the batch) or ``[B, Lq, Lk]``;
    ``rel_k, rel_v``: ``[R, dh]`` or ``[h, R, dh]``. Other arguments as :func:`relative_attention`;
    backends "auto" (torch), "reference" and "torch".
    """
    rel_k, rel_v, kpm, bias = _check_attention(query, key, value, rel_k, rel_v, key_padding_mask, attn_mask,
                                               dropout_p, "R", buckets=buckets)
    b, _, lq, _ = query.shape
    lk = key.shape[2]
    if not isinstance(buckets, torch.Tensor) or buckets.is_floating_point() or buckets.is_complex() \
            or buckets.dtype == torch.bool:
        raise TypeError("buckets: expected an integer tensor of bucket ids")
    if tuple(buckets.shape) not in ((lq, lk), (b, lq, lk)):
        raise ValueError(f"buckets: expected shape [Lq={lq}, Lk={lk}] or [B={b}, {lq}, {lk}], got {tuple(buckets.shape)}")
    if buckets.numel() and not _is_tracing():
        lo, hi = int(buckets.min()), int(buckets.max())
        if lo < 0 or hi >= rel_k.shape[-2]:
            raise ValueError(f"buckets: ids must lie in [0, {rel_k.shape[-2] - 1}] (the tables' rows), got [{lo}, {hi}]")
    args = (query, key, value, rel_k, rel_v, buckets.long(), kpm, bias, bool(is_causal), float(dropout_p), scale)
    return _run("bucketed_attention", backend, need_weights, bucketed_attention_reference, bucketed_attention_torch,
                args)


def _time_unit(time_unit, batch: int, device: torch.device) -> torch.Tensor | None:
    """``"user"`` -> None (each row's own unit); a positive number or ``[B]`` tensor -> float64 ``[B]``."""
    if isinstance(time_unit, str):
        if time_unit != "user":
            raise ValueError(f"time_unit: expected 'user', a positive number or a [B] tensor, got {time_unit!r}")
        return None
    if isinstance(time_unit, torch.Tensor):
        if time_unit.dim() > 1 or (time_unit.dim() == 1 and time_unit.shape[0] != batch):
            raise ValueError(f"time_unit: expected a number or a [B={batch}] tensor, got shape {tuple(time_unit.shape)}")
        if time_unit.device != device:
            raise ValueError(f"time_unit: expected a tensor on {device} like the query, got one on {time_unit.device}")
        unit = time_unit.double().expand(batch)
    elif isinstance(time_unit, (int, float)) and not isinstance(time_unit, bool):
        unit = torch.full((batch,), float(time_unit), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"time_unit: expected 'user', a positive number or a [B] tensor, got {type(time_unit).__name__}")
    if not _is_tracing() and not bool(((unit > 0) & unit.isfinite()).all()):
        raise ValueError("time_unit: every unit must be positive and finite")
    return unit


def _check_timestamps(timestamps, batch: int, length: int, key_padding_mask) -> None:
    if not isinstance(timestamps, torch.Tensor):
        raise TypeError(f"timestamps: expected a torch.Tensor [B, L], got {type(timestamps).__name__}")
    if timestamps.dtype == torch.bool or timestamps.is_complex():
        raise TypeError(f"timestamps: expected integer or floating-point times, got dtype {timestamps.dtype}")
    if tuple(timestamps.shape) != (batch, length):
        raise ValueError(f"timestamps: expected shape [B={batch}, L={length}], got {tuple(timestamps.shape)}")
    if timestamps.is_floating_point() and not _is_tracing():
        read = timestamps.isfinite() if key_padding_mask is None else timestamps.isfinite() | key_padding_mask
        if not bool(read.all()):
            raise ValueError("timestamps: NaN or infinite times at non-padding positions")


def _add_positions(x: torch.Tensor, table: torch.Tensor | None, name: str) -> torch.Tensor:
    """``x + table`` for an absolute-position table ``[L, dh]`` (shared) or ``[h, L, dh]``."""
    if table is None:
        return x
    _, h, length, dh = x.shape
    check_float(table, name, (2, 3), f"([L={length}, {dh}] or [h={h}, L, {dh}])")
    if table.shape[-2:] != (length, dh) or (table.dim() == 3 and table.shape[0] not in (1, h)):
        raise ValueError(f"{name}: expected shape [L={length}, {dh}] or [h={h}, {length}, {dh}], got {tuple(table.shape)}")
    return x + table.to(x.dtype)


def time_interval_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    timestamps: torch.Tensor,
    *,
    time_unit="user",
    pos_k: torch.Tensor | None = None,
    pos_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    need_weights: bool = False,
):
    """Time-interval-aware self-attention (TiSASRec, Li, Wang and McAuley, WSDM 2020)::

        tau_i = round((t_i - t_first) / u)          t_first: the user's first timestamp
        r_ij  = min(|tau_i - tau_j|, K)             K = rows of the tables - 1 (TiSASRec's time span)
        s_ij  = q_i . (k_j + pos_k[j] + rel_k[r_ij]) * scale
        o_i   = sum_j softmax(s)_ij (v_j + pos_v[j] + rel_v[r_ij])

    Args:
        query, key, value: ``[B, h, L, dh]`` (self-attention: one length).
        rel_k, rel_v: interval tables ``[K+1, dh]`` (shared by the heads) or ``[h, K+1, dh]``.
        timestamps: ``[B, L]`` integer or float times (e.g. Unix seconds), in any order: only the
            intervals ``|t_i - t_j|`` count. Padding positions (bool ``key_padding_mask`` True)
            are never read (NaN is fine there); they count as the user's first timestamp.
            With no bool mask every timestamp is read.
        time_unit: ``"user"`` (TiSASRec): per row, the smallest nonzero interval between two of its
            (non-padding) timestamps, 1 when they are all equal. Or a fixed positive number
            (1 for times already in TiSASRec's units, 86400 for days from seconds) or a ``[B]``
            tensor of per-user units (e.g. computed over each user's whole history, as TiSASRec
            does, rather than over the window).
        pos_k, pos_v: optional absolute-position key and value tables ``[L, dh]`` or
            ``[h, L, dh]``, added to ``key`` and ``value``.
        key_padding_mask, attn_mask, is_causal, dropout_p, scale, need_weights: as
            :func:`relative_attention`.
        backend: "auto" (the torch composition, until the fused kernels are checked and timed on
            a GPU), "reference", "torch", "triton" (tables of at most 1025 rows, K <= 1024) or
            "cuda"; both fused backends compute the interval buckets from ``tau`` in the kernel.

    Returns ``[B, h, L, dh_v]`` (and the weights). Query rows with no allowed key give 0, never NaN.
    """
    check_float(query, "query", 4, "[B, h, L, dh]")
    check_float(key, "key", 4, "[B, h, L, dh]")
    check_float(value, "value", 4, "[B, h, L, dh_v]")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"time-interval attention is self-attention: query and key lengths differ "
                         f"({query.shape[2]} and {key.shape[2]})")
    key = _add_positions(key, pos_k, "pos_k")
    value = _add_positions(value, pos_v, "pos_v")
    rel_k, rel_v, kpm, bias = _check_attention(query, key, value, rel_k, rel_v, key_padding_mask, attn_mask,
                                               dropout_p, "K+1", timestamps=timestamps)
    _check_timestamps(timestamps, query.shape[0], query.shape[2], kpm)
    unit = _time_unit(time_unit, query.shape[0], query.device)
    args = (query, key, value, rel_k, rel_v, timestamps, unit, kpm, bias, bool(is_causal), float(dropout_p), scale)
    return _run("time_interval_attention", backend, need_weights, time_interval_attention_reference,
                time_interval_attention_torch, args)
