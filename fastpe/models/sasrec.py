"""A SASRec-style baseline (Kang & McAuley, 2018) with any positional encoding of the study.

Item id embedding scaled by ``sqrt(d)``, a positional encoding, causal pre-LN self-attention
blocks, a final LayerNorm; the score of a candidate is the dot product of the hidden state with
the candidate's (unscaled) embedding from the same table. Ids only: item attributes and context
are not used.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpe.models.blocks import ItemRepresentation, SequenceEncoder


class SASRec(nn.Module):
    def __init__(
        self,
        n_items: int,
        d_model: int = 64,
        n_blocks: int = 2,
        n_heads: int = 1,
        dropout: float = 0.2,
        max_len: int = 50,
        encoding: str = "learnt",
        residual: str = "add",
        ffn_mult: int = 1,
        activation: str = "gelu",
        rope_base: float = 1000.0,
        backend: str = "auto",
        causal: bool = True,
        **unused,
    ):
        super().__init__()
        self.n_items = n_items
        self.d_model = d_model
        self.causal = causal
        self.context_dim = 0
        self.items = ItemRepresentation(n_items, d_model)
        self.encoder = SequenceEncoder(encoding, d_model, n_blocks, n_heads, dropout, max_len, causal, residual,
                                       ffn_mult * d_model, activation, rope_base, backend)

    @property
    def needs_timestamps(self) -> bool:
        """Whether ``encode`` needs the interactions' timestamps (the tisas encoding)."""
        return self.encoder.needs_timestamps

    def encode(self, items: torch.Tensor, context: torch.Tensor | None = None,
               padding_mask: torch.Tensor | None = None,
               timestamps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        padding = items == 0 if padding_mask is None else padding_mask
        return self.encoder(self.items(items), padding, timestamps), padding

    def score(self, profile: torch.Tensor, padding: torch.Tensor, candidates: torch.Tensor,
              candidate_context: torch.Tensor | None = None, per_position: bool = False,
              item_table: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, N]``: slot ``t`` uses the hidden state at position ``t`` (``per_position``,
        ``T = L``) or every slot uses the most recent position (the last one)."""
        b, t, n = candidates.shape
        if per_position:
            if not self.causal:
                raise ValueError("per_position scoring needs a causal encoder")
            if t != profile.shape[1]:
                raise ValueError(f"per_position scoring needs one candidate slot per position, got T={t}, L={profile.shape[1]}")
            state = profile
        else:
            state = profile[:, -1:].expand(b, t, self.d_model)
        emb = item_table[candidates] if item_table is not None else self.items.embedding(candidates)
        return torch.einsum("btd,btnd->btn", state, emb.to(state.dtype))

    def candidate_table(self) -> torch.Tensor:
        """The item embeddings the scores are dot products with, for ``score(item_table=...)``."""
        return self.items.embedding.weight

    def forward(self, items, context, candidates, candidate_context=None, per_position: bool = False,
                timestamps=None):
        profile, padding = self.encode(items, context, timestamps=timestamps)
        return self.score(profile, padding, candidates, candidate_context, per_position)
