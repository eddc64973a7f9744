"""Concat-projection, written plainly: ``y = Linear(concat(x, table[p]))``.

``x [B, L, d_in]``, ``table [P, d_pos]``, ``weight [d_out, d_in + d_pos]``, ``bias [d_out]`` or
None, ``positions`` None (= 0..L-1), ``[L]`` or ``[B, L]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpe.reference.rotary import gather_rows


def concat_projection_reference(x, table, weight, bias=None, positions=None):
    rows = gather_rows(table, positions, x.shape[1])
    rows = rows.expand(x.shape[0], x.shape[1], table.shape[-1])
    return F.linear(torch.cat((x, rows), dim=-1), weight, bias)
