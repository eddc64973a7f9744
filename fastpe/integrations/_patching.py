"""Shared steps of the adapters' ``patch`` functions: swap a layer in place with its weights."""

from __future__ import annotations

from torch import nn

from fastpe.nn import encoding_kind
from fastpe.integrations.position import replacement


def swap_layer(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at ``name`` in ``model`` with ``old``'s weights, device, dtype and train mode.

    Every parameter of ``old`` must have a same-named one in ``new``; the parameters only
    ``new`` has (relative tables, rotary frequencies) keep their fresh initialisation.
    """
    weight = next(old.parameters())
    new = new.to(device=weight.device, dtype=weight.dtype)
    result = new.load_state_dict(old.state_dict(), strict=False)
    if result.unexpected_keys:
        raise RuntimeError(
            f"{name}: the fastpe layer has no place for {result.unexpected_keys} of {type(old).__name__}"
        )
    own = {n for n, _ in new.named_parameters()} | {n for n, _ in new.named_buffers()}
    kept = own - set(result.missing_keys)
    if not kept:
        raise RuntimeError(f"{name}: no weight of {type(old).__name__} was copied into the fastpe layer")
    new.train(old.training)
    model.set_submodule(name, new)


def swap_position_embedding(model: nn.Module, attribute: str | None, encoding: str, options: dict) -> None:
    """Replace ``model.<attribute>`` (an ``nn.Embedding`` of position ids) as ``encoding`` needs.

    A model without that attribute is fine when the encoding adds no absolute position
    (rmha-k, rope, none).
    """
    embedding = getattr(model, attribute, None) if attribute else None
    if embedding is None:
        if encoding_kind(encoding) == "input" and encoding.strip().lower() != "none":
            where = f"no attribute {attribute!r}" if attribute else "position_embedding=None"
            raise ValueError(
                f"encoding {encoding!r} is added through the model's position embedding, but "
                f"{type(model).__name__} has {where}; name it with position_embedding=..."
            )
        return "no position embedding"
    new = replacement(encoding, embedding, **options)
    if new is embedding:
        return
    weight = next((t for t in embedding.parameters()), None)
    if weight is not None:
        new = new.to(device=weight.device, dtype=weight.dtype)
    new.train(embedding.training)
    setattr(model, attribute, new)
