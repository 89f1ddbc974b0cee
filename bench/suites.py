"""Layer shapes of the benchmark, taken from the models at the sizes the issue fixes (32x32 inputs,
batch 64 for classification; WDSR body layers on 32x32 patches, batch 16)."""

from __future__ import annotations

from dataclasses import dataclass

SWITCHES = ("1x1.0", "2x0.5", "4x0.25")


@dataclass(frozen=True)
class ConvLayer:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    size: int  # input height = width
    batch: int  # per switch

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class BNLayer:
    name: str
    channels: int
    size: int
    batch: int


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
