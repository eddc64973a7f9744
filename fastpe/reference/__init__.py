"""Plain PyTorch definitions of every op: the oracle the tests compare the fast paths against.

Nothing here may import a fast path (ops, kernels, the extension)."""

from fastpe.reference.concat_projection import concat_projection_reference
from fastpe.reference.relative_attention import (
    bucketed_attention_reference,
    relative_attention_direct_port,
    relative_attention_reference,
    time_interval_attention_materialized,
    time_interval_attention_reference,
    time_interval_buckets_reference,
)
from fastpe.reference.rotary import rotary_reference, rotatory_add_reference, rotatory_code

__all__ = [
    "bucketed_attention_reference",
    "concat_projection_reference",
    "relative_attention_direct_port",
    "relative_attention_reference",
    "rotary_reference",
    "rotatory_add_reference",
    "rotatory_code",
    "time_interval_attention_materialized",
    "time_interval_attention_reference",
    "time_interval_buckets_reference",
]
