"""bfloat16 dots under TRITON_INTERPRET=1.

Triton's interpreter (3.6) holds bf16 tensors as their raw 16 bits (uint16) and its ``tl.dot``
multiplies those integers as numbers; every other bf16 operation the kernels use converts the
bits properly. :func:`enable` makes the interpreter's dot take bf16 operands as the float32 values
they hold (exact: a bf16 is the top half of a float32), so the bf16 kernels, the dtype the GPU
benchmarks run, can be tested on the CPU too.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interpreter

_create_dot = _interpreter.InterpreterBuilder.create_dot


def _as_float32(h):
    if h.dtype != tl.bfloat16:
        return h
    return _interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return _create_dot(self, _as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)


def enable(monkeypatch) -> None:
    monkeypatch.setattr(_interpreter.InterpreterBuilder, "create_dot", _bf16_dot)
