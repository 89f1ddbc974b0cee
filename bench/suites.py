"""Layer shapes of the benchmark, taken from the models at the sizes the issue fixes (32x32 inputs,
batch 64 for classification; WDSR body layers on 32x32 patches, batch 16)."""

from __future__ import annotations

import dataclasses
import math
import random

from paradis_fast import SwitchSet
from paradis_fast.errors import UserError

SWITCHES = ("1x1.0", "2x0.5", "4x0.25")


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    size: int  # input height = width
    batch: int  # per switch
    switches: tuple[str, ...] = ()  # the layer's own switch set; () for the run's (SWITCHES)

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1


@dataclasses.dataclass(frozen=True)
class BNLayer:
    name: str
    channels: int
    size: int
    batch: int
    switches: tuple[str, ...] = ()  # the layer's own switch set; () for the run's (SWITCHES)


CONV_LAYERS = (
    # MobileNet v1 (small_input) pointwise layers
    ConvLayer("mbv1.pw1 32-64 @32", 32, 64, 1, 1, 32, 64),
    ConvLayer("mbv1.pw2 64-128 @16", 64, 128, 1, 1, 16, 64),
    ConvLayer("mbv1.pw3 128-128 @16", 128, 128, 1, 1, 16, 64),
    ConvLayer("mbv1.pw5 256-256 @8", 256, 256, 1, 1, 8, 64),
    ConvLayer("mbv1.pw7 512-512 @4", 512, 512, 1, 1, 4, 64),
    ConvLayer("mbv1.pw13 1024-1024 @2", 1024, 1024, 1, 1, 2, 64),
    # ResNet20 3x3 layers and 1x1 shortcut
    ConvLayer("resnet20 3x3 16-16 @32", 16, 16, 3, 1, 32, 64),
    ConvLayer("resnet20 3x3 32-32 @16", 32, 32, 3, 1, 16, 64),
    ConvLayer("resnet20 3x3 64-64 @8", 64, 64, 3, 1, 8, 64),
    ConvLayer("resnet20 1x1 s2 32-64 @16", 32, 64, 1, 2, 16, 64),
    # ResNet50 bottleneck at 8x8
    ConvLayer("resnet50 1x1 256-64 @8", 256, 64, 1, 1, 8, 64),
    ConvLayer("resnet50 3x3 64-64 @8", 64, 64, 3, 1, 8, 64),
    ConvLayer("resnet50 1x1 64-256 @8", 64, 256, 1, 1, 8, 64),
    # WDSR-A / WDSR-B body layers
    ConvLayer("wdsr_a 3x3 32-128 @32", 32, 128, 3, 1, 32, 16),
    ConvLayer("wdsr_a 3x3 128-32 @32", 128, 32, 3, 1, 32, 16),
    ConvLayer("wdsr_b 1x1 32-128 @32", 32, 128, 1, 1, 32, 16),
    ConvLayer("wdsr_b 3x3 25-32 @32", 25, 32, 3, 1, 32, 16),
)

QUICK_CONV_LAYERS = tuple(
    layer
    for layer in CONV_LAYERS
    if layer.name.split(" ")[0] in ("mbv1.pw2", "mbv1.pw7", "mbv1.pw13", "wdsr_a")
    and "128-32" not in layer.name
    or layer.name in ("resnet20 3x3 32-32 @16", "resnet50 1x1 256-64 @8")
)

BN_LAYERS = (
    BNLayer("bn 64 @32", 64, 32, 64),
    BNLayer("bn 128 @16", 128, 16, 64),
    BNLayer("bn 256 @8", 256, 8, 64),
    BNLayer("bn 512 @4", 512, 4, 64),
    BNLayer("bn 1024 @2", 1024, 2, 64),
)

QUICK_BN_LAYERS = (BN_LAYERS[1], BN_LAYERS[3])

TRAIN_MODELS = ("mobilenet_v1", "resnet20")
TRAIN_BATCH = 64

# Switches a random layer draws its switch set from: equal and unequal widths, some too narrow for few channels.
RANDOM_SWITCHES = (
    "1x1.0",
    "2x0.5",
    "4x0.25",
    "0.5+0.25+0.25",
    "0.75+0.25",
    "3x1/3",
    "1x0.5",
    "8x0.125",
    "0.75+0.125+0.0625+0.0625",
)
# Caps on a random layer (all switches together), so that no layer of a random run takes minutes: the activations
# of the suite's largest layers (16M elements, 64 MB in float32) and 4 GFLOP of dense forward convolution, about the
# suite's largest (wdsr_a 3x3 32-128 @32 b16: 3.6). A draw beyond them is redrawn.
MAX_ELEMENTS = 2**24
MAX_FLOPS = 4 * 10**9


def _channels(rng: random.Random) -> int:
    """Log-uniform in 8..1024, odd counts included."""
    return round(math.exp(rng.uniform(math.log(8), math.log(1024))))


def _switches(rng: random.Random, *channel_counts: int) -> tuple[str, ...] | None:
    """2-5 distinct switches of RANDOM_SWITCHES, or None where one leaves a sub-network an empty slice."""
    switches = tuple(rng.sample(RANDOM_SWITCHES, rng.randint(2, 5)))
    try:
        for switch in SwitchSet(switches):
            for channels in channel_counts:
                switch.slices(channels)
    except UserError:
        return None
    return switches


def random_conv_layers(n: int, seed: int) -> tuple[ConvLayer, ...]:
    """n convolution layers drawn from the seed alone (so that a run can be repeated), each with its own switch set:
    the speed on layers a user brings, not only on the suite's."""
    rng, layers = random.Random(seed), []
    while len(layers) < n:
        c_in, c_out = _channels(rng), _channels(rng)
        kernel, stride = rng.choice((1, 3, 5)), rng.randint(1, 2)
        size, batch = rng.randint(1, 64), rng.randint(1, 128)
        switches = _switches(rng, c_in, c_out)
        if switches is None:
            continue
        layer = ConvLayer("", c_in, c_out, kernel, stride, size, batch, switches)
        rows = len(switches) * batch
        elements = rows * max(c_in * size**2, c_out * layer.out_size**2)
        flops = 2 * rows * c_in * c_out * kernel**2 * layer.out_size**2
        if elements <= MAX_ELEMENTS and flops <= MAX_FLOPS:
            name = f"r{len(layers)} {kernel}x{kernel} s{stride} {c_in}-{c_out} @{size} b{batch} {','.join(switches)}"
            layers.append(dataclasses.replace(layer, name=name))
    return tuple(layers)


def random_bn_layers(n: int, seed: int) -> tuple[BNLayer, ...]:
    """n BatchNorm layers drawn from the seed alone, each with its own switch set (as random_conv_layers)."""
    rng, layers = random.Random(seed), []
    while len(layers) < n:
        channels, size, batch = _channels(rng), rng.randint(1, 64), rng.randint(1, 128)
        switches = _switches(rng, channels)
        if switches and len(switches) * batch * channels * size**2 <= MAX_ELEMENTS:
            name = f"r{len(layers)} bn {channels} @{size} b{batch} {','.join(switches)}"
            layers.append(BNLayer(name, channels, size, batch, switches))
    return tuple(layers)
