"""One small instance of every fastpe module (each encoding, each attention layer, notable options),
with inputs and masks, shared by the compile, export and save/load tests."""

from __future__ import annotations

import torch

import fastpe

B, L, D, H, MAX_LEN = 3, 7, 8, 2, 16


def input_encodings() -> dict[str, torch.nn.Module]:
    names = ("none", "abs", "learnt", "abs+con", "learnt+con", "rotatory", "rotatory+con")
    mods = {name: fastpe.input_encoding(name, D, MAX_LEN) for name in names}
    mods["rotatory-rotate-reverse"] = fastpe.RotatoryEncoding(D, MAX_LEN, mode="rotate", reverse=True)
    mods["abs-reverse"] = fastpe.SinusoidalEncoding(D, MAX_LEN, reverse=True, base=1000.0)
    return mods


def attention_layers() -> dict[str, torch.nn.Module]:
    return {
        "mha": fastpe.MultiheadAttention(D, H),
        "rmha-4": fastpe.RelativeMultiheadAttention(D, H),
        "rmha-2-per-head": fastpe.RelativeMultiheadAttention(D, H, max_distance=2, per_head_tables=True),
        "rope": fastpe.RotaryMultiheadAttention(D, H, base=1000.0),
        "rope-angles-interleaved": fastpe.RotaryMultiheadAttention(D, H, learnable="angles", interleaved=True, max_len=MAX_LEN),
        "rope-frequencies": fastpe.RotaryMultiheadAttention(D, H, learnable="frequencies"),
        "mha-seq-first": fastpe.MultiheadAttention(D, H, batch_first=False),
        "tisas-5": fastpe.TimeIntervalMultiheadAttention(D, H, time_span=5, max_len=MAX_LEN),
        "tisas-3-shared-days": fastpe.TimeIntervalMultiheadAttention(D, H, time_span=3, max_len=MAX_LEN, time_unit=2.0,
                                                                     per_head_tables=False, position_tables=False),
    }


def all_modules() -> dict[str, torch.nn.Module]:
    return {**input_encodings(), **attention_layers()}


def left_padding(batch: int = B, length: int = L, fully_padded_row: bool = True) -> torch.Tensor:
    """Bool [B, L], True at padding, left-padded; the last sequence all padding when asked."""
    lengths = torch.arange(batch) % length + 1
    mask = torch.arange(length)[None, :] < (length - lengths)[:, None]
    if fully_padded_row:
        mask[-1] = True
    return mask


def timestamps(batch: int, length: int) -> torch.Tensor:
    """Int [B, L] times with uneven gaps that differ per sequence (for time-aware layers)."""
    return torch.arange(length)[None, :] ** 2 * torch.arange(1, batch + 1)[:, None]


def call(module: torch.nn.Module, x: torch.Tensor, pad: torch.Tensor, need_weights: bool = False) -> torch.Tensor:
    """Run any zoo module on ``x [B, L, D]`` with padding ``pad``: encodings get it as padding_mask,
    attention layers as key_padding_mask plus a causal mask (seq-first layers get ``x`` transposed,
    time-aware layers :func:`timestamps`)."""
    if module.kind == "input":
        return module(x, padding_mask=pad)
    length = x.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    seq_first = not module.batch_first
    if seq_first:
        x = x.transpose(0, 1)
    extra = {"timestamps": timestamps(x.shape[0], length)} if getattr(module, "needs_timestamps", False) else {}
    out, _ = module(x, x, x, key_padding_mask=pad, need_weights=need_weights, attn_mask=causal, is_causal=True, **extra)
    return out.transpose(0, 1) if seq_first else out


class Wrapped(torch.nn.Module):
    """A zoo module behind a ``forward(x, pad)`` signature (for export and compile)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return call(self.module, x, pad)
