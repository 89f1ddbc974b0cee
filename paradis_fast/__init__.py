"""paradis_fast: fast training and deployment of ParaDiS (parallelly distributable slimmable) networks."""

from ._openmp import set_default_wait_policy

set_default_wait_policy()

from .switches import Switch, SwitchSet  # noqa: E402 (after the wait policy: this imports torch)
from . import models, nn, ops, train  # noqa: E402

__all__ = ["Switch", "SwitchSet", "ops", "nn", "models", "train"]
__version__ = "0.1.0"
