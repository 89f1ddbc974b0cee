"""Training ParaDiS networks: all switches in one pass, the widest teaching the others."""
from .loss import InplaceDistillationLoss
from .trainer import evaluate, fit

__all__ = ["InplaceDistillationLoss", "evaluate", "fit"]
