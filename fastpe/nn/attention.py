"""Self-attention layers: drop-ins for ``nn.MultiheadAttention``.

All three share ``nn.MultiheadAttention``'s constructor arguments, parameter names
(``in_proj_weight``/``q_proj_weight``..., ``in_proj_bias``, ``out_proj``) and forward signature
``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
average_attn_weights=True, is_causal=False)``, with the same mask conventions. Unlike PyTorch they
never return NaN: a query whose keys are all masked attends to nothing (its attention output
is 0), and a sequence that is all padding (``key_padding_mask`` all True) gets output 0.

* :class:`MultiheadAttention`: no positional terms (the encoder for input-side encodings).
* :class:`RelativeMultiheadAttention`: RMHA-k, relative keys and values (``rmha-4``).
* :class:`RotaryMultiheadAttention`: RoPE on queries and keys (``rope``).

``need_weights=True`` (PyTorch's default) needs the attention matrix and so runs the plain
PyTorch path; pass ``need_weights=False`` to use the fused kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastpe._validation import check_float
from fastpe.nn.encodings import sinusoidal_angles
from fastpe.ops import relative_attention, rotary
from fastpe.ops.attention import attention


class _MultiheadAttentionBase(nn.Module):
    kind = "attention"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_projections()

    def _reset_projections(self) -> None:
        # As nn.MultiheadAttention, so that swapping layers keeps the initial scale of the model.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"

    def config(self) -> dict:
        """The constructor arguments that rebuild this layer (``type(self)(**config)``), as plain
        Python values; device and dtype are not part of it. Used by :func:`fastpe.save`."""
        return {
            "embed_dim": self.embed_dim, "num_heads": self.num_heads, "dropout": self.dropout,
            "bias": self.in_proj_bias is not None, "kdim": self.kdim, "vdim": self.vdim, "batch_first": self.batch_first,
        }

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def _project(self, query, key, value):
        e = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(e)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, L, dh]

    def _check_inputs(self, query, key, value):
        dims = {"query": self.embed_dim, "key": self.kdim, "value": self.vdim}
        tensors = {"query": query, "key": key, "value": value}
        layout = "[B, L, E]" if self.batch_first else "[L, B, E]"
        for name, t in tensors.items():
            check_float(t, name, (2, 3), f"{layout}, or [L, E] unbatched")
            if t.dim() != query.dim():
                raise ValueError(f"{name}: expected {query.dim()} dims like the query, got shape {tuple(t.shape)}")
            if t.shape[-1] != dims[name]:
                raise ValueError(f"{name}: expected {dims[name]} features in the last dim, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same batch and length, got {tuple(key.shape)} and {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if query.dim() == 3 and query.shape[batch_dim] != key.shape[batch_dim]:
            raise ValueError(
                f"query and key must have the same batch size, got {query.shape[batch_dim]} and {key.shape[batch_dim]} "
                f"(batch_first={self.batch_first})"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        self._check_inputs(query, key, value)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            if query is key and key is value:
                query = key = value = query.transpose(0, 1)
            else:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = (self._heads(t) for t in self._project(query, key, value))
        dropout_p = self.dropout if self.training else 0.0
        out, weights = self._attend(q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, need_weights)
        b, _, lq, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
            # A sequence that is all padding has no keys to attend to: its output is 0, not out_proj.bias.
            out = out.masked_fill(key_padding_mask.all(dim=-1)[:, None, None], 0.0)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _attend(self, q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, need_weights):
        raise NotImplementedError


class MultiheadAttention(_MultiheadAttentionBase):
    """``nn.MultiheadAttention`` without positional terms, NaN-free on fully padded rows."""

    def _attend(self, q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, need_weights):
        result = attention(
            q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=dropout_p, need_weights=need_weights,
        )
        return result if need_weights else (result, None)


class RelativeMultiheadAttention(_MultiheadAttentionBase):
    """RMHA-k (Shaw et al., 2018): relative key and value tables ``[2k+1, dh]`` with the
    distance ``j - i`` clipped to ``[-k, k]`` (``max_distance=k``, default 4), shared by the
    heads or one pair per head (``per_head_tables=True``)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        device=None,
        dtype=None,
        max_distance: int = 4,
        per_head_tables: bool = False,
        backend: str = "auto",
    ):
        super().__init__(embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first, device, dtype)
        if max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, got {max_distance}")
        self.max_distance = max_distance
        self.per_head_tables = per_head_tables
        self.backend = backend
        shape = (num_heads, 2 * max_distance + 1, self.head_dim) if per_head_tables else (2 * max_distance + 1, self.head_dim)
        self.relative_key = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.relative_value = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_relative_tables()

    def reset_relative_tables(self) -> None:
        # Small compared with q and k so that training starts close to plain attention.
        nn.init.normal_(self.relative_key, std=1.0 / math.sqrt(self.head_dim))
        nn.init.normal_(self.relative_value, std=1.0 / math.sqrt(self.head_dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_distance={self.max_distance}, per_head_tables={self.per_head_tables}"

    def config(self) -> dict:
        return {
            **super().config(), "max_distance": self.max_distance, "per_head_tables": self.per_head_tables,
            "backend": self.backend,
        }

    def _attend(self, q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, need_weights):
        result = relative_attention(
            q, k, v, self.relative_key, self.relative_value, key_padding_mask=key_padding_mask,
            attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, backend=self.backend,
            need_weights=need_weights,
        )
        return result if need_weights else (result, None)


class RotaryMultiheadAttention(_MultiheadAttentionBase):
    """RoPE: queries and keys rotated per head by ``p * base^(-2m/dh)`` before attention.

    ``base`` defaults to 10000, the RoPE paper's value (made for texts of thousands of tokens). The
    CARCA/SASRec models and ``fastpe train`` use 1000 (``--rope-base``), the study's value: with
    histories of tens of items a smaller base makes the slow frequencies turn enough to tell
    positions apart.

    ``interleaved`` pairs ``(2m, 2m+1)`` instead of ``(m, m + dh/2)``. ``learnable`` is
    ``"none"`` (fixed frequencies), ``"frequencies"`` (one learned frequency per pair) or
    ``"angles"`` (a learned angle per position and pair, ``[max_len, dh/2]``, which bounds the length).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        device=None,
        dtype=None,
        base: float = 10000.0,
        interleaved: bool = False,
        learnable: str = "none",
        max_len: int = 512,
        backend: str = "auto",
    ):
        super().__init__(embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first, device, dtype)
        if self.head_dim % 2:
            raise ValueError(f"rope needs an even head size, got {self.head_dim} (embed_dim {embed_dim} / {num_heads} heads)")
        if learnable not in ("none", "frequencies", "angles"):
            raise ValueError(f"learnable must be 'none', 'frequencies' or 'angles', got {learnable!r}")
        self.base = base
        self.interleaved = interleaved
        self.learnable = learnable
        self.max_len = max_len
        self.backend = backend
        pairs = self.head_dim // 2
        inv_freq = (base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)).float()
        if learnable == "angles":
            self.angle_weight = nn.Parameter(sinusoidal_angles(max_len, pairs, base).to(device))
        elif learnable == "frequencies":
            self.inv_freq = nn.Parameter(inv_freq.to(device))
        else:
            self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base}, interleaved={self.interleaved}, learnable={self.learnable!r}"

    def config(self) -> dict:
        return {
            **super().config(), "base": self.base, "interleaved": self.interleaved, "learnable": self.learnable,
            "max_len": self.max_len, "backend": self.backend,
        }

    def angles(self, length: int, device: torch.device) -> torch.Tensor:
        """The ``[length, dh/2]`` rotation angles of positions ``0..length-1``."""
        if self.learnable == "angles":
            if length > self.max_len:
                raise ValueError(f"sequence length {length} exceeds the configured maximum max_len={self.max_len}")
            return self.angle_weight[:length]
        return torch.arange(length, device=device, dtype=torch.float32)[:, None] * self.inv_freq

    def _rotate(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        # [B, h, L, dh] -> the op's [B, L, h, dh] layout as a view, and back.
        return rotary(x.transpose(1, 2), angles, interleaved=self.interleaved, backend=self.backend).transpose(1, 2)

    def _attend(self, q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, need_weights):
        length = max(q.shape[2], k.shape[2])
        angles = self.angles(length, q.device)
        q = self._rotate(q, angles[: q.shape[2]])
        k = self._rotate(k, angles[: k.shape[2]])
        result = attention(
            q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=dropout_p, need_weights=need_weights,
        )
        return result if need_weights else (result, None)


__all__ = ["MultiheadAttention", "RelativeMultiheadAttention", "RotaryMultiheadAttention"]
