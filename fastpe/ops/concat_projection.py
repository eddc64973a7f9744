"""Concat-projection ``Linear(concat(x, table[p]))``: functional API, checks, the ``torch`` backend.

See :mod:`fastpe.reference.concat_projection` for the shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpe._validation import check_float, check_positions, check_same_device
from fastpe.ops._dispatch import implementation
from fastpe.reference.concat_projection import concat_projection_reference


def concat_projection_torch(x, table, weight, bias=None, positions=None):
    """``x Wx^T + (table Wp^T)[p] + b``: the position term is computed per table row, not per token."""
    d_in = x.shape[-1]
    w_x, w_pos = weight[:, :d_in], weight[:, d_in:]
    if positions is None:
        pos_term = F.linear(table[: x.shape[1]], w_pos)  # [L, d_out]
    elif positions.dim() == 1:
        pos_term = F.linear(table[positions], w_pos)
    else:
        pos_term = F.linear(table, w_pos)[positions]  # [B, L, d_out]
    return F.linear(x, w_x, bias) + pos_term


def concat_projection(
    x: torch.Tensor,
    table: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    positions: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``Linear(concat(x, table[p]))`` without materialising the ``[B, L, d_in + d_pos]`` concat.

    Args:
        x: ``[B, L, d_in]``; table: ``[max_len, d_pos]``; weight: ``[d_out, d_in + d_pos]``;
        bias: ``[d_out]`` or None; positions: None (0..L-1), ``[L]`` or ``[B, L]``.
    """
    check_float(x, "x", 3, "[B, L, d_in]")
    check_float(table, "table", 2, "[max_len, d_pos]")
    check_float(weight, "weight", 2, "[d_out, d_in + d_pos]")
    check_same_device(x=x, table=table, weight=weight, bias=bias, positions=positions)
    d_in, d_pos = x.shape[-1], table.shape[-1]
    if weight.shape[1] != d_in + d_pos:
        raise ValueError(
            f"weight: expected shape [d_out, d_in + d_pos = {d_in} + {d_pos}], got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_float(bias, "bias", 1, "[d_out]")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [d_out={weight.shape[0]}], got {tuple(bias.shape)}")
    check_positions(positions, x.shape[0], x.shape[1], table.shape[0])
    # Compute in one dtype, as F.linear does: the autocast dtype when autocast is on, else x's.
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x, table, weight = x.to(dtype), table.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    args = (x, table, weight, bias, positions)
    fn = implementation("concat_projection", backend, x.device, concat_projection_reference, concat_projection_torch,
                        args)
    return fn(*args)
