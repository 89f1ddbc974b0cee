"""Training checkpoints: deployment's checkpoint format plus what ``--resume`` needs.

The model part is `paradis_fast.deploy.checkpoint.checkpoint_fields` (``model``, ``kwargs``,
``switches``, ``state_dict``, ``input_shape``, ``accuracy``), so deployment loads a training
checkpoint as it is; training adds ``optimizer``, ``scheduler``, ``epoch`` (epochs completed),
``rng`` (torch's global and the trainer's generator states), ``history`` and ``config`` (the run's
settings). All plain containers and tensors: ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import os

import torch

from ..deploy.checkpoint import build_model, checkpoint_fields, load_checkpoint

__all__ = ["build_model", "checkpoint_fields", "load_checkpoint", "save"]


def save(path: str, checkpoint: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)
