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

import math

import torch
from torch import nn

from fastpe.nn import RotatoryEncoding, SinusoidalEncoding, encoding_kind

_ADDITIVE = {"abs": SinusoidalEncoding, "rotatory": RotatoryEncoding}


class ZeroPositionEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim)``'s call, returning zeros: the model's
    ``item_emb + position_embedding(ids)`` becomes the item embedding alone.

    No parameters. ``weight`` is the all-zero table ``[num_embeddings, embedding_dim]`` (a buffer,
    saved in the state dict), so host code that touches ``pos_emb.weight`` still runs and the
    state dict loads into the unpatched model, which then computes the same. Loading a table that
    is not all zeros into it raises: that is a learnt table, which this module would ignore.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # Follows .to(dtype/device), so the zeros match the model's dtype.
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        table = state_dict.get(prefix + "weight")
        if table is not None and bool(table.count_nonzero()):
            error_msgs.append(
                f"{prefix}weight: the checkpoint holds a non-zero position table, but this model was patched to add "
                f"no absolute position there; load the checkpoint into the unpatched model first, then patch it"
            )
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        elif table is None:  # checkpoints written before the table was saved
            state_dict = {**state_dict, prefix + "weight": self.weight}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*ids.shape, self.embedding_dim), dtype=self.weight.dtype, device=ids.device)


class AdditivePositionEmbedding(nn.Module):
    """Rows of a fastpe position table (``abs`` or ``rotatory``) looked up like ``nn.Embedding``.

    Position id ``p`` gets ``scale`` times row ``p`` of the table (``num_embeddings`` rows); ids
    equal to ``padding_idx`` get zeros, as ``nn.Embedding(padding_idx=...)`` does. Both tables
    have root-mean-square ``1/sqrt(2)`` at ``scale=1`` (each pair is a sine and a cosine), so
    ``scale = rms / sqrt(1/2)`` gives codes of root-mean-square ``rms``: :func:`replacement`
    matches the table the module replaces.

    ``weight`` is the table it adds (computed). The state dict holds it, under the name the
    replaced ``nn.Embedding`` had, so a patched ``abs`` model's state dict loads into the unpatched
    model, which then starts from the same codes; loading restores ``scale`` from it, and loading a
    table that is not ``abs``'s (a learnt one) into an ``abs`` module raises.
    """

    def __init__(self, encoding: str, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 scale: float = 1.0, **options):
        super().__init__()
        if encoding not in _ADDITIVE:
            raise ValueError(f"AdditivePositionEmbedding: encoding must be one of {sorted(_ADDITIVE)}, got {encoding!r}")
        if options.get("mode", "add") != "add":
            raise ValueError("AdditivePositionEmbedding: rotatory must use mode='add' (mode='rotate' is not a term added to x)")
        if "reverse" in options:
            raise ValueError(
                "AdditivePositionEmbedding: 'reverse' does not apply here: the model computes the position ids it passes"
            )
        scale = float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"AdditivePositionEmbedding: scale must be a positive finite number, got {scale}")
        self.encoding_name = encoding
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.options = dict(options)
        self.encoding = _ADDITIVE[encoding](embedding_dim, num_embeddings, **options)
        self.scale = scale

    def extra_repr(self) -> str:
        return (f"{self.encoding_name!r}, {self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"scale={self.scale:.4g}")

    def config(self) -> dict:
        return {
            "encoding": self.encoding_name, "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx, "scale": self.scale,
            **self.options,
        }

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    @property
    def weight(self) -> torch.Tensor:
        """The table added, ``[num_embeddings, embedding_dim]`` (a computed tensor: writing into it changes nothing)."""
        table = self.encoding.table() * self.scale
        if self.padding_idx is not None:
            table = table.index_fill(0, torch.tensor([self.padding_idx], device=table.device), 0.0)
        return table

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        table = state_dict.get(prefix + "weight")
        if table is not None:
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
            # The table carries its scale (every row of rotatory's has mean square 1/2 whatever its
            # angles); a model patched afresh matched a different host table, so its scale can differ.
            if table.shape != (self.num_embeddings, self.embedding_dim):
                error_msgs.append(f"{prefix}weight: expected a table of shape {(self.num_embeddings, self.embedding_dim)}, "
                                  f"got {tuple(table.shape)}")
            else:
                self.scale = _rms(table, self.padding_idx) / _rms(self.encoding.table().detach(), self.padding_idx)
                # rotatory's table follows its angles, loaded after this call: only abs's can be checked here.
                own = self.weight.detach()
                if self.encoding_name == "abs" and not torch.allclose(table.to(own), own, rtol=1e-4, atol=1e-6):
                    error_msgs.append(
                        f"{prefix}weight: the checkpoint's position table is not a sinusoidal table (a learnt one?); "
                        f"load the checkpoint into the unpatched model first, then patch it"
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.encoding.table()[ids] * self.scale
        if self.padding_idx is not None:
            codes = codes.masked_fill((ids == self.padding_idx).unsqueeze(-1), 0.0)
        return codes


def _rms(table: torch.Tensor, padding_idx: int | None) -> float:
    """Root-mean-square of a position table, its padding row left out."""
    table = table.detach().double()
    if padding_idx is not None and table.shape[0] > 1:
        table = torch.cat([table[:padding_idx], table[padding_idx + 1:]])
    return table.square().mean().sqrt().item()


def replacement(encoding: str, embedding: nn.Module, **options) -> nn.Module:
    """The module that takes the place of ``embedding`` (an ``nn.Embedding`` of position ids)
    for ``encoding``: may be ``embedding`` itself (``learnt``).

    ``abs`` and ``rotatory`` take ``scale``: ``"match"`` (default) scales the codes to the
    root-mean-square of ``embedding``'s table as it is now (padding row left out), so they enter
    the model at the size its own position codes had; a number multiplies the unit codes (``1``:
    fastpe's plain table, root-mean-square ``1/sqrt(2)``)."""
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
        scale = options.pop("scale", "match")
        match = isinstance(scale, str) and scale == "match"
        module = AdditivePositionEmbedding(key, rows, dim, embedding.padding_idx, scale=1.0 if match else scale, **options)
        if match:
            target = _rms(embedding.weight, embedding.padding_idx)
            if not target > 0:
                raise ValueError("scale='match': the model's position table is all zeros; pass scale=<number>")
            module.scale = target / _rms(module.weight, embedding.padding_idx)
        return module
    raise ValueError(
        f"encoding {encoding!r} is not a term added to the item embedding (it projects or rotates it), so it "
        f"cannot take the place of the model's position embedding; use one of none, abs, learnt, rotatory "
        f"(mode='add'), rmha-<k>, rope, or apply fastpe.input_encoding({encoding!r}, ...) to the item "
        f"embeddings in the model's own code"
    )


__all__ = ["AdditivePositionEmbedding", "ZeroPositionEmbedding", "replacement"]
