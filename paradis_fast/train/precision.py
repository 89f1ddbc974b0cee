"""Training precision: float32, or torch.autocast in bfloat16 / float16 with float32 master weights.

The parameters, optimizer state and checkpoints stay float32 whatever the precision; autocast runs
the convolutions and matrix products in the low dtype. float16's narrow range needs loss scaling
(`torch.amp.GradScaler`): a step whose gradients hold inf or nan is skipped and counted, so the
trainer can report it instead of hiding it.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_capabilities() -> dict:
    """The CPU's features as ATen sees them (the table csrc/cpu/isa.h reads too)."""
    return torch._C._cpu._get_cpu_capability()


def fast_bf16(device: torch.device) -> bool:
    """Whether the device trains faster in bfloat16 than in float32: GPUs with bfloat16 tensor cores
    (Ampere on), CPUs with AMX-BF16 tiles. AVX512-BF16 alone (dot products of twice float32's rate)
    does not pay for autocast's casts on the small models and batches this package trains by
    default (bench/README.md), and elsewhere bfloat16 is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_capabilities().get("amx_bf16"))
    return False


def default_precision(device: torch.device) -> str:
    return "bf16" if fast_bf16(device) else "fp32"


class Precision:
    """How a training step computes: ``with precision.autocast():`` around the forward and the loss,
    then ``precision.backward_and_step(loss, optimizer)``."""

    def __init__(self, name: str, device: torch.device | str = "cpu"):
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
        self.name, self.device = name, torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=name == "fp16")
        self.skipped_steps = 0

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Backward and optimizer step; False when the step was skipped for inf/nan gradients."""
        if not self.scaler.is_enabled():
            loss.backward()
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale  # the scale drops exactly when the step was skipped
        self.skipped_steps += not stepped
        return stepped

    def state_dict(self) -> dict:
        return {"name": self.name, "scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"the checkpoint trained in {state['name']}, this run asks for {self.name}")
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state["skipped_steps"]

    def __str__(self) -> str:
        if self.name == "fp32":
            return "fp32"
        return f"{self.name} autocast" + (" with loss scaling" if self.scaler.is_enabled() else "")
