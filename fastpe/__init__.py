"""fastpe: positional encodings for sequential recommendation, with fused GPU kernels.

``import fastpe`` imports only torch: Triton kernels and the CUDA extension load on first use.
"""

from fastpe.backends import BACKENDS, BackendUnavailableError, available_backends
from fastpe.nn import (
    ENCODINGS,
    ConcatEncoding,
    LearntEncoding,
    MultiheadAttention,
    NoEncoding,
    PositionalEncoding,
    RelativeMultiheadAttention,
    RotaryMultiheadAttention,
    RotatoryEncoding,
    SinusoidalEncoding,
    TimeIntervalMultiheadAttention,
    attention_layer,
    encoding_kind,
    input_encoding,
    positional_encoding,
)
from fastpe.ops import bucketed_attention, concat_projection, relative_attention, rotary, rotatory, time_interval_attention
from fastpe.serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ENCODINGS",
    "BackendUnavailableError",
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
    "available_backends",
    "bucketed_attention",
    "concat_projection",
    "encoding_kind",
    "input_encoding",
    "load",
    "positional_encoding",
    "relative_attention",
    "rotary",
    "rotatory",
    "save",
    "time_interval_attention",
]
