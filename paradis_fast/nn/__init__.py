"""torch.nn-style modules of ParaDiS networks."""

from .batchnorm import SwitchBatchNorm2d
from .conv import DepthwiseConv2d, SlicedConv2d
from .switchable import Switchable

__all__ = ["DepthwiseConv2d", "SlicedConv2d", "SwitchBatchNorm2d", "Switchable"]
