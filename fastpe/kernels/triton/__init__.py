"""Triton kernels for the fused ops.

Each op named in ``IMPLEMENTED_OPS`` is a function with the same signature as the op's
``torch`` backend in :mod:`fastpe.ops`; :func:`fastpe.backends.fused_implementation` finds it here.
The kernel modules (and triton itself) load on the first call, so that resolving a backend
stays cheap; ``import fastpe`` never imports this package.
"""

IMPLEMENTED_OPS: tuple[str, ...] = ("relative_attention",)


def relative_attention(q, k, v, rel_k, rel_v, key_padding_mask=None, attn_bias=None, is_causal=False,
                       dropout_p=0.0, scale=None):
    from fastpe.kernels.triton._ops import relative_attention as impl

    return impl(q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, is_causal, dropout_p, scale)
