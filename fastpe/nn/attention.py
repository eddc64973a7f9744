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
* :class:`TimeIntervalMultiheadAttention`: TiSASRec's time-interval keys and values plus absolute
  position keys and values (``tisas``); its forward also takes ``timestamps [B, L]``.

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
from fastpe.ops import relative_attention, rotary, time_interval_attention
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
        return self._forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                             is_causal)

    def _forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
                 **extra):
        # ``extra``: per-position inputs a layer needs besides q, k, v ([B, L] tensors, e.g. timestamps).
        self._check_inputs(query, key, value)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            extra = {name: t.unsqueeze(0) for name, t in extra.items()}
        elif not self.batch_first:
            if query is key and key is value:
                query = key = value = query.transpose(0, 1)
            else:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = (self._heads(t) for t in self._project(query, key, value))
        dropout_p = self.dropout if self.training else 0.0
        out, weights = self._attend(q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, need_weights, **extra)
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


class TimeIntervalMultiheadAttention(_MultiheadAttentionBase):
    """TiSASRec (Li, Wang and McAuley, WSDM 2020): self-attention with learned key and value
    vectors for the clipped time interval between two interactions, plus learned absolute-position
    key and value tables::

        r_ij = min(|round((t_i - t_first)/u) - round((t_j - t_first)/u)|, K)
        s_ij = q_i . (k_j + position_key[j] + time_key[r_ij]) / sqrt(dh)
        o_i  = sum_j softmax(s)_ij (v_j + position_value[j] + time_value[r_ij])

    ``forward(..., timestamps=t)`` takes the times ``[B, L]`` (``[L]`` unbatched) of the
    sequence; ``u`` is ``time_unit``: ``"user"`` (the paper: each sequence's smallest nonzero
    interval, 1 when all are equal) or a fixed positive number in the timestamps' unit (1 for
    times already in TiSASRec's units). Padding positions' timestamps are never read.
    ``time_span`` is K (TiSASRec's default 256). Interval tables are one pair per head
    (``[h, K+1, dh]``, TiSASRec's layout: its ``[K+1, d]`` embeddings split by head) or shared
    (``per_head_tables=False``); ``position_tables=False`` drops the absolute-position terms.
    Position ``j`` is the index in the (left-padded) window, ``max_len`` rows. Self-attention only.
    Never builds ``[B, L, L, d]``: see :func:`fastpe.ops.time_interval_attention`.
    """

    needs_timestamps = True

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
        time_span: int = 256,
        time_unit: str | float = "user",
        max_len: int = 512,
        per_head_tables: bool = True,
        position_tables: bool = True,
        backend: str = "auto",
    ):
        super().__init__(embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first, device, dtype)
        if isinstance(time_span, bool) or not isinstance(time_span, int) or time_span < 0:
            raise ValueError(f"time_span must be an integer >= 0, got {time_span!r}")
        if time_unit != "user" and not (isinstance(time_unit, (int, float)) and not isinstance(time_unit, bool)
                                        and math.isfinite(time_unit) and time_unit > 0):
            raise ValueError(f"time_unit must be 'user' or a positive number, got {time_unit!r}")
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.time_span = time_span
        self.time_unit = time_unit
        self.max_len = max_len
        self.per_head_tables = per_head_tables
        self.position_tables = position_tables
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        rows = (num_heads, time_span + 1, self.head_dim) if per_head_tables else (time_span + 1, self.head_dim)
        self.time_key = nn.Parameter(torch.empty(rows, **factory))
        self.time_value = nn.Parameter(torch.empty(rows, **factory))
        if position_tables:
            self.position_key = nn.Parameter(torch.empty(num_heads, max_len, self.head_dim, **factory))
            self.position_value = nn.Parameter(torch.empty(num_heads, max_len, self.head_dim, **factory))
        else:
            self.register_parameter("position_key", None)
            self.register_parameter("position_value", None)
        self.reset_time_tables()

    def reset_time_tables(self) -> None:
        # Small compared with q and k so that training starts close to plain attention.
        for table in (self.time_key, self.time_value, self.position_key, self.position_value):
            if table is not None:
                nn.init.normal_(table, std=1.0 / math.sqrt(self.head_dim))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, time_span={self.time_span}, time_unit={self.time_unit!r}, "
                f"max_len={self.max_len}, per_head_tables={self.per_head_tables}, position_tables={self.position_tables}")

    def config(self) -> dict:
        return {
            **super().config(), "time_span": self.time_span, "time_unit": self.time_unit, "max_len": self.max_len,
            "per_head_tables": self.per_head_tables, "position_tables": self.position_tables, "backend": self.backend,
        }

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
        timestamps: torch.Tensor | None = None,
    ):
        if timestamps is None:
            raise ValueError("TimeIntervalMultiheadAttention needs timestamps=[B, L] (the time of every position)")
        if not isinstance(timestamps, torch.Tensor):
            raise TypeError(f"timestamps: expected a torch.Tensor, got {type(timestamps).__name__}")
        if timestamps.dim() != query.dim() - 1:
            raise ValueError(f"timestamps: expected {'[L]' if query.dim() == 2 else '[B, L]'} for a query of shape "
                             f"{tuple(query.shape)}, got {tuple(timestamps.shape)}")
        return self._forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                             is_causal, timestamps=timestamps)

    def _positions(self, table: torch.Tensor | None, length: int) -> torch.Tensor | None:
        if table is None:
            return None
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the configured maximum max_len={self.max_len}")
        return table[:, :length]

    def _attend(self, q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p, need_weights, timestamps=None):
        length = k.shape[2]
        result = time_interval_attention(
            q, k, v, self.time_key, self.time_value, timestamps, time_unit=self.time_unit,
            pos_k=self._positions(self.position_key, length), pos_v=self._positions(self.position_value, length),
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p,
            backend=self.backend, need_weights=need_weights,
        )
        return result if need_weights else (result, None)


__all__ = ["MultiheadAttention", "RelativeMultiheadAttention", "RotaryMultiheadAttention", "TimeIntervalMultiheadAttention"]
