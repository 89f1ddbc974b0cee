"""paradis_fast: fast training and deployment of ParaDiS (parallelly distributable slimmable) networks."""

from .switches import Switch, SwitchSet
from . import models, nn, ops, train

__all__ = ["Switch", "SwitchSet", "ops", "nn", "models", "train"]
__version__ = "0.1.0"
