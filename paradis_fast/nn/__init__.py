"""torch.nn-style modules of ParaDiS networks."""
from .batchnorm import SwitchBatchNorm2d
from .conv import SlicedConv2d
from .switchable import Switchable

__all__ = ["SlicedConv2d", "SwitchBatchNorm2d", "Switchable"]
