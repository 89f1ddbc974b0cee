"""The checkpoint format shared by training, planning, export and serving.

One ``torch.save``d dict of plain values, so ``torch.load(weights_only=True)`` reads it:
``{"model": builder name in paradis_fast.models, "kwargs": the builder's other keyword arguments,
"switches": [switch spellings], "state_dict": ..., "input_shape": [C, H, W] or None,
"accuracy": {switch: validation accuracy} or None}``. The model is rebuilt from its builder, so a
checkpoint holds no pickled classes.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Mapping, Sequence

import torch

from .. import models
from ..errors import UserError
from ..nn import Switchable

__all__ = ["checkpoint_fields", "save_checkpoint", "load_checkpoint", "build_model"]

BUILDERS = ("mobilenet_v1", "resnet50", "resnet20", "wdsr_a", "wdsr_b")


def build_model(name: str, switches: Sequence[str], kwargs: Mapping[str, Any]) -> Switchable:
    """``paradis_fast.models.<name>(switches=switches, **kwargs)``, with a clear error for a bad name."""
    if name not in BUILDERS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    if "switches" in kwargs:
        raise ValueError("give the switches separately, not inside the builder kwargs")
    return getattr(models, name)(switches=list(switches), **kwargs)


def checkpoint_fields(
    model: Switchable,
    name: str,
    kwargs: Mapping[str, Any],
    input_shape: Sequence[int] | None = None,
    accuracy: Mapping[str, float] | None = None,
) -> dict:
    """The checkpoint dict of `model`, built by ``paradis_fast.models.<name>(switches=..., **kwargs)``;
    a trainer adds its own keys (optimizer state, epoch, ...) next to these."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    switches = [str(s) for s in model.switches]
    if accuracy is not None:
        unknown = set(accuracy) - set(switches)
        if unknown:
            raise ValueError(f"accuracy given for switches {sorted(unknown)} that the model does not have")
    return {
        "model": name,
        "kwargs": dict(kwargs),
        "switches": switches,
        "state_dict": model.state_dict(),
        "input_shape": None if input_shape is None else [int(d) for d in input_shape],
        "accuracy": None if accuracy is None else {str(k): float(v) for k, v in accuracy.items()},
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: Switchable,
    name: str,
    kwargs: Mapping[str, Any],
    input_shape: Sequence[int] | None = None,
    accuracy: Mapping[str, float] | None = None,
) -> None:
    """Write `checkpoint_fields` of `model` to `path`."""
    torch.save(checkpoint_fields(model, name, kwargs, input_shape, accuracy), path)


def load_checkpoint(path: str | os.PathLike) -> tuple[Switchable, dict]:
    """The model in eval mode and the checkpoint's other fields (everything but the state dict)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise UserError(f"{path}: not a file written by torch.save ({type(error).__name__})") from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: not a paradis_fast checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    missing = {"model", "kwargs", "switches", "state_dict"} - set(checkpoint)
    if missing:
        raise UserError(f"{path}: not a paradis_fast checkpoint (missing {', '.join(sorted(missing))})")
    model = build_model(checkpoint["model"], checkpoint["switches"], checkpoint["kwargs"])
    model.load_state_dict(checkpoint.pop("state_dict"))
    checkpoint.setdefault("input_shape", None)
    checkpoint.setdefault("accuracy", None)
    return model.eval(), checkpoint
