"""TiSASRec's personal time steps, shared by the torch composition and the fused kernels (which
take ``tau`` and compute the interval buckets themselves)."""

from __future__ import annotations

import torch


def personal_time_steps(timestamps: torch.Tensor, time_unit: torch.Tensor | None,
                        key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``tau [B, L]`` int64: each timestamp in the user's unit, counted from the user's first one,
    ``tau_i = round((t_i - t_first) / u)`` (TiSASRec). ``u`` is ``time_unit`` ``[B]`` or, when None,
    the smallest nonzero gap between two of the row's timestamps (found between neighbours after
    sorting; 1 when all are equal). Padding positions are not read: they get ``tau = 0``.
    Integer timestamps are subtracted exactly before the division."""
    valid = torch.ones_like(timestamps, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    if timestamps.is_floating_point():
        t = timestamps.double()
        top = torch.tensor(float("inf"), dtype=t.dtype, device=t.device)
    else:
        t = timestamps.long()
        top = torch.tensor(torch.iinfo(torch.int64).max, device=t.device)
    first = torch.where(valid, t, top).amin(dim=1, keepdim=True)
    since_first = torch.where(valid, t - torch.where(valid.any(dim=1, keepdim=True), first, 0), 0).double()
    if time_unit is None:
        ordered = since_first.masked_fill(~valid, float("inf")).sort(dim=1).values
        gaps = ordered.diff(dim=1, append=torch.full_like(ordered[:, :1], float("inf")))  # L = 1 gives one gap
        gaps = gaps.masked_fill(~(gaps > 0) | gaps.isinf(), float("inf")).amin(dim=1)  # inf - inf = NaN: dropped too
        time_unit = torch.where(gaps.isinf(), 1.0, gaps)
    return torch.round(since_first / time_unit.double()[:, None]).long()
