"""split(model, switch): standalone per-device parts of stock layers whose fused partial outputs
equal the model's output for that switch (eval mode, float64, trained BatchNorm statistics)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from paradis_fast import models
from paradis_fast.deploy import split
from paradis_fast.nn import SwitchBatchNorm2d, Switchable
from paradis_fast.train.baselines import share_batch_norm_affine

from conftest import ALL_SWITCHES

# Tiny members of each family; every pool switch fits their narrowest layers.
BUILDERS = {
    "mobilenet_v1": (lambda s: models.mobilenet_v1(7, s, width_mult=0.25, small_input=True), (3, 16, 16)),
    "resnet20": (lambda s: models.resnet20(7, s, width_mult=0.5), (3, 12, 12)),
    "resnet50": (lambda s: models.resnet50(7, s, width_mult=0.125), (3, 32, 32)),
    "wdsr_a": (lambda s: models.wdsr_a(2, s, n_feats=8, block_feats=16, n_blocks=2, res_scale=0.7), (3, 6, 7)),
    "wdsr_b": (lambda s: models.wdsr_b(3, s, n_feats=8, block_feats=16, n_blocks=2), (3, 5, 6)),
}


def trained_model(name: str, switches=ALL_SWITCHES) -> tuple[Switchable, tuple]:
    """A float64 model with random affine BatchNorm rows and running statistics from a few
    training forwards, so every fold and every switch's row is non-trivial. Returned in eval mode."""
    builder, image_shape = BUILDERS[name]
    torch.manual_seed(len(name))
    model = builder(list(switches)).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.3)
                module.bias.normal_(0, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *image_shape, dtype=torch.float64) * 2 + 0.5)
    return model.eval(), image_shape


@pytest.fixture(scope="module", params=list(BUILDERS))
def trained(request):
    return request.param, *trained_model(request.param)


@pytest.mark.parametrize("switch", ALL_SWITCHES)
def test_fused_parts_equal_the_model(trained, switch):
    name, model, image_shape = trained
    result = assert_parts_fuse_to_model(model, image_shape, switch)
    assert len(result.parts) == len(switch.split("+")) if "+" in switch else int(switch.split("x")[0])


def assert_parts_fuse_to_model(model, image_shape, switch):
    """The split parts of switch, run and fused, give the model's output for that switch; returns
    the split."""
    image = torch.randn(3, *image_shape, dtype=torch.float64)
    with torch.no_grad():
        expected = model.set_active([switch])(image)[0]
        result = split(model, switch)
        partials = [part(image) for part in result.parts]
        fused = result.fuse(partials, image)
    assert expected.abs().max() > 1e-3  # a real signal, not a vanishing one
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-7)
    # each part is the whole sub-network: its partial output matters
    assert all(p.abs().max() > 1e-6 for p in partials)
    return result


def shared_affine_model(name: str, switches=ALL_SWITCHES) -> tuple[Switchable, tuple]:
    """A float64 model whose BatchNorm layers share one affine row, as the universally slimmable
    baseline trains them (`share_batch_norm_affine`), live (weight and bias ``[1, C]``): a random
    shared row, random running statistics different for every switch. Returned in eval mode."""
    builder, image_shape = BUILDERS[name]
    torch.manual_seed(100 + len(name))
    model = builder(list(switches)).double()
    assert share_batch_norm_affine(model) > 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchBatchNorm2d):
                assert module.shares_affine and module.weight.shape == (1, module.num_features)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.3)
                module.bias.normal_(0, 0.3)
    return model.eval(), image_shape


@pytest.fixture(scope="module", params=[name for name in BUILDERS if not name.startswith("wdsr")])  # WDSR: no BN
def shared(request):
    return request.param, *shared_affine_model(request.param)


@pytest.mark.parametrize("switch", ALL_SWITCHES)
def test_fused_parts_equal_a_live_shared_affine_model(shared, switch):
    """Every switch's BatchNorm row folds the one shared gamma and beta (row 0 of the live
    ``[1, C]`` parameters) with that switch's own statistics."""
    name, model, image_shape = shared
    assert_parts_fuse_to_model(model, image_shape, switch)


def test_shared_affine_model_splits_like_its_checkpoint():
    """The live shared model and an ordinary model loaded from its state dict (the ``[S, C]``
    tables, the row repeated: what deployment loads) give the same parts."""
    switches = ["1x1.0", "2x0.5", "0.5+0.25+0.25"]
    model, image_shape = shared_affine_model("resnet20", switches)
    plain = BUILDERS["resnet20"][0](switches).double()
    plain.load_state_dict(model.state_dict())
    assert not any(m.shares_affine for m in plain.modules() if isinstance(m, SwitchBatchNorm2d))
    image = torch.randn(2, *image_shape, dtype=torch.float64)
    for switch in switches:
        live, loaded = split(model, switch), split(plain.eval(), switch)
        for a, b in zip(live.parts, loaded.parts):
            torch.testing.assert_close(a(image), b(image), rtol=0, atol=0)


def test_affine_row_reads_the_shared_row():
    bn = SwitchBatchNorm2d(4, ["1x1.0", "2x0.5"])
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]))
        bn.bias.copy_(-bn.weight)
    assert bn.affine_row(1)[0].tolist() == [5, 6, 7, 8] and bn.affine_row(1)[1].tolist() == [-5, -6, -7, -8]
    bn.share_affine()
    for row in (0, 1):
        weight, bias = bn.affine_row(row)
        assert weight.tolist() == [1, 2, 3, 4] and bias.tolist() == [-1, -2, -3, -4]
    with pytest.raises(IndexError, match="row 2 out of range"):
        bn.affine_row(2)


def test_parts_hold_only_stock_layers_and_report_their_cost():
    model, image_shape = trained_model("resnet20", ["1x1.0", "0.3+0.7", "4x0.25"])
    result = split(model, "0.3+0.7")
    for part in result.parts:
        for module in part.modules():
            has_state = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            assert not isinstance(module, Switchable)
            if has_state:
                assert type(module) in (nn.Conv2d, nn.Linear), type(module)
    stats = result.stats(image_shape)
    image = torch.zeros(1, *image_shape, dtype=torch.float64)
    for part, stat in zip(result.parts, stats):
        with FlopCounterMode(display=False) as counter:
            part(image)
        assert stat.flops == counter.get_total_flops() > 0
        assert stat.params == sum(p.numel() for p in part.parameters())
        assert stat.bytes_sent == 7 * 8  # 7 float64 partial logits per image
    assert stats[0].flops < stats[1].flops  # the 0.3 device does less work than the 0.7 one


def test_wdsr_part_sends_the_pre_shuffle_tail_output():
    model, image_shape = trained_model("wdsr_b", ["1x1.0", "2x0.5"])
    stats = split(model, "2x0.5").stats(image_shape)
    assert [s.bytes_sent for s in stats] == [3 * 9 * 5 * 6 * 8] * 2  # 3 * scale**2 channels, float64


def test_bad_input_is_named():
    model, image_shape = trained_model("mobilenet_v1", ["1x1.0", "2x0.5"])
    with pytest.raises(ValueError, match="4x0.25 is not in the switch set"):
        split(model, "4x0.25")
    result = split(model, "2x0.5")
    with pytest.raises(ValueError, match="2 parts, got 1"):
        result.fuse([torch.zeros(1, 7)])
    with pytest.raises(TypeError, match="no layout known for Sequential"):
        split(nn.Sequential(nn.Linear(2, 2)), "1x1.0")
    sr, sr_shape = trained_model("wdsr_a", ["1x1.0"])
    parts = split(sr, "1x1.0")
    image = torch.randn(1, *sr_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="skip branch"):
        parts.fuse([parts.parts[0](image)])
