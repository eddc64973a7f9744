"""Save and load fastpe modules, and models that contain them, with their encoding configuration.

A checkpoint is a plain ``torch.save`` of a dict that ``torch.load(..., weights_only=True)`` can
read (no pickled classes)::

    {"format": "fastpe", "version": 1,
     "module": {"class": "fastpe.nn.attention.RelativeMultiheadAttention", "config": {...}} or None,
     "model_class": "mypackage.models.MyModel",
     "submodules": {"encoder.0.attn": {"class": ..., "config": ..., "need_weights": False}, ...},
     "state_dict": {...}}

Every fastpe module has ``config()`` (its constructor arguments as plain values) and
``from_config(config)``; ``need_weights: False`` marks an attention layer whose calls skip the
attention weights (the SASRec adapter's ``patch(..., need_weights=False)``), restored on load.
``module`` is set when the saved object is itself a fastpe module; for
any other model, ``submodules`` lists its outermost fastpe modules by name, so that loading into
a freshly built model restores the encodings it was trained with.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

FORMAT = "fastpe"
VERSION = 1


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_fastpe_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fastpe.") and callable(getattr(module, "config", None))


def _describe(module: nn.Module) -> dict[str, Any]:
    entry = {"class": _class_path(module), "config": module.config()}
    if getattr(module, "fastpe_need_weights", None) is False:  # set by the SASRec adapter's patch
        entry["need_weights"] = False
    return entry


def _restore_call_options(module: nn.Module, entry: dict[str, Any]) -> None:
    if entry.get("need_weights") is False:
        from fastpe.integrations._patching import skip_attention_weights

        skip_attention_weights(module)


def fastpe_submodules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost fastpe modules inside ``model`` by qualified name ("" for the model itself)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in found if p) or "" in found:
            continue  # inside a fastpe module already recorded: its parent rebuilds it
        if _is_fastpe_module(module):
            found[name] = module
    return found


def save(module: nn.Module, path: str | os.PathLike) -> None:
    """Save ``module`` (a fastpe module, or any model containing fastpe modules) with the
    configuration of its encodings. Load it back with :func:`load`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"save: expected an nn.Module, got {type(module).__name__}")
    found = fastpe_submodules(module)
    root = found.pop("", None)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "module": None if root is None else _describe(root),
        "model_class": _class_path(module),
        "submodules": {name: _describe(m) for name, m in found.items()},
        "state_dict": module.state_dict(),
    }
    torch.save(payload, path)


def _resolve(class_path: str) -> type:
    # Only fastpe's own classes are ever constructed from a checkpoint.
    if not class_path.startswith("fastpe."):
        raise ValueError(f"checkpoint names class {class_path!r}, which is not part of fastpe")
    module_name, _, qualname = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"checkpoint names class {class_path!r}, which this version of fastpe does not have") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise ValueError(f"checkpoint names {class_path!r}, which is not a fastpe module with from_config()")
    return cls


def _build(entry: dict[str, Any], backend: str | None) -> nn.Module:
    config = dict(entry["config"])
    if backend is not None and "backend" in config:
        config["backend"] = backend
    return _resolve(entry["class"]).from_config(config)


def _like(new: nn.Module, old: nn.Module | None) -> nn.Module:
    """``new`` moved to the device and floating dtype of the module it replaces."""
    if old is None:
        return new
    reference = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
    return new if reference is None else new.to(device=reference.device, dtype=reference.dtype)


def _read(path: str | os.PathLike, map_location) -> dict[str, Any]:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint written by fastpe.save")
    if payload.get("version", 0) > VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} was written by a newer fastpe (format version {payload['version']}, "
            f"this one reads up to {VERSION})"
        )
    return payload


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    map_location=None,
    backend: str | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save`.

    * A saved fastpe module is rebuilt from its configuration and returned (``model`` not needed).
    * A saved model is loaded into ``model``, an instance of its class built by the caller. Each
      fastpe submodule recorded in the checkpoint is rebuilt from its configuration first (on the
      device and dtype of the module it replaces), so the model runs the encodings it was
      trained with even when it was built with others; then the state dict is loaded strictly.

    ``backend`` overrides the backend of every rebuilt module that has one (e.g. ``"auto"`` to
    load on the CPU a model trained with ``backend="triton"``). Returns the loaded module.
    """
    payload = _read(path, map_location)
    state = payload["state_dict"]
    if payload["module"] is not None and model is None:
        module = _build(payload["module"], backend)
        # assign=True keeps the saved dtype (and the device chosen by map_location).
        module.load_state_dict(state, assign=True)
        _restore_call_options(module, payload["module"])
        return module
    if model is None:
        raise ValueError(
            f"{os.fspath(path)!r} holds a model of class {payload['model_class']}, not a fastpe module: "
            f"build one and pass it as model= to load into it"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"load: model must be an nn.Module, got {type(model).__name__}")
    entries = dict(payload["submodules"])
    if payload["module"] is not None:
        entries[""] = payload["module"]
    for name, entry in entries.items():
        if name == "":
            if _class_path(model) != entry["class"] or model.config() != entry["config"]:
                raise ValueError(
                    f"the checkpoint holds {entry['class']} with config {entry['config']}; the model passed is "
                    f"{_class_path(model)}{' with config ' + str(model.config()) if _is_fastpe_module(model) else ''}"
                )
            continue
        try:
            current = model.get_submodule(name)
        except AttributeError:
            current = None
        if current is not None and _is_fastpe_module(current) and _class_path(current) == entry["class"] \
                and current.config() == entry["config"] and backend is None:
            _restore_call_options(current, entry)
            continue
        parent_name, _, _ = name.rpartition(".")
        try:
            model.get_submodule(parent_name)
        except AttributeError as exc:
            raise ValueError(
                f"the checkpoint has a fastpe module at {name!r}, but the model passed "
                f"({type(model).__name__}) has no submodule {parent_name!r} to hold it"
            ) from exc
        rebuilt = _like(_build(entry, backend), current)
        _restore_call_options(rebuilt, entry)
        model.set_submodule(name, rebuilt)
    model.load_state_dict(state)
    return model


__all__ = ["fastpe_submodules", "load", "save"]
