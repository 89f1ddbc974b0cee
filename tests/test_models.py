"""paradis_fast.models: shapes, switch subsets, isolation of inactive switches, the zero invariant of
uncovered channels, and equivalence of the 1x1.0 switch with a dense twin built from stock layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from paradis_fast import Switch
from paradis_fast.models import (
    BasicBlock,
    Bottleneck,
    ResNet,
    WDSRBlockA,
    WDSRBlockB,
    mobilenet_v1,
    resnet20,
    resnet50,
    wdsr_a,
    wdsr_b,
)
from paradis_fast.models._common import kept_strides
from paradis_fast.nn import SlicedConv2d, SwitchBatchNorm2d

SWITCHES = ("1x1.0", "2x0.5", "4x0.25", "0.5+0.25+0.25", "3x1/3", "1x0.5")
# 4 images of 16 px: with fewer values per channel (2 images at 1x1 deep in the nets), training-mode
# BatchNorm is so ill-conditioned that float64 roundoff grows to ~1e-7 and the dense comparison is noise.
BATCH, SIZE, CLASSES = 4, 16, 5

# Tiny configurations: every sliced layer has >= 8 channels (6 for WDSR-B's low-rank layer).
BUILDERS = {
    "mobilenet_v1": lambda sw: mobilenet_v1(CLASSES, sw, width_mult=0.25, small_input=True),
    "resnet20": lambda sw: resnet20(CLASSES, sw, width_mult=0.5),
    "resnet50": lambda sw: resnet50(CLASSES, sw, width_mult=0.25, small_input=True),
    "wdsr_a": lambda sw: wdsr_a(2, sw, n_feats=8, block_feats=16, n_blocks=2, res_scale=0.5),
    "wdsr_b": lambda sw: wdsr_b(3, sw, n_feats=8, block_feats=16, n_blocks=2),
}
OUTPUT = {
    "mobilenet_v1": (CLASSES,),
    "resnet20": (CLASSES,),
    "resnet50": (CLASSES,),
    "wdsr_a": (3, 2 * SIZE, 2 * SIZE),
    "wdsr_b": (3, 3 * SIZE, 3 * SIZE),
}
WITH_BN = ("mobilenet_v1", "resnet20", "resnet50")
SUBSETS = {
    "all": None,
    "reordered": ["4x0.25", "1x1.0"],
    "narrow": ["1x0.5"],
    "unequal": ["0.5+0.25+0.25", "3x1/3"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, which thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, dtype=dtype)


def randomize_bn(model: nn.Module) -> None:
    """Distinct affine parameters and running statistics per switch, so that mixing rows shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2)


# --------------------------------------------------------------------------------------------
# dense twins: the same module trees made of stock layers, so state dicts match by name
def dense_conv_bn(in_channels, out_channels, kernel_size, stride=1, relu=True, groups=1) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class DenseMobileNetV1(nn.Module):
    def __init__(self, width_mult, small_input):
        super().__init__()
        width = lambda c: max(8, int(c * width_mult))  # noqa: E731
        channels = width(32)
        layers = [dense_conv_bn(3, channels, 3, 1 if small_input else 2)]
        table = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
        for out, stride in table:
            layers.append(
                nn.Sequential(
                    dense_conv_bn(channels, channels, 3, stride, groups=channels),
                    dense_conv_bn(channels, width(out), 1),
                )
            )
            channels = width(out)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, CLASSES)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class DenseBlock(nn.Module):
    def __init__(self, in_planes, planes, stride, bottleneck):
        super().__init__()
        if bottleneck:
            convs = [(in_planes, planes, 1, 1), (planes, planes, 3, stride), (planes, 4 * planes, 1, 1)]
        else:
            convs = [(in_planes, planes, 3, stride), (planes, planes, 3, 1)]
        for n, (i, o, k, s) in enumerate(convs, 1):
            self.add_module(f"conv{n}", dense_conv_bn(i, o, k, s, relu=n < len(convs)))
        self.num_convs, out = len(convs), convs[-1][1]
        self.shortcut = (
            dense_conv_bn(in_planes, out, 1, stride, relu=False) if stride != 1 or in_planes != out else nn.Identity()
        )

    def forward(self, x):
        y = x
        for n in range(1, self.num_convs + 1):
            y = getattr(self, f"conv{n}")(y)
        return F.relu(y + self.shortcut(x))


class DenseResNet(nn.Module):
    def __init__(self, blocks, planes, bottleneck):
        super().__init__()
        self.stem = dense_conv_bn(3, planes[0], 3)
        stages, in_planes = [], planes[0]
        for i, (count, width) in enumerate(zip(blocks, planes)):
            stage = []
            for j in range(count):
                stage.append(DenseBlock(in_planes, width, 2 if i > 0 and j == 0 else 1, bottleneck))
                in_planes = width * (4 if bottleneck else 1)
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, CLASSES)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def wn_conv(in_channels, out_channels, kernel_size):
    return weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2))


class DenseResidual(nn.Module):
    def __init__(self, *layers, res_scale=1.0):
        super().__init__()
        self.body, self.res_scale = nn.Sequential(*layers), res_scale

    def forward(self, x):
        return x + self.body(x) * self.res_scale


class DenseWDSR(nn.Module):
    def __init__(self, scale, n_feats, blocks):
        super().__init__()
        self.head = wn_conv(3, n_feats, 3)
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Sequential(wn_conv(n_feats, 3 * scale**2, 3), nn.PixelShuffle(scale))
        self.skip = nn.Sequential(wn_conv(3, 3 * scale**2, 5), nn.PixelShuffle(scale))

    def forward(self, x):
        return self.tail(self.body(self.head(x))) + self.skip(x)


DENSE = {
    "mobilenet_v1": lambda: DenseMobileNetV1(0.25, small_input=True),
    "resnet20": lambda: DenseResNet((3, 3, 3), (8, 16, 32), bottleneck=False),
    "resnet50": lambda: DenseResNet((3, 4, 6, 3), (16, 32, 64, 128), bottleneck=True),
    "wdsr_a": lambda: DenseWDSR(
        2, 8, [DenseResidual(wn_conv(8, 16, 3), nn.ReLU(), wn_conv(16, 8, 3), res_scale=0.5) for _ in range(2)]
    ),
    "wdsr_b": lambda: DenseWDSR(
        3, 8, [DenseResidual(wn_conv(8, 16, 1), nn.ReLU(), wn_conv(16, 6, 1), wn_conv(6, 8, 3)) for _ in range(2)]
    ),
}


def switch_tensor(model: nn.Module, name: str, tensor: torch.Tensor, row: int) -> torch.Tensor:
    """`tensor` of the model, reduced to switch `row` where it belongs to a SwitchBatchNorm2d."""
    owner = model.get_submodule(name.rpartition(".")[0])
    return tensor[row] if isinstance(owner, SwitchBatchNorm2d) else tensor


def dense_twin(name: str, model: nn.Module, switch: str = "1x1.0") -> nn.Module:
    row = model.switches.index(switch)
    dense = DENSE[name]().to(next(model.parameters()).dtype)
    dense.load_state_dict({k: switch_tensor(model, k, v, row) for k, v in model.state_dict().items()})
    return dense


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("name", BUILDERS)
def test_forward_backward(name, subset):
    model = BUILDERS[name](SWITCHES).set_active(SUBSETS[subset])
    y = model(images())
    assert y.shape == (len(model.active), BATCH, *OUTPUT[name])
    y.square().sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0 or isinstance(
            model.get_submodule(param_name.rpartition(".")[0]), SwitchBatchNorm2d
        ), f"{param_name} got no gradient"


@pytest.mark.parametrize("name", BUILDERS)
def test_set_active_selects_and_orders_switches(name):
    model = BUILDERS[name](SWITCHES).eval()
    randomize_bn(model)
    x = images()
    with torch.no_grad():
        every = model(x)
        subset = model.set_active(["4x0.25", "1x1.0"])(x)
        assert model.set_active(None)(x).shape[0] == len(SWITCHES)
    # a subset of switches is another layer shape, whose CPU convolution path (measured per shape)
    # may sum in another order
    torch.testing.assert_close(subset, every[[2, 0]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", WITH_BN)
def test_training_step_leaves_inactive_switches_untouched(name):
    model = BUILDERS[name](SWITCHES).train()
    randomize_bn(model)
    active = ["3x1/3", "1x0.5"]
    rows = [SWITCHES.index(s) for s in active]
    inactive = [r for r in range(len(SWITCHES)) if r not in rows]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_active(active)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images()).square().sum().backward()
    optimizer.step()
    after = model.state_dict()
    bn_keys = [k for k in after if isinstance(model.get_submodule(k.rpartition(".")[0]), SwitchBatchNorm2d)]
    assert bn_keys
    for key in bn_keys:
        assert torch.equal(after[key][inactive], before[key][inactive]), key
    for suffix in ("weight", "running_mean", "num_batches_tracked"):
        key = next(k for k in bn_keys if k.endswith(suffix))
        assert not torch.equal(after[key][rows], before[key][rows]), f"{key} of the active switches did not train"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", BUILDERS)
def test_widest_switch_equals_dense_network(name, train):
    model = BUILDERS[name](SWITCHES).double()
    randomize_bn(model)
    dense = dense_twin(name, model)
    model.set_active(["1x1.0"]).train(train)
    dense.train(train)
    x = images(torch.float64)
    y, expected = model(x), dense(x)
    assert y.shape == (1, *expected.shape)
    torch.testing.assert_close(y[0], expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    params = dict(model.named_parameters())
    for key, param in dense.named_parameters():
        torch.testing.assert_close(switch_tensor(model, key, params[key].grad, 0), param.grad, msg=key)
    if train:  # the running statistics took the same update
        state = model.state_dict()
        for key, value in dense.state_dict().items():
            torch.testing.assert_close(switch_tensor(model, key, state[key], 0), value, msg=key)


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_round_trip(name):
    model = BUILDERS[name](SWITCHES).eval()
    randomize_bn(model)
    fresh = BUILDERS[name](SWITCHES).eval()
    fresh.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    "build",
    [
        lambda: wdsr_a(switches=["4x0.25"], n_feats=2),
        lambda: wdsr_b(switches=["1x1.0", "4x0.25"], n_feats=8, low_rank_feats=2),
        lambda: ResNet(BasicBlock, (1,), (2,), 2, False, CLASSES, ["4x0.25"]),
    ],
    ids=["wdsr_a", "wdsr_b-low-rank", "resnet"],
)
def test_too_few_channels_for_a_switch_is_an_error(build):
    with pytest.raises(ValueError, match=r"4x0\.25 .*empty slice .*\b2 channels"):
        build()


@pytest.mark.parametrize("name", BUILDERS)
def test_uncovered_channels_stay_zero(name):
    model = BUILDERS[name](SWITCHES).train()
    randomize_bn(model)
    active = [Switch.parse(s) for s in ("1x0.5", "0.5+0.25+0.25", "3x1/3", "1x1.0")]
    model.set_active(active)
    seen = []

    def check(module, _inputs, output):
        per_switch = output.unflatten(0, (len(active), -1))
        for switch, y in zip(active, per_switch):
            covered = switch.covered(output.shape[1])
            assert torch.equal(y[:, covered:], torch.zeros_like(y[:, covered:])), f"{type(module).__name__} {switch}"
        seen.append(module)

    watched = (SlicedConv2d, SwitchBatchNorm2d, BasicBlock, Bottleneck, WDSRBlockA, WDSRBlockB)
    for module in model.modules():
        if isinstance(module, watched) or (isinstance(module, nn.Conv2d) and module.groups > 1):
            module.register_forward_hook(check)
    model(images()).sum().backward()
    assert any(isinstance(m, SlicedConv2d) for m in seen)
    assert any(not isinstance(m, (SlicedConv2d, SwitchBatchNorm2d)) for m in seen)  # blocks or depthwise convs


@pytest.mark.parametrize(
    "build",
    [
        lambda: mobilenet_v1(CLASSES, ["1x1.0", "2x0.5"], width_mult=0.25, in_channels=1),
        lambda: resnet50(CLASSES, ["1x1.0", "2x0.5"], width_mult=0.125, in_channels=1),
    ],
    ids=["mobilenet_v1", "resnet50"],
)
def test_imagenet_stem(build):
    """The stride-2 stems (and ResNet's max pool) on single-channel 32 px images."""
    model = build()
    y = model(torch.randn(BATCH, 1, 32, 32))
    assert y.shape == (2, BATCH, CLASSES)
    y.sum().backward()


@pytest.mark.parametrize("build,scale", [(wdsr_a, 2), (wdsr_b, 3), (wdsr_a, 4)])
def test_wdsr_skip_starts_as_bicubic(build, scale):
    """A fresh WDSR's skip branch is bicubic upscaling away from the border (where conv pads with
    zeros and interpolation replicates), in both the 1-channel and RGB variants."""
    for channels in (1, 3):
        model = build(scale, ["1x1.0"], n_feats=8, block_feats=16, n_blocks=1, in_channels=channels)
        x = torch.rand(2, channels, 13, 11)
        border = 2 * scale
        got = model.skip(x)[..., border:-border, border:-border]
        expected = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)[
            ..., border:-border, border:-border
        ]
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-6)


@pytest.mark.parametrize("name", BUILDERS)
def test_channels_last_and_nchw_runs_agree(name):
    """On CPU the models run channels_last by default (input_layout); forcing NCHW gives the same
    outputs and gradients (float64, training mode), so the layout is a speed choice only."""
    torch.manual_seed(0)
    model = BUILDERS[name](SWITCHES).double().train()
    x = images(torch.float64)
    assert model.input_layout(x).is_contiguous(memory_format=torch.channels_last)
    results = []
    for channels_last in (None, False):
        model.channels_last = channels_last
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.input_layout(x).is_contiguous()
    (y_cl, grads_cl), (y_nchw, grads_nchw) = results
    torch.testing.assert_close(y_cl, y_nchw, rtol=1e-9, atol=1e-9)
    for param_name in grads_cl:
        torch.testing.assert_close(
            grads_cl[param_name], grads_nchw[param_name], rtol=1e-8, atol=1e-9, msg=lambda m: f"{param_name}: {m}"
        )


@pytest.mark.parametrize(
    "builder",
    [
        lambda: mobilenet_v1(CLASSES, ["1x1.0", "2x0.5"], width_mult=0.25, small_input=True, in_channels=1),
        lambda: resnet20(CLASSES, ["1x1.0", "2x0.5"], width_mult=0.5, in_channels=1),
        lambda: wdsr_a(2, ["1x1.0", "2x0.5"], n_feats=8, block_feats=16, n_blocks=1, in_channels=1),
    ],
    ids=["mobilenet_v1", "resnet20", "wdsr_a"],
)
@pytest.mark.skipif(
    not torch.backends.mkldnn.enabled,
    reason="oneDNN is off (tests/conftest.py): ATen's own depthwise convolution returns 1-pixel images NCHW",
)
def test_one_channel_images_run_channels_last(builder):
    """A grayscale image is NCHW and channels_last at once (the same memory); input_layout marks it
    channels_last in its strides, so every layer after the stem runs channels_last on CPU too."""
    from paradis_fast.ops.layout import memory_format

    model = builder()
    x = torch.randn(2, 1, SIZE, SIZE)
    assert memory_format(x) == torch.contiguous_format
    assert memory_format(model.input_layout(x)) == torch.channels_last
    assert torch.equal(model.input_layout(x), x)
    layouts = []
    for module in model.modules():
        if isinstance(module, (SlicedConv2d, SwitchBatchNorm2d)):
            module.register_forward_hook(lambda m, i, o: layouts.append(memory_format(o)))
    model(x)
    assert layouts and set(layouts) == {torch.channels_last}


@pytest.mark.parametrize("name", ["mobilenet_v1", "resnet20", "wdsr_a"])
def test_torch_compile_fullgraph_of_a_channels_last_model(name):
    """A whole model compiles into one graph on CPU, where it runs channels_last: the ops' fake
    implementations give the layouts their kernels return. float64, so the comparison is tight."""
    torch.manual_seed(0)
    model = BUILDERS[name](["1x1.0", "2x0.5", "0.5+0.25+0.25"]).double().eval()
    x = images(torch.float64)
    expected = model(x)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "strides, size, kept",
    [
        ([1, 2, 2, 2, 2], 8, [1, 2, 2, 1, 1]),  # 8 -> 4 -> 2, then kept at 2x2
        ([1, 2, 2, 2, 2], 32, [1, 2, 2, 2, 2]),  # stock schedule: 32 -> 2
        ([2, 2, 2, 2, 2, 2], 224, [2, 2, 2, 2, 2, 2]),
        ([1, 2, 2], 3, [1, 2, 1]),  # ceil(3 / 2) = 2 is still allowed
        ([2, 2], 1, [1, 1]),
        ([1, 2, 2], None, [1, 2, 2]),
    ],
)
def test_kept_strides_stop_downsampling_at_2x2(strides, size, kept):
    assert kept_strides(strides, size) == kept


@pytest.mark.parametrize(
    "build, size, small_input",
    [(mobilenet_v1, 8, True), (resnet20, 8, None), (resnet50, 9, True), (resnet50, 16, False)],
)
def test_input_size_keeps_the_last_feature_map_at_2x2(build, size, small_input):
    kwargs = dict(num_classes=5, switches=["1x1.0", "2x0.5"], width_mult=0.25, input_size=size)
    if small_input is not None:
        kwargs["small_input"] = small_input
    model = build(**kwargs).eval()
    seen = []
    pool = model.avgpool.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-2:]))
    with torch.no_grad():
        assert model(torch.randn(3, 3, size, size)).shape == (2, 3, 5)
    pool.remove()
    assert min(seen[0]) == 2


@pytest.mark.parametrize("build, size", [(mobilenet_v1, 32), (mobilenet_v1, 224), (resnet20, 32), (resnet50, 64)])
def test_input_size_leaves_large_enough_images_to_the_stock_schedule(build, size):
    strides = [m.stride for m in build(switches=["1x1.0"]).modules() if isinstance(m, SlicedConv2d)]
    sized = [m.stride for m in build(switches=["1x1.0"], input_size=size).modules() if isinstance(m, SlicedConv2d)]
    assert sized == strides
