"""Positional encodings applied to the item representations ``x [B, L, d]`` before the encoder.

Every module here has ``kind = "input"`` and ``forward(x, positions=None, padding_mask=None)``:

* ``positions``: None (0..L-1, or L-1..0 with ``reverse=True``), ``[L]`` or ``[B, L]`` ints.
  ``reverse=True`` gives the most recent item position 0 when sequences are left-padded (the
  study's default, and the layout of SASRec/CARCA batches).
* ``padding_mask``: optional ``[B, L]`` bool, True at padding; those rows of the output are 0.

Table-based encodings expose ``table()`` (the ``[max_len, d]`` codes) so that
:class:`ConcatEncoding` can project ``concat(x, table[p])`` without building the concat.
"""

from __future__ import annotations


import torch
from torch import nn

from fastpe._validation import check_float
from fastpe.ops import concat_projection, rotatory
from fastpe.reference.rotary import rotatory_code


def sinusoidal_table(max_len: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """``pe[p, 2j] = sin(p / base^(2j/d))``, ``pe[p, 2j+1] = cos(p / base^(2j/d))`` as float32."""
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table.float()


def sinusoidal_angles(max_len: int, pairs: int, base: float = 10000.0) -> torch.Tensor:
    """``theta[p, j] = p / base^(j / pairs)``: the angles of the sinusoidal code, ``[max_len, pairs]``."""
    inv_freq = base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)
    return (torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq).float()


class PositionalEncoding(nn.Module):
    """Base class: input checks, position ids and padding for the encodings of this module."""

    kind = "input"

    def __init__(self, d_model: int, max_len: int = 512, reverse: bool = False):
        super().__init__()
        if d_model <= 0 or max_len <= 0:
            raise ValueError(f"d_model and max_len must be positive, got {d_model} and {max_len}")
        self.d_model = d_model
        self.max_len = max_len
        self.reverse = reverse

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, reverse={self.reverse}"

    def config(self) -> dict:
        """The constructor arguments that rebuild this encoding (``type(self)(**config)``), as
        plain Python values. Used by :func:`fastpe.save`."""
        return {"d_model": self.d_model, "max_len": self.max_len, "reverse": self.reverse}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def _check(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
        """Validate ``x`` and return explicit positions (None means 0..L-1)."""
        check_float(x, "x", 3, "[B, L, d_model]")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected d_model={self.d_model} features in the last dim, got shape {tuple(x.shape)}")
        length = x.shape[1]
        if positions is None and length > self.max_len:
            raise ValueError(
                f"x: sequence length {length} exceeds the configured maximum max_len={self.max_len}"
            )
        if positions is None and self.reverse:
            positions = torch.arange(length - 1, -1, -1, device=x.device)
        return positions

    @staticmethod
    def _mask(y: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if padding_mask is None:
            return y
        if padding_mask.dtype != torch.bool or padding_mask.shape != y.shape[:2]:
            raise ValueError(
                f"padding_mask: expected bool [B, L] = {tuple(y.shape[:2])}, got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        return y.masked_fill(padding_mask.unsqueeze(-1), 0.0)


class NoEncoding(PositionalEncoding):
    """``none``: the identity (padding rows still zeroed when a mask is given)."""

    def __init__(self, d_model: int, max_len: int = 512, reverse: bool = False):
        super().__init__(d_model, max_len, reverse)

    def forward(self, x, positions=None, padding_mask=None):
        check_float(x, "x", 3, "[B, L, d_model]")
        return self._mask(x, padding_mask)


class _AdditiveTableEncoding(PositionalEncoding):
    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, positions=None, padding_mask=None):
        positions = self._check(x, positions)
        table = self.table()
        codes = table[: x.shape[1]] if positions is None else table[positions]
        return self._mask(x + codes.to(x.dtype), padding_mask)


class SinusoidalEncoding(_AdditiveTableEncoding):
    """``abs``: the fixed sinusoidal table added to ``x``."""

    def __init__(self, d_model: int, max_len: int = 512, reverse: bool = False, base: float = 10000.0):
        super().__init__(d_model, max_len, reverse)
        self.base = base
        # Not persistent: it is a function of the config, so checkpoints stay small and portable.
        self.register_buffer("codes", sinusoidal_table(max_len, d_model, base), persistent=False)

    def config(self) -> dict:
        return {**super().config(), "base": self.base}

    def table(self) -> torch.Tensor:
        return self.codes


class LearntEncoding(_AdditiveTableEncoding):
    """``learnt``: a learned table ``[max_len, d]`` added to ``x``."""

    def __init__(self, d_model: int, max_len: int = 512, reverse: bool = False, init_std: float = 0.02):
        super().__init__(d_model, max_len, reverse)
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def config(self) -> dict:
        return {**super().config(), "init_std": self.init_std}

    def table(self) -> torch.Tensor:
        return self.weight


class RotatoryEncoding(PositionalEncoding):
    """``rotatory``: the study's encoding with learnable angles ``theta [max_len, d/2]``.

    ``mode="add"`` adds ``r_p = ((-1)^j sin theta_pj, cos theta_pj)`` to each pair of ``x``;
    ``mode="rotate"`` rotates each pair ``(x_2j, x_2j+1)`` by ``theta_pj``. The angles are
    ``angle_scale * angle_weight``; the study's parameterisation is ``angle_scale = 2 pi / 10000``.
    They start at the sinusoidal angles ``p / 10000^(2j/d)``.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int = 512,
        mode: str = "add",
        reverse: bool = False,
        angle_scale: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__(d_model, max_len, reverse)
        if d_model % 2:
            raise ValueError(f"rotatory needs an even d_model, got {d_model}")
        if mode not in ("add", "rotate"):
            raise ValueError(f"mode must be 'add' or 'rotate', got {mode!r}")
        self.mode = mode
        self.angle_scale = angle_scale
        self.backend = backend
        self.angle_weight = nn.Parameter(torch.empty(max_len, d_model // 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.angle_weight.copy_(sinusoidal_angles(self.max_len, self.d_model // 2) / self.angle_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, angle_scale={self.angle_scale}"

    def config(self) -> dict:
        return {**super().config(), "mode": self.mode, "angle_scale": self.angle_scale, "backend": self.backend}

    def angles(self) -> torch.Tensor:
        return self.angle_weight * self.angle_scale if self.angle_scale != 1.0 else self.angle_weight

    def table(self) -> torch.Tensor:
        return rotatory_code(self.angles())

    def forward(self, x, positions=None, padding_mask=None):
        positions = self._check(x, positions)
        y = rotatory(x, self.angles(), mode=self.mode, positions=positions, backend=self.backend)
        return self._mask(y, padding_mask)


_TABLES = {"abs": SinusoidalEncoding, "learnt": LearntEncoding, "rotatory": RotatoryEncoding}


class ConcatEncoding(PositionalEncoding):
    """``abs+con``, ``learnt+con``, ``rotatory+con``: ``y = Linear(2d -> d)(concat(x, e_p))``.

    Computed as ``x Wx^T + (E Wp^T)[p] + b`` (see :func:`fastpe.ops.concat_projection`).
    The codes ``e_p`` come from ``self.codes``, an encoding of the named ``table`` kind.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int = 512,
        table: str = "abs",
        reverse: bool = False,
        bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(d_model, max_len, reverse)
        if table not in _TABLES:
            raise ValueError(f"table must be one of {sorted(_TABLES)}, got {table!r}")
        self.table_kind = table
        self.backend = backend
        self.codes = _TABLES[table](d_model, max_len)
        self.proj = nn.Linear(2 * d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, table={self.table_kind!r}"

    def config(self) -> dict:
        return {**super().config(), "table": self.table_kind, "bias": self.proj.bias is not None, "backend": self.backend}

    def forward(self, x, positions=None, padding_mask=None):
        positions = self._check(x, positions)
        y = concat_projection(
            x, self.codes.table(), self.proj.weight, self.proj.bias, positions=positions, backend=self.backend
        )
        return self._mask(y, padding_mask)


__all__ = [
    "ConcatEncoding",
    "LearntEncoding",
    "NoEncoding",
    "PositionalEncoding",
    "RotatoryEncoding",
    "SinusoidalEncoding",
    "sinusoidal_angles",
    "sinusoidal_table",
]
