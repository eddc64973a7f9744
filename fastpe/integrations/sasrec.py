"""SASRec.pytorch-style models: ``torch.nn.MultiheadAttention`` layers, ``pos_emb`` embedding.

Such code (pmixer/SASRec.pytorch and its many descendants) calls
``attention_layers[i](Q, seqs, seqs, attn_mask=causal)`` on sequence-first tensors ``[L, B, d]``
with a bool causal mask (True = masked), on left-padded batches, and adds
``pos_emb(position_ids)`` to the scaled item embeddings.

fastpe's attention layers share ``nn.MultiheadAttention``'s constructor, parameter names
(``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``; ``q/k/v_proj_weight``
when kdim/vdim differ), ``batch_first=False`` default here, forward signature and mask
conventions, so :func:`patch` swaps them in with the weights and the model's code unchanged.
"""

from __future__ import annotations

from torch import nn

from fastpe.integrations._patching import (
    ROPE_BASE, PatchRecord, record_patch, skip_attention_weights, swap_layer, swap_position_embedding,
)
from fastpe.nn import MultiheadAttention, RelativeMultiheadAttention, RotaryMultiheadAttention, attention_layer, encoding_kind

_FASTPE_LAYERS = (MultiheadAttention, RelativeMultiheadAttention, RotaryMultiheadAttention)


def multihead_attention(encoding: str, embed_dim: int, num_heads: int, dropout: float = 0.0, **options) -> nn.Module:
    """The fastpe layer for ``encoding`` built like ``nn.MultiheadAttention(embed_dim, num_heads,
    dropout)``: sequence-first unless ``batch_first=True`` is passed. Plain attention for input
    encodings, RMHA-k for ``rmha-<k>``, RoPE for ``rope``."""
    options.setdefault("batch_first", False)
    return attention_layer(encoding, embed_dim, num_heads, dropout, **options)


def patch(
    model: nn.Module,
    encoding: str = "rmha-4",
    *,
    position_embedding: str | None = "pos_emb",
    need_weights: bool | None = None,
    backend: str = "auto",
    **options,
) -> nn.Module:
    """Swap fastpe layers into a model built on ``torch.nn.MultiheadAttention``, in place; returns it.

    * Every ``nn.MultiheadAttention`` becomes the fastpe layer for ``encoding`` with the same
      weights (the parameter names are the same), dropout, bias, kdim/vdim and ``batch_first``.
    * ``model.<position_embedding>`` (``pos_emb``, an ``nn.Embedding`` of position ids) is
      replaced as the encoding needs: zeros for ``rmha-k``, ``rope`` and ``none``; kept for
      ``learnt`` (so ``patch(model, "learnt")`` keeps the model's function); fastpe's table rows
      for ``abs`` and ``rotatory``. See :mod:`fastpe.integrations.position`.
    * ``need_weights=False`` makes every call skip the attention weights (the model's code gets
      ``None`` for them), so the fused kernels run even though SASRec.pytorch's call leaves
      ``need_weights`` at its default True; None leaves the calls as they are.

    ``options`` go to the attention layers for ``rmha-k``/``rope`` (``base`` defaults to the
    study's 1000) and to the position table otherwise (``scale``: ``"match"`` by default, the
    root-mean-square of the table replaced; a number multiplies fastpe's unit codes). Layers with
    ``add_bias_kv`` or ``add_zero_attn`` are refused (fastpe has neither).

    Call it after the model's own initialisation (so ``"match"`` sees the initialised table) and
    before building the optimizer: the host's Parameter objects are kept, but the parameters the
    patch adds (``new_parameters(model)``) are unknown to an older optimizer, which warns at its
    first step (``add_new_parameters(optimizer, model)`` fixes it). ``model.fastpe_patch``
    records what was done; ``model.fastpe_patch.summary()`` says it in one line.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected an nn.Module, got {type(model).__name__}")
    if need_weights not in (None, False):
        raise ValueError(f"patch: need_weights must be None (calls unchanged) or False, got {need_weights!r}")
    already = [n for n, m in model.named_modules() if isinstance(m, _FASTPE_LAYERS)]
    if already:
        raise ValueError(f"patch: {type(model).__name__} already holds fastpe attention layers (e.g. {already[0]!r})")
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.MultiheadAttention)]
    if not layers:
        raise ValueError(
            f"patch: found no attention layer in {type(model).__name__}: looked for torch.nn.MultiheadAttention modules"
        )
    before = {id(p) for p in model.parameters()}
    in_attention = encoding_kind(encoding) == "attention"
    if encoding.strip().lower() == "rope":
        options.setdefault("base", ROPE_BASE)
    layer_options = options if in_attention else {}
    for name, old in layers:
        if old.bias_k is not None or old.add_zero_attn:
            raise ValueError(f"patch: {name} uses add_bias_kv or add_zero_attn, which fastpe's layers do not support")
        kwargs = {"bias": old.in_proj_bias is not None, "kdim": old.kdim, "vdim": old.vdim, "batch_first": old.batch_first}
        if in_attention:  # the plain layer has no backend: it runs SDPA
            kwargs.update(backend=backend, **layer_options)
        new = attention_layer(encoding if in_attention else "none", old.embed_dim, old.num_heads, old.dropout, **kwargs)
        swap_layer(model, name, old, new)
        if need_weights is False:
            skip_attention_weights(new)
    position = swap_position_embedding(model, position_embedding, encoding, {} if in_attention else dict(options))
    shown = {**options, **({"need_weights": False} if need_weights is False else {})}
    record_patch(model, PatchRecord(encoding, [n for n, _ in layers], position, shown), before, position_embedding)
    return model


__all__ = ["multihead_attention", "patch"]
