"""Stand-ins for a model's absolute position embedding, chosen by encoding.

SASRec-style code (RecBole's SASRec and BERT4Rec, SASRec.pytorch) builds its input as
``item_emb(ids) + position_embedding(position_ids)`` with ``position_embedding`` an
``nn.Embedding``. Patching swaps that embedding for a module with the same call:

* ``rmha-k``, ``rope`` (positions live in attention) and ``none``: :class:`ZeroPositionEmbedding`,
  which returns zeros, so the sum is the item embedding unchanged;
* ``learnt``: the model's own ``nn.Embedding`` is kept (it is a learnt absolute table);
* ``abs``, ``rotatory`` (``mode="add"``): :class:`AdditivePositionEmbedding`, the fastpe table's
  rows for the ids the model passes.

The other encodings (``*+con``, rotatory with ``mode="rotate"``) are functions of the item
embedding, not terms added to it, and cannot stand in for an embedding lookup.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpe.nn import RotatoryEncoding, SinusoidalEncoding, encoding_kind

_ADDITIVE = {"abs": SinusoidalEncoding, "rotatory": RotatoryEncoding}


class ZeroPositionEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim)``'s call, returning zeros: the model's
    ``item_emb + position_embedding(ids)`` becomes the item embedding alone. No parameters."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # Empty, but follows .to(dtype/device), so the zeros match the model's dtype.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*ids.shape, self.embedding_dim), dtype=self.anchor.dtype, device=ids.device)


class AdditivePositionEmbedding(nn.Module):
    """Rows of a fastpe position table (``abs`` or ``rotatory``) looked up like ``nn.Embedding``.

    Position id ``p`` gets row ``p`` of the table (``num_embeddings`` rows); ids equal to
    ``padding_idx`` get zeros, as ``nn.Embedding(padding_idx=...)`` does.
    """

    def __init__(self, encoding: str, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **options):
        super().__init__()
        if encoding not in _ADDITIVE:
            raise ValueError(f"AdditivePositionEmbedding: encoding must be one of {sorted(_ADDITIVE)}, got {encoding!r}")
        if options.get("mode", "add") != "add":
            raise ValueError("AdditivePositionEmbedding: rotatory must use mode='add' (mode='rotate' is not a term added to x)")
        if "reverse" in options:
            raise ValueError(
                "AdditivePositionEmbedding: 'reverse' does not apply here: the model computes the position ids it passes"
            )
        self.encoding_name = encoding
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.options = dict(options)
        self.encoding = _ADDITIVE[encoding](embedding_dim, num_embeddings, **options)

    def extra_repr(self) -> str:
        return f"{self.encoding_name!r}, {self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"

    def config(self) -> dict:
        return {
            "encoding": self.encoding_name, "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx, **self.options,
        }

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.encoding.table()[ids]
        if self.padding_idx is not None:
            codes = codes.masked_fill((ids == self.padding_idx).unsqueeze(-1), 0.0)
        return codes


def replacement(encoding: str, embedding: nn.Module, **options) -> nn.Module:
    """The module that takes the place of ``embedding`` (an ``nn.Embedding`` of position ids)
    for ``encoding``: may be ``embedding`` itself (``learnt``)."""
    kind = encoding_kind(encoding)
    key = encoding.strip().lower()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"expected the model's position embedding to be an nn.Embedding, got {type(embedding).__name__}")
    rows, dim = embedding.num_embeddings, embedding.embedding_dim
    if kind == "attention" or key == "none":
        return ZeroPositionEmbedding(rows, dim)
    if key == "learnt":
        if options:
            raise ValueError(f"'learnt' keeps the model's own position embedding and takes no options, got {sorted(options)}")
        return embedding
    if key in _ADDITIVE and options.get("mode", "add") == "add":
        return AdditivePositionEmbedding(key, rows, dim, embedding.padding_idx, **options)
    raise ValueError(
        f"encoding {encoding!r} is not a term added to the item embedding (it projects or rotates it), so it "
        f"cannot take the place of the model's position embedding; use one of none, abs, learnt, rotatory "
        f"(mode='add'), rmha-<k>, rope, or apply fastpe.input_encoding({encoding!r}, ...) to the item "
        f"embeddings in the model's own code"
    )


__all__ = ["AdditivePositionEmbedding", "ZeroPositionEmbedding", "replacement"]
