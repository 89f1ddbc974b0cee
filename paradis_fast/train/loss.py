"""In-place distillation (DESIGN §5): the widest switch learns from the labels, the others from it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InplaceDistillationLoss(nn.Module):
    """Loss of all switches of one forward: ``[S, B, K]`` logits and ``[B]`` class targets.

    ``CE(logits[teacher], target) + distill_weight * T^2 * sum_s KL(p_teacher || p_s)`` over the
    other switches s, where ``p = softmax(logits / T)`` and the teacher's ``p`` is detached, so the
    students never pull the teacher towards them. Defaults (weight 1, T = 1) are those of
    slimmable networks' in-place distillation; T^2 keeps gradient sizes comparable across T.
    """

    def __init__(
        self, teacher: int = 0, distill_weight: float = 1.0, temperature: float = 1.0, label_smoothing: float = 0.0
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.teacher, self.distill_weight = teacher, distill_weight
        self.temperature, self.label_smoothing = temperature, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3:
            raise ValueError(f"expected [S, B, K] logits of S switches, got shape {tuple(logits.shape)}")
        if not -logits.shape[0] <= self.teacher < logits.shape[0]:
            raise ValueError(f"teacher index {self.teacher} is out of range for {logits.shape[0]} switches")
        teacher = logits[self.teacher]
        loss = F.cross_entropy(teacher, target, label_smoothing=self.label_smoothing)
        students = [s for s in range(logits.shape[0]) if s != self.teacher % logits.shape[0]]
        if not students or self.distill_weight == 0:
            return loss
        t = self.temperature
        soft_teacher = F.log_softmax(teacher.detach() / t, dim=-1)
        soft_students = F.log_softmax(logits[students] / t, dim=-1)
        kl = F.kl_div(soft_students, soft_teacher.expand_as(soft_students), log_target=True, reduction="none")
        return loss + self.distill_weight * t * t * kl.sum(-1).mean(-1).sum()

    def extra_repr(self) -> str:
        return (
            f"teacher={self.teacher}, distill_weight={self.distill_weight}, "
            f"temperature={self.temperature}, label_smoothing={self.label_smoothing}"
        )


class SuperResolutionLoss(nn.Module):
    """Loss of all switches of a super-resolution forward: ``[S, B, C, H, W]`` outputs, ``[B, C, H, W]`` targets.

    ``sum_s L1(out[s], target) + distill_weight * sum_s L1(out[s], out[teacher].detach())`` over the
    students s: every switch learns from the high-resolution images (L1, as EDSR/WDSR train).
    Distillation is off by default because it hurts here: unlike a classifier's soft labels, the
    teacher's image carries nothing the target lacks, and the students pulling the shared weights
    (tail and skip branch included) towards the teacher's early, poor output cost every switch,
    the teacher too, 4-10 dB in our runs (see README, super-resolution).
    """

    def __init__(self, teacher: int = 0, distill_weight: float = 0.0):
        super().__init__()
        self.teacher, self.distill_weight = teacher, distill_weight

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != target.dim() + 1 or outputs.shape[1:] != target.shape:
            raise ValueError(
                f"expected [S, *target shape] outputs for targets of shape {tuple(target.shape)}, "
                f"got {tuple(outputs.shape)}"
            )
        if not -outputs.shape[0] <= self.teacher < outputs.shape[0]:
            raise ValueError(f"teacher index {self.teacher} is out of range for {outputs.shape[0]} switches")
        loss = _per_switch_l1(outputs, target).sum()
        students = [s for s in range(outputs.shape[0]) if s != self.teacher % outputs.shape[0]]
        if not students or self.distill_weight == 0:
            return loss
        return loss + self.distill_weight * _per_switch_l1(outputs[students], outputs[self.teacher].detach()).sum()

    def extra_repr(self) -> str:
        return f"teacher={self.teacher}, distill_weight={self.distill_weight}"


def _per_switch_l1(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each switch's ``[B, ...]`` output against ``target``: ``[S]``."""
    return (outputs - target).abs().flatten(1).mean(1)
