"""bfloat16 under TRITON_INTERPRET=1.

Triton's interpreter (3.6) holds bf16 tensors as their raw 16 bits (uint16). Its ``tl.dot``
multiplies those integers as numbers, and its conversions between bf16 and integers or booleans
convert the integers to bits (``True`` became the bf16 0x0001, about 9e-41); conversions to and
from float32 and float16 are right. :func:`enable` makes the dot take bf16 operands as the float32
values they hold (exact: a bf16 is the top half of a float32) and the integer conversions go
through float32, so the bf16 kernels, the dtype the GPU benchmarks run, can be tested on the CPU.
"""

from __future__ import annotations

import triton.language as tl
from triton.runtime import interpreter as _interpreter

_create_dot = _interpreter.InterpreterBuilder.create_dot
_cast = _interpreter.InterpreterBuilder.cast_impl


def _bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    a, b = (_cast(self, x, tl.float32) if x.dtype == tl.bfloat16 else x for x in (a, b))
    return _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


def _bf16_cast(self, src, dst_type):
    """Between bf16 and integers (or booleans) through float32, whose conversions are right."""
    src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
    other = dst_ty if src_ty == tl.bfloat16 else src_ty if dst_ty == tl.bfloat16 else None
    if other is not None and not other.is_floating():
        return _cast(self, _cast(self, src, tl.float32), dst_type)
    return _cast(self, src, dst_type)


def enable(monkeypatch) -> None:
    monkeypatch.setattr(_interpreter.InterpreterBuilder, "create_dot", _bf16_dot)
    monkeypatch.setattr(_interpreter.InterpreterBuilder, "cast_impl", _bf16_cast)
