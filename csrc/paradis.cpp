// The paradis op library: every op's schema and its autocast rule, in one place. Each op is
// differentiable (its autograd in csrc/autograd.cpp) and has a backward op of its own
// (torchvision's pattern); kernels register per dispatch key: CPU in csrc/cpu/, CUDA in csrc/cuda/
// and from Python (the Triton kernels, paradis_fast/ops/library.py, with the fake kernels).
// paradis_fast/ops/ wraps them for users.
#include <ATen/autocast_mode.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <torch/library.h>

#include "op_signatures.h"

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
  // The running-statistics update of a training call, in place: row rows[s] moves towards switch
  // s's batch statistics (the variance unbiased over `count` values) by its momentum, over its
  // covered[s] channels; momentum_per_switch (one per switch) replaces momentum when given.
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "int[] covered, int[] rows, int count, float momentum, Tensor? momentum_per_switch=None) -> ()");
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

// The autocast rules, as torch.autocast treats F.conv2d and F.batch_norm: the convolutions run in
// the autocast dtype (x, weight and bias cast down; autograd returns the weight's gradient in the
// parameter's dtype through the cast), the BatchNorm takes x as it comes with its float32
// parameters and statistics (its kernels compute in float32 and return x's dtype); only a residual
// of another dtype is promoted with x to the wider of the two, like torch.add.
namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;

template <c10::DeviceType device>
struct AutocastRules {
  static at::ScalarType low() { return at::autocast::get_lower_precision_fp_from_device_type(device); }

  template <typename T>
  static T down(const T& t) {
    return at::autocast::cached_cast(low(), t, device);
  }

  static Tensor sliced_conv2d(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                              IntArrayRef blocks, int64_t num_switches, IntArrayRef stride, IntArrayRef padding,
                              IntArrayRef dilation, bool input_shared) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device));
    static const auto op = typed_op<SlicedConv2dFn>("paradis::sliced_conv2d");
    return op.call(down(x), down(weight), down(bias), blocks, num_switches, stride, padding, dilation, input_shared);
  }

  static Tensor depthwise_conv2d(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device));
    static const auto op = typed_op<DepthwiseConv2dFn>("paradis::depthwise_conv2d");
    return op.call(down(x), down(weight), down(bias), stride, padding, dilation);
  }

  static Stats switch_batch_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                 const Tensor& running_var, IntArrayRef covered, IntArrayRef rows, bool training,
                                 double eps, c10::string_view activation, const std::optional<Tensor>& residual) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device));
    static const auto op = typed_op<SwitchBatchNormFn>("paradis::switch_batch_norm");
    Tensor input = x;
    std::optional<Tensor> added = residual;
    const bool mixed = residual.has_value() && residual->defined() && residual->scalar_type() != x.scalar_type();
    if (mixed && at::autocast::is_eligible(x, device) && at::autocast::is_eligible(*residual, device)) {
      const at::ScalarType wider = c10::promoteTypes(x.scalar_type(), residual->scalar_type());
      input = at::autocast::cached_cast(wider, x, device);
      added = at::autocast::cached_cast(wider, *residual, device);
    }
    return op.call(input, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, added);
  }
};

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  m.impl("sliced_conv2d", TORCH_FN(AutocastRules<device>::sliced_conv2d));
  m.impl("depthwise_conv2d", TORCH_FN(AutocastRules<device>::depthwise_conv2d));
  m.impl("switch_batch_norm", TORCH_FN(AutocastRules<device>::switch_batch_norm));
}

}  // namespace

TORCH_LIBRARY_IMPL(paradis, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(paradis, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace paradis
