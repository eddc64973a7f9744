"""Shared steps of the adapters' ``patch`` functions: swap layers in place, keeping the host's
Parameter objects, and record what changed so a forgotten optimizer is caught."""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fastpe.nn import encoding_kind
from fastpe.integrations.position import replacement


# RoPE's base in the adapters: the study's (fastpe.train's TrainConfig.rope_base), for short
# recommendation histories; fastpe.nn's RotaryMultiheadAttention keeps the usual 10000.
ROPE_BASE = 1000.0


class NewParametersWarning(UserWarning):
    """An optimizer that trains a patched model does not hold the parameters ``patch`` added."""


@dataclass
class PatchRecord:
    """What ``patch`` did to a model; kept as ``model.fastpe_patch``."""

    encoding: str
    layers: list[str] = field(default_factory=list)
    position: str = "unchanged"
    options: dict = field(default_factory=dict)
    new_parameters: list[str] = field(default_factory=list)

    def summary(self) -> str:
        options = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.options.items())
        new = f"{len(self.new_parameters)} new parameters"
        if self.new_parameters:
            new += f" ({', '.join(self.new_parameters[:4])}{', ...' if len(self.new_parameters) > 4 else ''})"
        return (f"fastpe patch: {self.encoding}" + (f" ({options})" if options else "")
                + f"; {len(self.layers)} attention layers swapped; position embedding: {self.position}; {new}")


def _no_weights(module, args, kwargs):
    # need_weights is the 5th positional argument of nn.MultiheadAttention.forward.
    if len(args) > 4:
        args = (*args[:4], False, *args[5:])
    else:
        kwargs["need_weights"] = False
    return args, kwargs


def skip_attention_weights(layer: nn.Module) -> None:
    """Make every call of an ``nn.MultiheadAttention``-like ``layer`` pass ``need_weights=False``
    (the fused path; the caller gets None for the weights). Marked ``layer.fastpe_need_weights =
    False``, which :func:`fastpe.save` records so that :func:`fastpe.load` restores it."""
    if getattr(layer, "fastpe_need_weights", None) is False:
        return
    layer.register_forward_pre_hook(_no_weights, with_kwargs=True)
    layer.fastpe_need_weights = False


def swap_layer(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at ``name`` in ``model`` with ``old``'s weights, device, dtype and train mode.

    Every parameter of ``old`` must have a same-named, same-shaped one in ``new``, and becomes it:
    the very Parameter object moves over, so an optimizer built before the swap still trains it.
    The parameters only ``new`` has (relative tables, rotary frequencies) keep their fresh
    initialisation.
    """
    weight = next(old.parameters())
    new = new.to(device=weight.device, dtype=weight.dtype)
    result = new.load_state_dict(old.state_dict(), strict=False)  # buffers, and a check of the names
    if result.unexpected_keys:
        raise RuntimeError(
            f"{name}: the fastpe layer has no place for {result.unexpected_keys} of {type(old).__name__}"
        )
    own = {n for n, _ in new.named_parameters()} | {n for n, _ in new.named_buffers()}
    if not own - set(result.missing_keys):
        raise RuntimeError(f"{name}: no weight of {type(old).__name__} was copied into the fastpe layer")
    for param_name, param in old.named_parameters():
        owner_name, _, attr = param_name.rpartition(".")
        owner = new.get_submodule(owner_name)
        if not isinstance(owner._parameters.get(attr), nn.Parameter) or owner._parameters[attr].shape != param.shape:
            raise RuntimeError(f"{name}: the fastpe layer has no parameter {param_name!r} of shape {tuple(param.shape)}")
        owner._parameters[attr] = param
    new.train(old.training)
    model.set_submodule(name, new)


def swap_position_embedding(model: nn.Module, attribute: str | None, encoding: str, options: dict) -> str:
    """Replace ``model.<attribute>`` (an ``nn.Embedding`` of position ids) as ``encoding`` needs;
    returns a description of what it became.

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
        return "none in the model"
    new = replacement(encoding, embedding, **options)
    if new is embedding:
        return f"{attribute} kept (the model's own learnt table)"
    weight = next((t for t in embedding.parameters()), None)
    if weight is not None:
        new = new.to(device=weight.device, dtype=weight.dtype)
    new.train(embedding.training)
    setattr(model, attribute, new)
    return f"{attribute} -> {type(new).__name__}"


# Models patched in this process, checked against each optimizer at its first step.
_PATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_CHECKED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_HOOK = None


def record_patch(model: nn.Module, record: PatchRecord, before: set[int], position_embedding: str | None) -> None:
    """Keep ``record`` as ``model.fastpe_patch`` with the parameters that did not exist before the
    patch (``before``: their ids) and the scale of the new position table, if any."""
    global _HOOK
    scale = getattr(getattr(model, position_embedding, None) if position_embedding else None, "scale", None)
    if isinstance(scale, float):
        record.options["scale"] = scale
    record.new_parameters = [n for n, p in model.named_parameters() if id(p) not in before]
    model.fastpe_patch = record
    if record.new_parameters:
        _PATCHED.add(model)
        if _HOOK is None:
            _HOOK = register_optimizer_step_pre_hook(_check_optimizer)


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``patch`` added to ``model`` (relative tables, rotary frequencies, rotatory
    angles): an optimizer built before the patch does not hold them."""
    record = getattr(model, "fastpe_patch", None)
    if record is None:
        raise ValueError(f"new_parameters: {type(model).__name__} was not patched by fastpe")
    named = dict(model.named_parameters())
    return [named[n] for n in record.new_parameters if n in named]


def add_new_parameters(optimizer: torch.optim.Optimizer, model: nn.Module, **group_options) -> int:
    """Add to ``optimizer`` the parameters ``patch`` added to ``model`` that it does not hold yet,
    as one parameter group (``group_options``: its lr, weight_decay, ...; the optimizer's
    defaults otherwise). Returns how many were added."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in new_parameters(model) if id(p) not in held]
    if missing:
        optimizer.add_param_group({"params": missing, **group_options})
    return len(missing)


def _check_optimizer(optimizer, args, kwargs):
    # Once per optimizer, at its first step: does it train a patched model but miss its new parameters?
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in list(_PATCHED):
        new = {id(p) for p in new_parameters(model)}
        trains_model = any(id(p) in held for p in model.parameters() if id(p) not in new)
        missing = [n for n, p in model.named_parameters() if id(p) in new and id(p) not in held]
        if trains_model and missing:
            warnings.warn(
                f"fastpe: this {type(optimizer).__name__} trains the patched {type(model).__name__} but not the "
                f"{len(missing)} parameters patch() added ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                f"they will never change. Call patch() before building the optimizer, or add them with "
                f"fastpe.integrations.add_new_parameters(optimizer, model).",
                NewParametersWarning, stacklevel=2,
            )
