"""Training ParaDiS networks: all switches in one pass, the widest teaching the others."""

from .experiment import TrainConfig, run
from .loss import InplaceDistillationLoss, SuperResolutionLoss
from .trainer import Trainer, evaluate, fit, parameter_groups

__all__ = [
    "InplaceDistillationLoss",
    "SuperResolutionLoss",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "fit",
    "parameter_groups",
    "run",
]
