"""RecBole: a drop-in for its Transformer attention layer, and ``patch`` for SASRec / BERT4Rec.

RecBole (1.2.x) builds SASRec and BERT4Rec from ``recbole.model.layers.MultiHeadAttention``::

    MultiHeadAttention(n_heads, hidden_size, hidden_dropout_prob, attn_dropout_prob, layer_norm_eps)
    forward(input_tensor [B, L, d], attention_mask) -> LayerNorm(dropout(dense(attention)) + input_tensor)

with ``query``/``key``/``value``/``dense`` Linear layers and an additive mask ``[B, 1, L, L]``
(causal, SASRec) or ``[B, 1, 1, L]`` (bidirectional, BERT4Rec): 0 where attention is allowed,
-10000 where not; sequences are right-padded. The absolute position enters as
``item_embedding(item_seq) + position_embedding(arange(L))``.

:class:`MultiHeadAttention` here computes exactly that layer with a fastpe encoding inside the
attention (plain, ``rmha-k`` or ``rope``); :func:`patch` swaps it into a model, keeping the weights.
:func:`safe_checkpoints` makes RecBole's ``Trainer`` write checkpoints that its own ``torch.load``
reads with safe (weights-only) loading. This module never imports RecBole.
"""

from __future__ import annotations

import math
import re
import types

import torch
from torch import nn

from fastpe.integrations._patching import ROPE_BASE, PatchRecord, record_patch, swap_layer, swap_position_embedding
from fastpe.nn import encoding_kind
from fastpe.nn.encodings import sinusoidal_angles
from fastpe.ops import relative_attention, rotary
from fastpe.ops.attention import attention

_RMHA = re.compile(r"rmha-(\d+)$")
_REQUIRED = ("query", "key", "value", "dense", "LayerNorm", "attn_dropout", "out_dropout", "num_attention_heads")


def attention_bias(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """RecBole's additive mask ``[B or 1, 1, L or 1, L]`` as the ``attn_mask`` fastpe's ops take
    (``[B or 1, 1, L, L]``, added to the logits): the values pass through unchanged, so the
    layer computes what RecBole's does, -10000 included (a row with every key masked attends
    uniformly, as in RecBole, instead of giving 0)."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}")
    if not attention_mask.is_floating_point():
        raise TypeError(
            "attention_mask: expected RecBole's additive float mask (0 = attend, -10000 = masked), "
            f"got dtype {attention_mask.dtype}"
        )
    shape = tuple(attention_mask.shape)
    if (
        attention_mask.dim() != 4 or shape[0] not in (1, batch) or shape[1] != 1
        or shape[2] not in (1, length) or shape[3] != length
    ):
        raise ValueError(
            f"attention_mask: expected RecBole's [B={batch}, 1, L={length}, L] (causal) or [B, 1, 1, L] "
            f"(bidirectional) mask, got shape {shape}"
        )
    return attention_mask.expand(shape[0], 1, length, length)


class MultiHeadAttention(nn.Module):
    """``recbole.model.layers.MultiHeadAttention`` with a fastpe encoding inside the attention.

    Same constructor (plus ``encoding`` and its options), same submodule names (``query``,
    ``key``, ``value``, ``dense``, ``LayerNorm``, ``attn_dropout``, ``out_dropout``), same forward.

    ``encoding``: ``"rmha-<k>"`` adds relative key and value tables ``relative_key`` /
    ``relative_value`` (``[2k+1, dh]``, or ``[h, 2k+1, dh]`` with ``per_head_tables=True``);
    ``"rope"`` rotates queries and keys (options ``base``, ``interleaved``, ``learnable``
    ``"none"|"frequencies"|"angles"``, ``max_len``); any input encoding's name (``"none"``,
    ``"learnt"``, ...) gives plain attention, the encoding itself being applied to the input.
    """

    def __init__(
        self,
        n_heads: int,
        hidden_size: int,
        hidden_dropout_prob: float,
        attn_dropout_prob: float,
        layer_norm_eps: float,
        encoding: str = "none",
        per_head_tables: bool = False,
        base: float = ROPE_BASE,
        interleaved: bool = False,
        learnable: str = "none",
        max_len: int = 512,
        backend: str = "auto",
    ):
        super().__init__()
        if hidden_size % n_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of n_heads={n_heads}")
        self.num_attention_heads = n_heads
        self.attention_head_size = hidden_size // n_heads
        self.all_head_size = hidden_size
        self.sqrt_attention_head_size = math.sqrt(self.attention_head_size)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(attn_dropout_prob)  # its p is used inside the attention op
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.out_dropout = nn.Dropout(hidden_dropout_prob)

        self.encoding = encoding.strip().lower()
        self.per_head_tables = per_head_tables
        self.base = base
        self.interleaved = interleaved
        self.learnable = learnable
        self.max_len = max_len
        self.backend = backend
        match = _RMHA.match(self.encoding)
        if match:
            self.mode = "relative"
            self.max_distance = int(match.group(1))
            rows = 2 * self.max_distance + 1
            shape = (n_heads, rows, self.attention_head_size) if per_head_tables else (rows, self.attention_head_size)
            # Same initialisation as fastpe.RelativeMultiheadAttention.
            self.relative_key = nn.Parameter(torch.randn(shape) / math.sqrt(self.attention_head_size))
            self.relative_value = nn.Parameter(torch.randn(shape) / math.sqrt(self.attention_head_size))
        elif self.encoding == "rope":
            self.mode = "rotary"
            if self.attention_head_size % 2:
                raise ValueError(f"rope needs an even head size, got {self.attention_head_size}")
            pairs = self.attention_head_size // 2
            inv_freq = (base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)).float()
            if learnable == "angles":
                self.angle_weight = nn.Parameter(sinusoidal_angles(max_len, pairs, base))
            elif learnable == "frequencies":
                self.inv_freq = nn.Parameter(inv_freq)
            elif learnable == "none":
                self.register_buffer("inv_freq", inv_freq, persistent=False)
            else:
                raise ValueError(f"learnable must be 'none', 'frequencies' or 'angles', got {learnable!r}")
        else:
            encoding_kind(self.encoding)  # raises on an unknown name
            self.mode = "plain"

    def extra_repr(self) -> str:
        return f"encoding={self.encoding!r}, heads={self.num_attention_heads}, mode={self.mode}"

    def config(self) -> dict:
        return {
            "n_heads": self.num_attention_heads, "hidden_size": self.all_head_size,
            "hidden_dropout_prob": self.out_dropout.p, "attn_dropout_prob": self.attn_dropout.p,
            "layer_norm_eps": self.LayerNorm.eps, "encoding": self.encoding, "per_head_tables": self.per_head_tables,
            "base": self.base, "interleaved": self.interleaved, "learnable": self.learnable,
            "max_len": self.max_len, "backend": self.backend,
        }

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def _angles(self, length: int, device: torch.device) -> torch.Tensor:
        if self.learnable == "angles":
            if length > self.max_len:
                raise ValueError(f"sequence length {length} exceeds the configured maximum max_len={self.max_len}")
            return self.angle_weight[:length]
        return torch.arange(length, device=device, dtype=torch.float32)[:, None] * self.inv_freq

    def forward(self, input_tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_tensor.dim() != 3:
            raise ValueError(f"input_tensor: expected [B, L, hidden_size], got shape {tuple(input_tensor.shape)}")
        b, length, _ = input_tensor.shape
        bias = attention_bias(attention_mask, b, length)
        q = self._heads(self.query(input_tensor))
        k = self._heads(self.key(input_tensor))
        v = self._heads(self.value(input_tensor))
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if self.mode == "relative":
            context = relative_attention(
                q, k, v, self.relative_key, self.relative_value, attn_mask=bias, dropout_p=dropout_p, backend=self.backend
            )
        else:
            if self.mode == "rotary":
                angles = self._angles(length, q.device)
                # rotary() takes [B, L, h, dh]: transposed views, no copies.
                q = rotary(q.transpose(1, 2), angles, interleaved=self.interleaved, backend=self.backend).transpose(1, 2)
                k = rotary(k.transpose(1, 2), angles, interleaved=self.interleaved, backend=self.backend).transpose(1, 2)
            context = attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(b, length, self.all_head_size)
        hidden_states = self.out_dropout(self.dense(context))
        return self.LayerNorm(hidden_states + input_tensor)


def _is_recbole_attention(module: nn.Module) -> bool:
    # Matched by name and structure rather than by import, so RecBole stays optional and copies
    # of its layer in forks are recognised too.
    return type(module).__name__ == "MultiHeadAttention" and all(hasattr(module, a) for a in _REQUIRED)


def patch(
    model: nn.Module,
    encoding: str = "rmha-4",
    *,
    position_embedding: str | None = "position_embedding",
    backend: str = "auto",
    **options,
) -> nn.Module:
    """Put ``encoding`` into a RecBole SASRec / BERT4Rec (or any model built on RecBole's
    ``TransformerEncoder``), in place; returns the model.

    * Every ``MultiHeadAttention`` layer becomes this module's :class:`MultiHeadAttention` with
      the same weights (``query``/``key``/``value``/``dense``/``LayerNorm`` copied), dropouts and
      eps; ``rmha-k`` adds fresh relative tables, ``rope`` rotary frequencies.
    * ``model.<position_embedding>`` (RecBole's ``nn.Embedding`` of position ids) is replaced as
      the encoding needs (see :mod:`fastpe.integrations.position`): with ``rmha-k``, ``rope`` and
      ``none`` it returns zeros, so no absolute position is added; ``learnt`` keeps it, so
      ``patch(model, "learnt")`` leaves the model's function unchanged; ``abs`` and ``rotatory``
      give fastpe's table rows.

    ``options`` go to the attention layer for ``rmha-k``/``rope`` (``per_head_tables``, ``base``
    (default 1000, the study's), ``interleaved``, ``learnable``, ``max_len``) and to the position
    table otherwise (``scale``: ``"match"`` by default, the root-mean-square of RecBole's table).

    Call it before building the ``Trainer`` (which builds the optimizer): the host's Parameter
    objects are kept, and ``model.fastpe_patch`` records the parameters the patch adds (see
    :func:`fastpe.integrations.add_new_parameters`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected an nn.Module, got {type(model).__name__}")
    already = [n for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    if already:
        raise ValueError(f"patch: {type(model).__name__} is already patched by fastpe (see {already[0]!r}); patch a fresh model")
    layers = [(n, m) for n, m in model.named_modules() if n and _is_recbole_attention(m)]
    if not layers:
        raise ValueError(
            f"patch: found no RecBole attention layer in {type(model).__name__}: looked for modules of class "
            f"MultiHeadAttention (recbole.model.layers) with submodules {', '.join(_REQUIRED[:5])}"
        )
    before = {id(p) for p in model.parameters()}
    in_attention = encoding_kind(encoding) == "attention"
    if encoding.strip().lower() == "rope":
        options.setdefault("base", ROPE_BASE)
    layer_options = options if in_attention else {}
    for name, old in layers:
        new = MultiHeadAttention(
            old.num_attention_heads, old.query.in_features, old.out_dropout.p, old.attn_dropout.p, old.LayerNorm.eps,
            encoding=encoding if in_attention else "none", backend=backend, **layer_options,
        )
        swap_layer(model, name, old, new)
    position = swap_position_embedding(model, position_embedding, encoding, {} if in_attention else dict(options))
    record_patch(model, PatchRecord(encoding, [n for n, _ in layers], position, dict(options)), before, position_embedding)
    return model


def _plain(value):
    """A copy of ``value`` built only of str/int/float/bool/None, lists and str-keyed dicts;
    TypeError for anything else (enums, numpy scalars, classes)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict) and all(type(k) is str for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _save_checkpoint(self, epoch, verbose=True, **kwargs):
    # RecBole 1.2.1's Trainer._save_checkpoint, writing only what weights-only loading reads: its
    # original pickles the Config object (with a yaml Loader class and the model class inside) at
    # pickle protocol 4, which torch.load(weights_only=True) cannot read at all.
    if not self.config["single_spec"] and self.config["local_rank"] != 0:
        return
    saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
    config = {}
    for key, value in self.config.final_config_dict.items():
        try:
            config[key] = _plain(value)
        except TypeError:
            pass  # not weights-only loadable; nothing RecBole reads back
    state = {
        "config": config,  # resume_checkpoint reads config["model"]
        "epoch": int(epoch),
        "cur_step": int(self.cur_step),
        "best_valid_score": float(self.best_valid_score),
        "state_dict": self.model.state_dict(),
        "other_parameter": self.model.other_parameter(),
        "optimizer": self.optimizer.state_dict(),
    }
    torch.save(state, saved_model_file)
    if verbose:
        self.logger.info(f"Saving current: {saved_model_file}")


def safe_checkpoints(trainer):
    """Make a RecBole (1.2.x) ``Trainer`` write checkpoints that load with ``weights_only=True``; returns it.

    RecBole's trainer reloads its best model with ``torch.load(file)``, which under torch >= 2.6
    loads weights only and refuses RecBole's own file (``Unsupported operand 149``: pickle
    protocol 4, and a pickled ``Config`` holding classes). Instead of turning safe loading off
    (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` lets any checkpoint run code), this trainer writes the
    same checkpoint with plain values only: the state dicts, epoch, step, best score as a float,
    and the config's plain-valued entries as a dict. ``trainer.evaluate(load_best_model=True)``
    and ``trainer.resume_checkpoint`` then read it with torch's default safe loading; no type is
    allow-listed. Only this trainer instance changes.
    """
    needed = ("config", "model", "optimizer", "saved_model_file", "_save_checkpoint", "evaluate")
    missing = [name for name in needed if not hasattr(trainer, name)]
    if missing:
        raise TypeError(f"safe_checkpoints: expected a RecBole Trainer, got {type(trainer).__name__} without {missing}")
    trainer._save_checkpoint = types.MethodType(_save_checkpoint, trainer)
    return trainer


__all__ = ["MultiHeadAttention", "attention_bias", "patch", "safe_checkpoints"]
