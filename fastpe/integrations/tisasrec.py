"""TiSASRec.pytorch-style models: time-interval attention without the ``[B, L, L, d]`` tensors.

Such code (pmixer/TiSASRec.pytorch and its descendants) embeds the ``[B, L, L]`` clipped
interval matrix with ``time_matrix_K_emb`` / ``time_matrix_V_emb`` into two ``[B, L, L, d]``
tensors, adds ``abs_pos_K_emb`` / ``abs_pos_V_emb`` rows to the keys and values, and runs
``TimeAwareMultiHeadAttention`` (``Q_w``, ``K_w``, ``V_w``, ``head_num``) over them in
``seq2feats(user_ids, log_seqs, time_matrices)``. :func:`patch` replaces ``seq2feats`` on the
model instance with the same computation through fastpe's relative-attention family: the same
modules, the same weights (nothing is swapped or copied), the same ``forward`` and ``predict``.

The third argument may now be either

* the ``[B, L, L]`` interval matrix the data sampler builds (``computeRePos``): used as the
  bucket ids (:func:`fastpe.ops.bucketed_attention`), or
* the ``[B, L]`` ``time_seq`` (the sampler's per-position times, in TiSASRec's units, 0 at
  padding): the buckets ``min(|t_i - t_j|, time_span)`` are computed inside the op
  (:func:`fastpe.ops.time_interval_attention` with ``time_unit=1``), so no ``[B, L, L]`` matrix
  needs to exist at all.

Same outputs as the original code: in evaluation exactly (up to float rounding), including its
masking (causal, padding keys attended as in the original; the rows of padding queries differ
inside the attention but the model zeroes them after every block). In training, attention
dropout is the same; the original's dropout of the embedded ``[B, L, L, d]`` interval tensors
(one mask per element) becomes dropout of the ``[time_span + 1, d]`` interval tables (one mask
per step, shared by the pairs of a bucket), since the per-element version needs the tensors
this patch avoids.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from torch import nn

from fastpe.ops import bucketed_attention, time_interval_attention

_MODEL_PARTS = ("item_emb", "item_emb_dropout", "abs_pos_K_emb", "abs_pos_V_emb", "abs_pos_K_emb_dropout",
                "abs_pos_V_emb_dropout", "time_matrix_K_emb", "time_matrix_V_emb", "time_matrix_K_dropout",
                "time_matrix_V_dropout", "attention_layernorms", "attention_layers", "forward_layernorms",
                "forward_layers", "last_layernorm")
_LAYER_PARTS = ("Q_w", "K_w", "V_w", "dropout", "head_num", "head_size")


def _device(model: nn.Module) -> torch.device:
    return model.item_emb.weight.device


def _tensor(a, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, device=device)


def _per_head(table: torch.Tensor, heads: int) -> torch.Tensor:
    # [R, d] -> [h, R, dh]: head h reads columns h*dh:(h+1)*dh, as torch.split(..., head_size) does.
    rows, d = table.shape
    return table.view(rows, heads, d // heads).transpose(0, 1)


def time_aware_attention(layer: nn.Module, queries, keys, abs_pos_k, abs_pos_v, time_k, time_v, times,
                         backend: str = "auto") -> torch.Tensor:
    """``TimeAwareMultiHeadAttention.forward`` of ``layer`` without materialising: ``times`` is the
    ``[B, L, L]`` interval matrix or the ``[B, L]`` time sequence; ``time_k/v`` the ``[K+1, d]``
    interval tables, ``abs_pos_k/v`` the ``[B, L, d]`` position rows. Causal, as the original."""
    b, length, d = queries.shape
    heads = layer.head_num

    def split(x):
        return x.view(b, length, heads, layer.head_size).transpose(1, 2)

    q = split(layer.Q_w(queries))
    k = split(layer.K_w(keys) + abs_pos_k)
    v = split(layer.V_w(keys) + abs_pos_v)
    rel_k, rel_v = _per_head(time_k, heads), _per_head(time_v, heads)
    dropout_p = layer.dropout.p if layer.training else 0.0
    common = dict(is_causal=True, dropout_p=dropout_p, backend=backend)
    if times.dim() == 3:
        out = bucketed_attention(q, k, v, rel_k, rel_v, times, **common)
    else:
        out = time_interval_attention(q, k, v, rel_k, rel_v, times, time_unit=1.0, **common)
    return out.transpose(1, 2).reshape(b, length, d)


def _seq2feats(model: nn.Module, user_ids, log_seqs, time_matrices, backend: str = "auto") -> torch.Tensor:
    device = _device(model)
    log_seqs = _tensor(log_seqs, device).long()
    times = _tensor(time_matrices, device)
    b, length = log_seqs.shape
    if times.dim() == 3:
        times = times.long()
        if tuple(times.shape) != (b, length, length):
            raise ValueError(f"time_matrices: expected [B={b}, L={length}, L] interval ids or a [B, L] time sequence, "
                             f"got {tuple(times.shape)}")
    elif tuple(times.shape) != (b, length):
        raise ValueError(f"time_matrices: expected [B={b}, L={length}, L] interval ids or a [B, L] time sequence, "
                         f"got {tuple(times.shape)}")
    seqs = model.item_emb(log_seqs) * model.item_emb.embedding_dim ** 0.5
    seqs = model.item_emb_dropout(seqs)
    positions = torch.arange(length, device=device).expand(b, length)
    abs_pos_k = model.abs_pos_K_emb_dropout(model.abs_pos_K_emb(positions))
    abs_pos_v = model.abs_pos_V_emb_dropout(model.abs_pos_V_emb(positions))
    time_k = model.time_matrix_K_dropout(model.time_matrix_K_emb.weight)
    time_v = model.time_matrix_V_dropout(model.time_matrix_V_emb.weight)
    keep = (log_seqs != 0).unsqueeze(-1)
    seqs = seqs * keep
    for i, layer in enumerate(model.attention_layers):
        q = model.attention_layernorms[i](seqs)
        seqs = q + time_aware_attention(layer, q, seqs, abs_pos_k, abs_pos_v, time_k, time_v, times, backend)
        seqs = model.forward_layers[i](model.forward_layernorms[i](seqs))
        seqs = seqs * keep
    return model.last_layernorm(seqs)


def patch(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Make a TiSASRec.pytorch-style model run its attention through fastpe, in place; returns it.

    Replaces ``model.seq2feats`` (used by ``forward`` and ``predict``) on this instance; the
    modules and weights stay as they are, so the model trains, saves and loads as before and
    ``unpatch`` restores the original. See the module docstring for what the third argument may be.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected an nn.Module, got {type(model).__name__}")
    missing = [name for name in _MODEL_PARTS if not hasattr(model, name)]
    if missing:
        raise ValueError(f"patch: {type(model).__name__} is not laid out like TiSASRec.pytorch: no {', '.join(missing)}")
    for i, layer in enumerate(model.attention_layers):
        absent = [name for name in _LAYER_PARTS if not hasattr(layer, name)]
        if absent:
            raise ValueError(f"patch: attention_layers[{i}] ({type(layer).__name__}) has no {', '.join(absent)}")
    if "seq2feats" in vars(model):
        raise ValueError(f"patch: {type(model).__name__} is already patched")

    def seq2feats(self, user_ids, log_seqs, time_matrices):
        return _seq2feats(self, user_ids, log_seqs, time_matrices, backend)

    model.seq2feats = types.MethodType(seq2feats, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the class's own ``seq2feats`` runs again."""
    vars(model).pop("seq2feats", None)
    return model


__all__ = ["patch", "time_aware_attention", "unpatch"]
