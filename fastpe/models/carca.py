"""CARCA (Rashed, Elsayed, Schmidt-Thieme, RecSys 2022) with any positional encoding of the study.

Profile: item id embedding (scaled by ``sqrt(d)``) fused with item attributes and the context
(time features) of each interaction, a positional encoding, self-attention blocks (bidirectional by
default, causal optionally; CARCA's multiplicative residual by default), a final LayerNorm.
Scoring: each candidate item (embedded with the same fusion and the context of the request, and
*no* positional code) attends to the profile; the attended vector is multiplied by the
candidate's own representation (CARCA's multiplicative residual; "add"/"none" optional) and a
linear layer gives one logit per candidate.

``next_slot=True`` appends a learned vector after the most recent item, a slot for the item to
predict (as BERT4Rec's mask token at the end of the sequence). It goes through the encoder with a
position like any item, so an encoding that acts only inside self-attention (``rope``, ``rmha-k``)
can gather "the item two steps back" into it; candidates, still without a position, find the slot
by its content. Without the slot such encodings reshape the profile's attention but the
position-free cross-attention cannot tell which profile row is the most recent.

Batches are left-padded (most recent item last), item id 0 is padding; a fully padded profile
gives finite logits.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpe.models.blocks import ItemRepresentation, SequenceEncoder
from fastpe.nn.attention import MultiheadAttention


class CARCA(nn.Module):
    def __init__(
        self,
        n_items: int,
        d_model: int = 64,
        n_blocks: int = 2,
        n_heads: int = 1,
        dropout: float = 0.2,
        max_len: int = 50,
        encoding: str = "none",
        item_features: torch.Tensor | None = None,
        context_dim: int = 0,
        fusion_dim: int | None = None,
        causal: bool = False,
        residual: str = "mul",
        cross_residual: str = "mul",
        ffn_mult: int = 1,
        activation: str = "gelu",
        rope_base: float = 1000.0,
        backend: str = "auto",
        next_slot: bool = False,
    ):
        super().__init__()
        if next_slot and causal:
            raise ValueError("next_slot is for a bidirectional encoder: a causal one reads every position's own "
                             "next item")
        if cross_residual not in ("mul", "add", "none"):
            raise ValueError(f"cross_residual must be 'mul', 'add' or 'none', got {cross_residual!r}")
        self.n_items = n_items
        self.d_model = d_model
        self.causal = causal
        self.cross_residual = cross_residual
        self.items = ItemRepresentation(n_items, d_model, item_features, context_dim, fusion_dim)
        self.next_slot = nn.Parameter(torch.randn(d_model)) if next_slot else None
        self.max_len = max_len
        self.encoder = SequenceEncoder(encoding, d_model, n_blocks, n_heads, dropout, max_len + int(next_slot), causal,
                                       residual, ffn_mult * d_model, activation, rope_base, backend)
        # Plain attention: candidates are not part of the sequence and get no positional code.
        self.cross = MultiheadAttention(d_model, n_heads, dropout)
        self.out = nn.Linear(d_model, 1)

    @property
    def context_dim(self) -> int:
        return self.items.context_dim

    @property
    def needs_timestamps(self) -> bool:
        """Whether ``encode`` needs the interactions' timestamps (the tisas encoding)."""
        return self.encoder.needs_timestamps

    def encode(self, items: torch.Tensor, context: torch.Tensor | None = None,
               padding_mask: torch.Tensor | None = None,
               timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Profile ``[B, L, d]`` and its padding mask ``[B, L]`` (True = padding, default ``items == 0``).
        ``timestamps [B, L]``: the time of each interaction, for time-aware encodings (tisas)."""
        padding = items == 0 if padding_mask is None else padding_mask
        x = self.items(items, context)
        if self.next_slot is not None:
            if items.shape[1] > self.max_len:
                raise ValueError(f"sequence length {items.shape[1]} exceeds max_len={self.max_len}")
            x = torch.cat([x, self.next_slot.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
            padding = torch.cat([padding, padding.new_zeros(padding.shape[0], 1)], dim=1)
            if timestamps is not None:  # the slot comes after the most recent interaction, at its time
                timestamps = torch.cat([timestamps, timestamps[:, -1:]], dim=1)
        return self.encoder(x, padding, timestamps), padding

    def score(self, profile: torch.Tensor, padding: torch.Tensor, candidates: torch.Tensor,
              candidate_context: torch.Tensor | None = None, per_position: bool = False,
              item_table: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, N]`` of candidates ``[B, T, N]``.

        ``per_position=False``: every candidate attends to the whole profile (evaluation, and
        training on a held-out next item). ``per_position=True`` (causal encoders only): ``T = L``
        and the candidates of slot ``t`` attend to profile positions ``<= t`` only, so that every
        position of a sequence is a training example without seeing its target.
        ``candidate_context`` ``[B, T, C]`` is the context of the request, shared by its candidates.
        ``item_table`` (``self.candidate_table()``, computed once) makes scoring many candidates
        per request cheap; the result is the same up to rounding.
        """
        b, t, n = candidates.shape
        length = profile.shape[1]
        if self.context_dim and candidate_context is None:
            raise ValueError(f"this model was built with {self.context_dim} context features; pass candidate_context")
        if item_table is not None:
            query = item_table[candidates] + self.items.context_term(candidate_context).unsqueeze(-2)
        else:
            ctx = None
            if self.context_dim:
                ctx = candidate_context.unsqueeze(2).expand(b, t, n, self.context_dim)
            query = self.items(candidates, ctx)
        query = query.reshape(b, t * n, self.d_model)
        attn_mask = None
        if per_position:
            if not self.causal:
                raise ValueError("per_position scoring needs a causal encoder: a bidirectional profile has already "
                                 "seen the items after each position")
            if t != length:
                raise ValueError(f"per_position scoring needs one candidate slot per position, got T={t}, L={length}")
            slot = torch.arange(t, device=profile.device).repeat_interleave(n)
            attn_mask = torch.arange(length, device=profile.device)[None, :] > slot[:, None]
        attended, _ = self.cross(query, profile, profile, key_padding_mask=padding, attn_mask=attn_mask,
                                 need_weights=False)
        if self.cross_residual == "mul":
            attended = attended * query
        elif self.cross_residual == "add":
            attended = attended + query
        return self.out(attended).reshape(b, t, n)

    def candidate_table(self) -> torch.Tensor:
        """The per-item part of every candidate's representation, for ``score(item_table=...)``."""
        return self.items.item_table()

    def forward(self, items, context, candidates, candidate_context=None, per_position: bool = False,
                timestamps=None):
        profile, padding = self.encode(items, context, timestamps=timestamps)
        return self.score(profile, padding, candidates, candidate_context, per_position)
