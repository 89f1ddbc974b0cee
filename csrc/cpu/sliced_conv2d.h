#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace paradis {

// Sliced convolution of every (switch, sub-network) block in one call (DESIGN §3).
// x = [S*B, C_in, H, W] stacked switch-major ([B, C_in, H, W] with input_shared), weight =
// [C_out, C_in, kh, kw]. blocks is the flat table of paradis_fast/ops/plan.py, five ints per
// block: (switch, in_start, in_stop, out_start, out_stop). For switch s and each of its blocks,
// y[s][:, out] = conv2d(x[s][:, in], weight[out, in]) + bias[out]; other channels are zero.
// Returns y = [S*B, C_out, H', W'] in the memory format of x (channels_last or NCHW).
at::Tensor sliced_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef blocks,
                                     int64_t num_switches, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool input_shared);

// Gradients (grad_x in the memory format of x, grad_weight, grad_bias [C_out]) of
// sliced_conv2d_forward_cpu; a gradient not requested by output_mask comes back undefined. Weight
// gradients of overlapping blocks of different switches add up in a fixed order: the result is
// the same on every run.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sliced_conv2d_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef blocks,
    int64_t num_switches, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool input_shared,
    const c10::List<bool>& output_mask);

// Each layer shape's path: the CPU op measures its candidate paths on a shape's first forward and
// first backward call and runs the fastest from then on (PARADIS_CPU_CONV_PATH=native, =masked,
// =grouped, =unfolded or =relayout forces one). One line per shape seen in this process, the most
// recently run first.
std::vector<std::string> sliced_conv2d_decisions();

}  // namespace paradis
