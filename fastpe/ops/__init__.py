"""Functional API of the fused ops, each with a ``backend=`` argument (see :mod:`fastpe.backends`)."""

from fastpe.ops.concat_projection import concat_projection
from fastpe.ops.relative_attention import bucketed_attention, relative_attention, time_interval_attention
from fastpe.ops.rotary import rotary, rotatory

__all__ = ["bucketed_attention", "concat_projection", "relative_attention", "rotary", "rotatory", "time_interval_attention"]
