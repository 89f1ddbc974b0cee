// The paradis op library: every op's schema, in one place. Each op is differentiable (its autograd
// in csrc/autograd.cpp) and has a backward op of its own (torchvision's pattern); kernels register
// per dispatch key: CPU in csrc/cpu/, CUDA in csrc/cuda/ and from Python (the Triton kernels,
// paradis_fast/ops/library.py, with the fake kernels). paradis_fast/ops/ wraps them for users.
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

TORCH_LIBRARY(paradis, m) {
  // the module registering the fake kernels (importing it imports every op): torch imports it
  // when it needs them
  m.set_python_module("paradis_fast.ops.library");
  // Every (switch, sub-network) block of a layer in one call; blocks: five ints per block
  // (switch, in_start, in_stop, out_start, out_stop), paradis_fast/ops/plan.py.
  m.def(
      "sliced_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] blocks, int num_switches, int[] stride, "
      "int[] padding, int[] dilation, bool input_shared) -> Tensor");
  m.def(
      "sliced_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[] blocks, int num_switches, "
      "int[] stride, int[] padding, int[] dilation, bool input_shared, bool[] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // Per-switch BatchNorm + activation; returns (y, mean, var), the statistics it normalised with.
  m.def(
      "switch_batch_norm(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "int[] covered, int[] rows, bool training, float eps, str activation, Tensor? residual=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "switch_batch_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor var, int[] covered, int[] rows, bool training, float eps, str activation) "
      "-> (Tensor, Tensor, Tensor)");
  // F.conv2d(..., groups=C); its own op for the CPU weight gradient of small images.
  m.def(
      "depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def(
      "depthwise_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[] stride, int[] padding, "
      "int[] dilation, bool[] output_mask) -> (Tensor, Tensor, Tensor)");
}

// The depthwise convolution on any device, with ATen's convolution; the CPU key has its own
// backward (csrc/cpu/depthwise_conv2d.cpp).
namespace paradis {
namespace {

at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, x.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const c10::List<bool>& output_mask) {
  const int64_t channels = x.size(1);
  return at::convolution_backward(grad_y, x, weight, at::IntArrayRef{channels}, stride, padding, dilation, false,
                                  {0, 0}, channels, {output_mask[0], output_mask[1], output_mask[2]});
}

}  // namespace

TORCH_LIBRARY_IMPL(paradis, CompositeExplicitAutograd, m) {
  m.impl("depthwise_conv2d", TORCH_FN(depthwise_conv2d));
  m.impl("depthwise_conv2d_backward", TORCH_FN(depthwise_conv2d_backward));
}

}  // namespace paradis
