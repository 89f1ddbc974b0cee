"""Functional ParaDiS ops: the paradis op library (torch.ops.paradis) behind input checks and the
choice of a backend."""

from .backends import Backend, available_backends, backend_for, forced_backend, register_backend, use_backend
from .depthwise_conv import depthwise_conv2d
from .explain import explain
from .sliced_conv import sliced_conv2d
from .switch_bn import switch_batch_norm

__all__ = [
    "sliced_conv2d",
    "switch_batch_norm",
    "depthwise_conv2d",
    "explain",
    "use_backend",
    "available_backends",
    "forced_backend",
    "backend_for",
    "register_backend",
    "Backend",
]
