"""Every encoding of the study by name.

``positional_encoding(name, d_model, ...)`` returns the module that implements the named encoding:
an input encoding (``kind == "input"``, applied to ``x [B, L, d]`` before the encoder) or a
self-attention layer (``kind == "attention"``, used in place of ``nn.MultiheadAttention``).
A model that supports every encoding asks for both pieces:

    enc = fastpe.input_encoding(name, d, max_len)                  # identity for rmha-k / rope
    layers = [fastpe.attention_layer(name, d, heads) for _ in range(n_blocks)]
"""

from __future__ import annotations

import re

from torch import nn

from fastpe.nn.attention import (
    MultiheadAttention,
    RelativeMultiheadAttention,
    RotaryMultiheadAttention,
    TimeIntervalMultiheadAttention,
)
from fastpe.nn.encodings import ConcatEncoding, LearntEncoding, NoEncoding, RotatoryEncoding, SinusoidalEncoding

ENCODINGS = ("none", "abs", "learnt", "abs+con", "learnt+con", "rotatory", "rotatory+con", "rmha-4", "rope")
"""The encodings of the study. ``rmha-<k>`` works for any clipping distance ``k``. Beyond the study:
``tisas`` (TiSASRec's time-interval attention, K = 256; ``tisas-<K>`` for another time span), an
attention encoding whose layers also take the timestamps."""

_INPUT = {"none": NoEncoding, "abs": SinusoidalEncoding, "learnt": LearntEncoding, "rotatory": RotatoryEncoding}
_RMHA = re.compile(r"rmha-(\d+)$")
_TISAS = re.compile(r"tisas(?:-(\d+))?$")
TISAS_DEFAULT_SPAN = 256  # TiSASRec's time span K


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"encoding name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _INPUT or key == "rope" or _RMHA.match(key) or _TISAS.match(key) or \
            (key.endswith("+con") and key[:-4] in ("abs", "learnt", "rotatory")):
        return key
    raise ValueError(f"unknown positional encoding {name!r}; expected one of {', '.join(ENCODINGS)} (or rmha-<k>, "
                     "tisas, tisas-<K>)")


def encoding_kind(name: str) -> str:
    """``"attention"`` for encodings inside self-attention (rmha-k, rope, tisas), else ``"input"``."""
    key = _canonical(name)
    return "attention" if key == "rope" or _RMHA.match(key) or _TISAS.match(key) else "input"


def needs_timestamps(name: str) -> bool:
    """Whether the encoding's attention layers take the timestamps of the sequence (tisas)."""
    return bool(_TISAS.match(_canonical(name)))


def input_encoding(name: str, d_model: int, max_len: int = 512, **options) -> nn.Module:
    """The module applied to ``x [B, L, d]`` before the encoder (the identity for attention encodings).

    Options go to the encoding's class: ``reverse`` for every table, ``mode``/``angle_scale`` for
    rotatory, ``base`` for abs, ``backend`` for the fused ones.
    """
    key = _canonical(name)
    if encoding_kind(key) == "attention":
        return NoEncoding(d_model, max_len)
    if key.endswith("+con"):
        return ConcatEncoding(d_model, max_len, table=key[:-4], **options)
    return _INPUT[key](d_model, max_len, **options)


def attention_layer(name: str, embed_dim: int, num_heads: int = 1, dropout: float = 0.0, **options) -> nn.Module:
    """The self-attention layer the encoding needs (plain attention for input encodings).

    Options go to the layer's class: ``per_head_tables`` for rmha-k; ``base``, ``interleaved``,
    ``learnable``, ``max_len`` for rope; ``time_unit``, ``max_len``, ``per_head_tables``,
    ``position_tables`` for tisas; ``bias``, ``batch_first``, ``backend`` for all.
    """
    key = _canonical(name)
    tisas = _TISAS.match(key)
    if tisas:
        span = int(tisas.group(1)) if tisas.group(1) else TISAS_DEFAULT_SPAN
        return TimeIntervalMultiheadAttention(embed_dim, num_heads, dropout, time_span=span, **options)
    match = _RMHA.match(key)
    if match:
        return RelativeMultiheadAttention(embed_dim, num_heads, dropout, max_distance=int(match.group(1)), **options)
    if key == "rope":
        return RotaryMultiheadAttention(embed_dim, num_heads, dropout, **options)
    return MultiheadAttention(embed_dim, num_heads, dropout, **options)


def positional_encoding(name: str, d_model: int, *, max_len: int = 512, num_heads: int = 1, dropout: float = 0.0, **options) -> nn.Module:
    """The module implementing the named encoding: an input encoding or an attention layer
    (see the module docstring); ``module.kind`` says which."""
    if encoding_kind(name) == "attention":
        if (_canonical(name) == "rope" and options.get("learnable") == "angles") or needs_timestamps(name):
            options.setdefault("max_len", max_len)
        return attention_layer(name, d_model, num_heads, dropout, **options)
    return input_encoding(name, d_model, max_len, **options)
