"""Drop-in ``nn.Module``s: positional encodings and self-attention layers."""

from fastpe.nn.attention import (
    MultiheadAttention,
    RelativeMultiheadAttention,
    RotaryMultiheadAttention,
    TimeIntervalMultiheadAttention,
)
from fastpe.nn.encodings import (
    ConcatEncoding,
    LearntEncoding,
    NoEncoding,
    PositionalEncoding,
    RotatoryEncoding,
    SinusoidalEncoding,
)
from fastpe.nn.factory import ENCODINGS, attention_layer, encoding_kind, input_encoding, positional_encoding

__all__ = [
    "ENCODINGS",
    "ConcatEncoding",
    "LearntEncoding",
    "MultiheadAttention",
    "NoEncoding",
    "PositionalEncoding",
    "RelativeMultiheadAttention",
    "RotaryMultiheadAttention",
    "RotatoryEncoding",
    "SinusoidalEncoding",
    "TimeIntervalMultiheadAttention",
    "attention_layer",
    "encoding_kind",
    "input_encoding",
    "positional_encoding",
]
