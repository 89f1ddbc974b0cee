"""The distillation losses against hand-written formulas, and training that learns."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from paradis_fast.models import resnet20
from paradis_fast.train import InplaceDistillationLoss, SuperResolutionLoss, evaluate, fit
from paradis_fast.train.datasets import digits


def _by_hand(logits, target, teacher, weight, t):
    loss = F.cross_entropy(logits[teacher].double(), target)
    p = torch.softmax(logits[teacher].double() / t, -1)
    for s in range(logits.shape[0]):
        if s != teacher:
            q = torch.log_softmax(logits[s].double() / t, -1)
            loss = loss + weight * t * t * (p * (p.log() - q)).sum(-1).mean()
    return loss


@pytest.mark.parametrize("teacher,weight,t", [(0, 1.0, 1.0), (2, 0.5, 4.0), (1, 2.0, 0.5)])
def test_loss_matches_formula(teacher, weight, t):
    torch.manual_seed(teacher)
    logits, target = torch.randn(3, 6, 5), torch.randint(0, 5, (6,))
    got = InplaceDistillationLoss(teacher, weight, t)(logits, target)
    torch.testing.assert_close(got.double(), _by_hand(logits, target, teacher, weight, t), rtol=1e-5, atol=1e-6)


def test_teacher_is_not_pulled_by_students():
    logits = torch.randn(3, 4, 5, requires_grad=True)
    target = torch.randint(0, 5, (4,))
    InplaceDistillationLoss(teacher=0)(logits, target).backward()
    alone = logits.detach().clone().requires_grad_()
    F.cross_entropy(alone[0], target).backward()
    torch.testing.assert_close(logits.grad[0], alone.grad[0])
    assert logits.grad[1:].abs().sum() > 0


def test_single_switch_is_cross_entropy():
    logits, target = torch.randn(1, 8, 3), torch.randint(0, 3, (8,))
    torch.testing.assert_close(InplaceDistillationLoss()(logits, target), F.cross_entropy(logits[0], target))


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(teacher=5)])
def test_loss_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        InplaceDistillationLoss(**bad)(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long))


def test_loss_rejects_flat_logits():
    with pytest.raises(ValueError, match=r"\[S, B, K\]"):
        InplaceDistillationLoss()(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


def test_training_on_digits_lifts_every_switch_far_above_chance():
    torch.manual_seed(0)
    split = digits(seed=0)
    switches = ["1x1.0", "2x0.5", "4x0.25", "0.5+0.25+0.25"]
    model = resnet20(num_classes=10, switches=switches, in_channels=1)
    train = DataLoader(
        split.train, batch_size=32, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(split.val, batch_size=256)
    before = evaluate(model, val)
    after = fit(model, train, val, epochs=2, lr=0.05, log=lambda line: None)
    assert list(after) == switches
    for switch, accuracy in after.items():
        assert accuracy > 0.5, (switch, before[switch], accuracy)  # chance is 0.1
    assert math.isfinite(sum(after.values()))


@pytest.mark.parametrize("teacher,weight", [(0, 0.0), (0, 1.0), (1, 0.5)])
def test_super_resolution_loss_matches_formula(teacher, weight):
    torch.manual_seed(teacher)
    outputs, target = torch.rand(3, 2, 3, 4, 5, dtype=torch.float64), torch.rand(2, 3, 4, 5, dtype=torch.float64)
    got = SuperResolutionLoss(teacher, weight)(outputs, target)
    expected = sum(F.l1_loss(outputs[s], target) for s in range(3))
    for s in range(3):
        if s != teacher:
            expected = expected + weight * (outputs[s] - outputs[teacher]).abs().mean()
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="teacher index 3"):
        SuperResolutionLoss(3)(outputs, target)


def test_super_resolution_teacher_is_not_pulled_by_students():
    outputs, target = torch.rand(2, 2, 3, 4, 4, requires_grad=True), torch.rand(2, 3, 4, 4)
    SuperResolutionLoss(distill_weight=1.0)(outputs, target).backward()
    alone = outputs.detach().clone().requires_grad_()
    F.l1_loss(alone[0], target).backward()
    torch.testing.assert_close(outputs.grad[0], alone.grad[0])
    with pytest.raises(ValueError, match="expected \\[S, \\*target shape\\]"):
        SuperResolutionLoss()(torch.rand(2, 3, 4, 4), target)
