"""Building blocks shared by CARCA and the SASRec baseline."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastpe.nn.factory import _canonical, attention_layer, encoding_kind, input_encoding, needs_timestamps

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.2)}


def build_encoding(name: str, d_model: int, max_len: int, reverse: bool = True, rope_base: float = 1000.0,
                   backend: str = "auto"):
    """``(input_encoding_module, attention_factory)`` for an encoding name.

    Table encodings count positions from the most recent item (``reverse=True``, the study's
    default) so that a left-padded batch gives the most recent item position 0 whatever the
    history length. RoPE uses base 1000 as in the study (histories of tens of items; the module's own
    default is the RoPE paper's 10000, see :class:`fastpe.nn.RotaryMultiheadAttention`). ``backend``
    goes to the modules that have fused kernels ("auto": the fused kernels on the GPU, the torch
    composition on the CPU).
    """
    key = _canonical(name)
    if encoding_kind(key) == "attention":
        encoding = input_encoding(key, d_model, max_len)
        options = {"backend": backend}
        if key == "rope":
            options["base"] = rope_base
        if needs_timestamps(key):
            options["max_len"] = max_len
    else:
        enc_options = {"reverse": reverse}
        if key.startswith("rotatory") or key.endswith("+con"):
            enc_options["backend"] = backend
        encoding = input_encoding(key, d_model, max_len, **enc_options)
        options = {}

    def make_attention(d: int, heads: int, dropout: float) -> nn.Module:
        return attention_layer(key, d, heads, dropout, **options)

    return encoding, make_attention


class ItemRepresentation(nn.Module):
    """Item id embedding scaled by ``sqrt(d)``, fused with item attributes and context features.

    Without features it is the scaled embedding. With them (CARCA): ``f = Linear([a_i ; c])`` and
    ``x = Linear([e_i * sqrt(d) ; f])``, where ``a_i`` are the item's attributes (a fixed buffer,
    row 0 = padding) and ``c`` the interaction's context (time features).
    """

    def __init__(self, n_items: int, d_model: int, item_features: torch.Tensor | None = None, context_dim: int = 0,
                 fusion_dim: int | None = None):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(n_items + 1, d_model, padding_idx=0)
        nn.init.xavier_uniform_(self.embedding.weight)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        if item_features is not None:
            if item_features.dim() != 2 or item_features.shape[0] != n_items + 1:
                raise ValueError(f"item_features: expected [n_items + 1 = {n_items + 1}, A], got {tuple(item_features.shape)}")
            # Not persistent: it is data, rebuilt from the data set, so checkpoints stay small.
            self.register_buffer("item_features", item_features.float(), persistent=False)
        else:
            self.item_features = None
        self.context_dim = context_dim
        n_features = (0 if item_features is None else item_features.shape[1]) + context_dim
        self.n_features = n_features
        if n_features:
            fusion_dim = fusion_dim or d_model
            self.features = nn.Linear(n_features, fusion_dim)
            self.combine = nn.Linear(d_model + fusion_dim, d_model)

    def forward(self, items: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embedding(items) * math.sqrt(self.d_model)
        if not self.n_features:
            return e
        parts = []
        if self.item_features is not None:
            parts.append(self.item_features[items])
        if self.context_dim:
            if context is None:
                raise ValueError(f"this model was built with {self.context_dim} context features; pass context")
            if context.shape[:-1] != items.shape or context.shape[-1] != self.context_dim:
                raise ValueError(f"context: expected shape {tuple(items.shape)} + ({self.context_dim},), "
                                 f"got {tuple(context.shape)}")
            parts.append(context.to(e.dtype))
        f = self.features(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        return self.combine(torch.cat((e, f.to(e.dtype)), dim=-1))

    # The representation is linear in (embedding, attributes, context), so it splits into a term per
    # item and a term per context: x(i, c) = table[i] + context_term(c). Scoring every item for many
    # users (full ranking) then costs one gather instead of recomputing the fusion per (user, item).
    def item_table(self) -> torch.Tensor:
        """``[n_items + 1, d]``: the per-item term of every item (row 0 = padding id)."""
        e = self.embedding.weight * math.sqrt(self.d_model)
        if not self.n_features:
            return e
        d = self.d_model
        w_e, w_f = self.combine.weight[:, :d], self.combine.weight[:, d:]
        table = e @ w_e.t()
        if self.item_features is not None:
            w_attr = self.features.weight[:, : self.item_features.shape[1]]
            table = table + (self.item_features @ w_attr.t()) @ w_f.t()
        return table

    def context_term(self, context: torch.Tensor | None) -> torch.Tensor:
        """``[..., d]`` (or ``[d]`` without context features): the per-context term, biases included."""
        if not self.n_features:
            return torch.zeros(self.d_model, device=self.embedding.weight.device)
        d = self.d_model
        w_f = self.combine.weight[:, d:]
        f = self.features.bias
        if self.context_dim:
            if context is None:
                raise ValueError(f"this model was built with {self.context_dim} context features; pass context")
            w_ctx = self.features.weight[:, self.features.in_features - self.context_dim:]
            f = f + context.to(w_ctx.dtype) @ w_ctx.t()
        return f @ w_f.t() + self.combine.bias


class EncoderBlock(nn.Module):
    """Pre-LN self-attention block: ``h = LN(x)``, ``a = Attn(h)``, then ``x + a`` (``residual="add"``)
    or CARCA's multiplicative ``h * a`` (``"mul"``); then ``x + FFN(LN(x))`` with a real
    nonlinearity. Padding rows are zeroed at the end."""

    def __init__(self, make_attention, d_model: int, n_heads: int, dropout: float, ffn_dim: int,
                 residual: str = "add", activation: str = "gelu"):
        super().__init__()
        if residual not in ("add", "mul"):
            raise ValueError(f"residual must be 'add' or 'mul', got {residual!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.residual = residual
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = make_attention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), ACTIVATIONS[activation](), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, causal: bool,
                timestamps: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        extra = {"timestamps": timestamps} if getattr(self.attention, "needs_timestamps", False) else {}
        a, _ = self.attention(h, h, h, key_padding_mask=padding, need_weights=False, is_causal=causal, **extra)
        a = self.dropout(a)
        x = h * a if self.residual == "mul" else x + a
        x = x + self.dropout(self.ffn(self.norm2(x)))
        return x.masked_fill(padding.unsqueeze(-1), 0.0)


class SequenceEncoder(nn.Module):
    """Item representations -> positional encoding -> encoder blocks -> final LayerNorm."""

    def __init__(self, encoding: str, d_model: int, n_blocks: int, n_heads: int, dropout: float, max_len: int,
                 causal: bool, residual: str, ffn_dim: int, activation: str, rope_base: float, backend: str,
                 reverse: bool = True):
        super().__init__()
        self.encoding_name = encoding
        self.needs_timestamps = needs_timestamps(encoding)
        self.causal = causal
        self.max_len = max_len
        self.positional, make_attention = build_encoding(encoding, d_model, max_len, reverse, rope_base, backend)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(make_attention, d_model, n_heads, dropout, ffn_dim, residual, activation) for _ in range(n_blocks)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, timestamps: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] > self.max_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_len={self.max_len}")
        if self.needs_timestamps and timestamps is None:
            raise ValueError(f"the {self.encoding_name!r} encoding needs the timestamps [B, L] of the sequence "
                             "(timestamps=...; the data set must have them)")
        x = self.dropout(self.positional(x, padding_mask=padding))
        for block in self.blocks:
            x = block(x, padding, self.causal, timestamps)
        return self.norm(x).masked_fill(padding.unsqueeze(-1), 0.0)

