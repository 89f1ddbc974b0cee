"""Functional ParaDiS ops (torch.library custom ops with autograd and backend dispatch)."""
from .backends import available_backends, forced_backend, use_backend
from .depthwise_conv import depthwise_conv2d
from .sliced_conv import sliced_conv2d
from .switch_bn import switch_batch_norm

__all__ = ["sliced_conv2d", "switch_batch_norm", "depthwise_conv2d", "use_backend", "available_backends", "forced_backend"]
