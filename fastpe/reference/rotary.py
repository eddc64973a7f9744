"""Rotations of feature pairs by position-dependent angles, written plainly.

``rotary``: RoPE-style rotation. ``x [B, L, H, D]``, ``angles [P, D/2]`` (one angle per pair and
position, shared across heads), ``positions`` None (= 0..L-1), ``[L]`` or ``[B, L]`` rows of
``angles``. Pair ``m`` is ``(x[2m], x[2m+1])`` when ``interleaved`` else ``(x[m], x[m + D/2])``::

    y_a = x_a cos(t) - x_b sin(t)
    y_b = x_a sin(t) + x_b cos(t)

``rotatory_add``: the study's Rotatory code added to ``x [B, L, d]`` with angles ``[P, d/2]``::

    y[2j]   = x[2j]   + (-1)^j sin(theta_pj)
    y[2j+1] = x[2j+1] + cos(theta_pj)
"""

from __future__ import annotations

import torch


def gather_rows(table: torch.Tensor, positions: torch.Tensor | None, length: int) -> torch.Tensor:
    """Rows of ``table`` for each position: ``[L, n]`` or ``[B, L, n]``."""
    if positions is None:
        return table[:length]
    return table[positions]


def rotary_reference(x: torch.Tensor, angles: torch.Tensor, positions: torch.Tensor | None = None, interleaved: bool = True):
    theta = gather_rows(angles, positions, x.shape[1]).unsqueeze(-2)  # [.., L, 1, D/2]
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    half = x.shape[-1] // 2
    if interleaved:
        xa, xb = x[..., 0::2], x[..., 1::2]
    else:
        xa, xb = x[..., :half], x[..., half:]
    ya = xa * cos - xb * sin
    yb = xa * sin + xb * cos
    if interleaved:
        return torch.stack((ya, yb), dim=-1).flatten(-2)
    return torch.cat((ya, yb), dim=-1)


def rotatory_code(theta: torch.Tensor) -> torch.Tensor:
    """The Rotatory code ``[..., d]`` of angles ``[..., d/2]``."""
    sign = 1.0 - 2.0 * (torch.arange(theta.shape[-1], device=theta.device) % 2).to(theta.dtype)
    return torch.stack((sign * torch.sin(theta), torch.cos(theta)), dim=-1).flatten(-2)


def rotatory_add_reference(x: torch.Tensor, angles: torch.Tensor, positions: torch.Tensor | None = None):
    theta = gather_rows(angles, positions, x.shape[1])
    return x + rotatory_code(theta).to(x.dtype)
