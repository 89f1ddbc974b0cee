"""Deployment: cut a switch into per-device models, plan, export and serve them (DESIGN §5)."""

from .checkpoint import build_model, checkpoint_fields, load_checkpoint, save_checkpoint
from .plan import Candidate, PartCosts, Plan, part_costs, part_flops, plan
from .split import Fusion, PartStats, Split, split

__all__ = [
    "split",
    "Split",
    "Fusion",
    "PartStats",
    "plan",
    "Plan",
    "Candidate",
    "part_flops",
    "part_costs",
    "PartCosts",
    "checkpoint_fields",
    "save_checkpoint",
    "load_checkpoint",
    "build_model",
]
