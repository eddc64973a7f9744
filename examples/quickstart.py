"""Every encoding of the study in a small self-attention encoder, on a padded batch.

    python examples/quickstart.py
"""

import torch
from torch import nn

import fastpe


class Encoder(nn.Module):
    """Item embeddings -> positional encoding -> one pre-LN self-attention block."""

    def __init__(self, encoding: str, n_items: int = 100, d: int = 32, heads: int = 2, max_len: int = 20):
        super().__init__()
        self.items = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.position = fastpe.input_encoding(encoding, d, max_len=max_len)  # identity for rmha-k / rope
        self.norm = nn.LayerNorm(d)
        self.attention = fastpe.attention_layer(encoding, d, heads, dropout=0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == 0
        x = self.position(self.items(ids) * self.items.embedding_dim**0.5, padding_mask=padding)
        h = self.norm(x)
        out, _ = self.attention(h, h, h, key_padding_mask=padding, need_weights=False)
        return (x + out).masked_fill(padding[..., None], 0.0)


if __name__ == "__main__":
    torch.manual_seed(0)
    ids = torch.randint(1, 101, (4, 12))
    ids[0, :5] = 0  # left padding
    ids[1] = 0  # a fully padded sequence: zeros, never NaN
    for name in fastpe.ENCODINGS:
        model = Encoder(name)
        out = model(ids)
        out.sum().backward()
        print(f"{name:13s} output {tuple(out.shape)}  finite={bool(torch.isfinite(out).all())}  "
              f"params={sum(p.numel() for p in model.parameters())}")
