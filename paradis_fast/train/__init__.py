"""Training ParaDiS networks: all switches in one pass, the widest teaching the others."""
from .experiment import TrainConfig, run
from .loss import InplaceDistillationLoss, SuperResolutionDistillationLoss
from .trainer import Trainer, evaluate, fit

__all__ = ["InplaceDistillationLoss", "SuperResolutionDistillationLoss", "TrainConfig", "Trainer", "evaluate", "fit",
           "run"]
