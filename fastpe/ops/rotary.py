"""Rotary (RoPE) and Rotatory: functional API, input checks, the ``torch`` backends.

See :mod:`fastpe.reference.rotary` for the math and shapes.
"""

from __future__ import annotations

import torch

from fastpe._validation import check_float, check_positions, check_same_device
from fastpe.ops._dispatch import implementation
from fastpe.reference.rotary import gather_rows, rotary_reference, rotatory_add_reference


def rotary_torch(x, angles, positions=None, interleaved=True):
    """``x * cos + rotate_pairs(x) * sin`` with cos/sin computed once per position, in float32
    at least (float64 inputs keep float64)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    theta = gather_rows(angles, positions, x.shape[1]).to(compute_dtype).unsqueeze(-2)  # [.., L, 1, D/2]
    cos, sin = torch.cos(theta), torch.sin(theta)
    if interleaved:
        cos = cos.repeat_interleave(2, dim=-1).to(x.dtype)
        sin = sin.repeat_interleave(2, dim=-1).to(x.dtype)
        swapped = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        cos = torch.cat((cos, cos), dim=-1).to(x.dtype)
        sin = torch.cat((sin, sin), dim=-1).to(x.dtype)
        half = x.shape[-1] // 2
        swapped = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * sin


# Adding a per-position code is already a single broadcast add: the plain form is the efficient one.
rotatory_add_torch = rotatory_add_reference


def _check_angles(angles: torch.Tensor, pairs: int, name: str = "angles") -> None:
    check_float(angles, name, 2, f"[max_len, {pairs}]")
    if angles.shape[1] != pairs:
        raise ValueError(f"{name}: expected {pairs} angles per position (half the feature size), got shape {tuple(angles.shape)}")


def rotary(
    x: torch.Tensor,
    angles: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate feature pairs of ``x`` by per-position angles (RoPE, or learnable angles).

    Args:
        x: ``[B, L, H, D]`` (any strides, e.g. a transposed ``[B, H, L, D]`` view) or ``[B, L, D]``.
        angles: ``[max_len, D/2]``; gradients flow into it when it requires grad.
        positions: None (0..L-1), ``[L]`` or ``[B, L]`` rows of ``angles``.
        interleaved: pair ``(2m, 2m+1)`` (GPT-J style) instead of ``(m, m + D/2)`` (GPT-NeoX style).
    """
    check_float(x, "x", (3, 4), "[B, L, H, D] or [B, L, D]")
    if x.shape[-1] % 2:
        raise ValueError(f"x: the feature size must be even to form pairs, got shape {tuple(x.shape)}")
    _check_angles(angles, x.shape[-1] // 2)
    check_same_device(x=x, angles=angles, positions=positions)
    check_positions(positions, x.shape[0], x.shape[1], angles.shape[0])
    fn = implementation("rotary", backend, x.device, rotary_reference, rotary_torch)
    if x.dim() == 3:
        return fn(x.unsqueeze(2), angles, positions, interleaved).squeeze(2)
    return fn(x, angles, positions, interleaved)


def rotatory(
    x: torch.Tensor,
    angles: torch.Tensor,
    *,
    mode: str = "add",
    positions: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The study's Rotatory encoding with learnable angles ``[max_len, d/2]`` on ``x [B, L, d]``.

    ``mode="add"`` adds the code ``((-1)^j sin t, cos t)`` to each pair; ``mode="rotate"`` rotates
    each pair ``(x_2j, x_2j+1)`` by its angle.
    """
    check_float(x, "x", 3, "[B, L, d]")
    if x.shape[-1] % 2:
        raise ValueError(f"x: the feature size d must be even, got shape {tuple(x.shape)}")
    if mode == "rotate":
        return rotary(x, angles, positions=positions, interleaved=True, backend=backend)
    if mode != "add":
        raise ValueError(f"mode must be 'add' or 'rotate', got {mode!r}")
    _check_angles(angles, x.shape[-1] // 2)
    check_same_device(x=x, angles=angles, positions=positions)
    check_positions(positions, x.shape[0], x.shape[1], angles.shape[0])
    fn = implementation("rotatory_add", backend, x.device, rotatory_add_reference, rotatory_add_torch)
    return fn(x, angles, positions)
