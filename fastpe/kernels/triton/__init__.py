"""Triton kernels for the fused ops.

Each op named in ``IMPLEMENTED_OPS`` is a function with the same signature as the op's
``torch`` backend in :mod:`fastpe.ops`; :func:`fastpe.backends.fused_implementation` finds it here.
The kernel modules (and triton itself) load on the first call, so that resolving a backend
stays cheap; ``import fastpe`` never imports this package.

Modules: ``rmha`` (relative attention), ``interval`` (time-interval attention), ``rotations``
(rotary, rotatory), ``concat`` (concat-projection), ``_ops`` (autograd and ``torch.library``
custom ops), ``_launch`` (launch records, config overrides, the NaN-poison debug switch),
``compile_check`` (compiles every shipped kernel variant for sm_90 without a GPU).
"""

from fastpe.kernels.triton._limits import unsupported_reason  # noqa: F401  (read by backend="auto")

IMPLEMENTED_OPS: tuple[str, ...] = ("relative_attention", "time_interval_attention", "rotary", "rotatory_add",
                                    "concat_projection")


def relative_attention(q, k, v, rel_k, rel_v, key_padding_mask=None, attn_bias=None, is_causal=False,
                       dropout_p=0.0, scale=None):
    from fastpe.kernels.triton._ops import relative_attention as impl

    return impl(q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, is_causal, dropout_p, scale)


def time_interval_attention(q, k, v, rel_k, rel_v, timestamps, time_unit=None, key_padding_mask=None, attn_bias=None,
                            is_causal=False, dropout_p=0.0, scale=None):
    from fastpe.kernels.triton._ops import time_interval_attention as impl

    return impl(q, k, v, rel_k, rel_v, timestamps, time_unit, key_padding_mask, attn_bias, is_causal, dropout_p, scale)


def rotary(x, angles, positions=None, interleaved=True):
    from fastpe.kernels.triton._ops import rotary as impl

    return impl(x, angles, positions, interleaved)


def rotatory_add(x, angles, positions=None):
    from fastpe.kernels.triton._ops import rotatory_add as impl

    return impl(x, angles, positions)


def concat_projection(x, table, weight, bias=None, positions=None):
    from fastpe.kernels.triton._ops import concat_projection as impl

    return impl(x, table, weight, bias, positions)
