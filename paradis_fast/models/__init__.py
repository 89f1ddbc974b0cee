"""ParaDiS models: built for a switch set, ``model(images)`` returns ``[S, B, ...]`` for the active switches."""

from .mobilenet import MobileNetV1, mobilenet_v1
from .resnet import BasicBlock, Bottleneck, ResNet, resnet20, resnet50
from .wdsr import WDSR, WDSRBlockA, WDSRBlockB, wdsr_a, wdsr_b

__all__ = [
    "MobileNetV1",
    "mobilenet_v1",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "resnet50",
    "resnet20",
    "WDSR",
    "WDSRBlockA",
    "WDSRBlockB",
    "wdsr_a",
    "wdsr_b",
]
