"""Triton kernels for the fused ops.

Each op named in ``IMPLEMENTED_OPS`` is a function with the same signature as the op's
``torch`` backend in :mod:`fastpe.ops`; :func:`fastpe.backends.fused_implementation` finds it here.
"""

IMPLEMENTED_OPS: tuple[str, ...] = ()
