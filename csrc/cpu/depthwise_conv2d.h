#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace paradis {

// Gradients (grad_x, grad_weight, grad_bias) of a depthwise convolution y = conv2d(x, weight,
// bias, groups = C): x [B, C, H, W], weight [C, 1, kh, kw]; a gradient not requested by
// output_mask comes back undefined. Kernels of its own (any layout, stride, padding, dilation;
// float32 sums for bfloat16 / float16) compute the weight gradient where the kernel is larger
// than the image, the bfloat16 / float16 input gradient of strided layers (oneDNN's is 10-90x
// slower there), and all three gradients where oneDNN does not compute the dtype (oneDNN off or
// absent, float64, bfloat16 / float16 without isa.h's low_precision_native); float32 3x3 layers
// of 16k channels that are innermost take narrow_group_conv.h's AVX-512 weight gradient. These
// sum in a fixed order (the same on every run and thread count). Everything else runs on ATen's
// convolution_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const c10::List<bool>& output_mask);

// The forward y = conv2d(x, weight, bias, groups = C), in x's layout, on a kernel of its own (sums
// in a fixed order, float32 for bfloat16 / float16) where oneDNN does not compute the dtype (as
// above) and for bfloat16 / float16 outputs of at most 4 pixels (oneDNN's fixed costs dominate
// there); else ATen's convolution.
at::Tensor depthwise_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace paradis
