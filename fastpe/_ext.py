"""Loader for the compiled CUDA extension (csrc/).

Each op named in ``IMPLEMENTED_OPS`` is a function with the same signature as the op's ``torch``
backend in :mod:`fastpe.ops`.
"""

from __future__ import annotations

IMPLEMENTED_OPS: tuple[str, ...] = ()


def unavailable_reason() -> str | None:
    """None when the extension is loaded and usable, else why it is not."""
    return "fastpe was installed without its CUDA extension, and this version has no CUDA kernels"
