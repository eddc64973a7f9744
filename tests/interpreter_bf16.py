"""bfloat16 under TRITON_INTERPRET=1.

Triton's interpreter (3.6) holds bf16 tensors as their raw 16 bits (uint16). Its ``tl.dot``
multiplies those integers as numbers, and its conversions between bf16 and integers or booleans
convert the integers to bits (``True`` became the bf16 0x0001, about 9e-41); conversions to and
from float32 and float16 are right. :func:`enable` makes the dot take bf16 operands as the float32
values they hold (exact: a bf16 is the top half of a float32) and the integer conversions go
through float32, so the bf16 kernels, the dtype the GPU benchmarks run, can be tested on the CPU.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interpreter

_create_dot = _interpreter.InterpreterBuilder.create_dot
_cast = _interpreter.InterpreterBuilder.cast_impl


def _as_float32(h):
    if h.dtype != tl.bfloat16:
        return h
    return _interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return _create_dot(self, _as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)


def _bf16_cast(self, src, dst_type):
    """Between bf16 and integers (or booleans) through float32, whose conversions are right."""
    ends = (src.dtype.scalar, dst_type.scalar)
    if tl.bfloat16 in ends and ends[0] != ends[1] and not any(t.is_floating() for t in ends if t != tl.bfloat16):
        return _cast(self, _cast(self, src, tl.float32), dst_type)
    return _cast(self, src, dst_type)


def enable(monkeypatch) -> None:
    monkeypatch.setattr(_interpreter.InterpreterBuilder, "create_dot", _bf16_dot)
    monkeypatch.setattr(_interpreter.InterpreterBuilder, "cast_impl", _bf16_cast)
