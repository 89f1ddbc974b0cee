#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace paradis {

// Direct 3x3 convolutions of narrow groups (1, 4 or 8 input and output channels each) on
// channels_last float32 images, for the convolutions that oneDNN runs worst: the units of
// sliced_conv2d in the 2x0.5 and 4x0.25 switches of 16- and 32-channel layers, and the weight
// gradient of depthwise convolutions (depthwise_conv2d.h; bench/README.md). They read and write
// channel slices of the stacked tensors in place (views: channels innermost, any pixel stride),
// so no slice is copied. AVX-512 only.

struct ConvWindow {
  int64_t sh, sw, ph, pw;
};

// Whether the kernels run a unit of `groups` groups, in_width / out_width channels wide, with
// this window (the caller checks dtype, layout, kernel size 3x3 and dilation 1). grad_input also
// needs stride 1 and padding <= 2. False on CPUs without AVX-512F and when PARADIS_CPU_ISA=baseline.
bool narrow_groups_fit(int64_t groups, int64_t in_width, int64_t out_width);
bool narrow_groups_fit_grad_input(int64_t groups, int64_t in_width, int64_t out_width, const ConvWindow& win);

// y = conv2d(x, weight, bias, groups): x [B, C, H, W], weight [C, C / groups, 3, 3], bias [C] or
// undefined, y [B, C, Ho, Wo] (written).
void narrow_group_conv_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& y, int64_t groups, const ConvWindow& win);

// grad_x (written) of the forward above.
void narrow_group_conv_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_x,
                                  int64_t groups, const ConvWindow& win);

// The weight gradient [C, C / groups, 3, 3], summed in a fixed order (the same on every run).
at::Tensor narrow_group_conv_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, int64_t groups,
                                         const ConvWindow& win);

}  // namespace paradis
