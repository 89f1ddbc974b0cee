// The autograd of the paradis ops, one registration per op (the Autograd dispatch key): the
// forward redispatches the same op below autograd to the device's kernel, the backward calls the
// op's backward op. Eager, torch.compile and torch.export calls all run through it.
#include <ATen/ops/hardtanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "layout.h"
#include "op_signatures.h"

namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The backward kernels have no derivative of their own: create_graph=True (a double backward) gets
// a clear error, not the autograd fallback's warning and silently wrong zeros.
void refuse_double_backward(const char* name) {
  TORCH_CHECK(!at::GradMode::is_enabled(), name,
              ": no double backward (create_graph=True): its backward kernels are not differentiable");
}

// What the convolutions keep for their backward: x, the weight, the window and whether a bias came.
void save_convolution(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                      IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  ctx->save_for_backward({x, weight});
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
}

std::vector<int64_t> ints(AutogradContext* ctx, const char* key) { return ctx->saved_data[key].toIntVector(); }

// The gradients a convolution's backward is asked for: x's, the weight's, the bias's.
c10::List<bool> convolution_grad_mask(AutogradContext* ctx) {
  return c10::List<bool>({ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                          ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)});
}

// One entry per forward argument: the asked-for gradients of x, the weight and the bias, then none
// for the `others` arguments that are not tensors.
variable_list convolution_grads(const c10::List<bool>& mask, const Grads& grads, size_t others) {
  variable_list out{mask[0] ? std::get<0>(grads) : Tensor(), mask[1] ? std::get<1>(grads) : Tensor(),
                    mask[2] ? std::get<2>(grads) : Tensor()};
  out.resize(3 + others);
  return out;
}

class SlicedConv2d : public torch::autograd::Function<SlicedConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                        IntArrayRef blocks, int64_t num_switches, IntArrayRef stride, IntArrayRef padding,
                        IntArrayRef dilation, bool input_shared) {
    save_convolution(ctx, x, weight, bias, stride, padding, dilation);
    ctx->saved_data["blocks"] = blocks.vec();
    ctx->saved_data["num_switches"] = num_switches;
    ctx->saved_data["input_shared"] = input_shared;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = typed_op<SlicedConv2dFn>("paradis::sliced_conv2d");
    return op.call(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    refuse_double_backward("paradis::sliced_conv2d");
    const variable_list saved = ctx->get_saved_variables();
    const c10::List<bool> mask = convolution_grad_mask(ctx);
    static const auto op = typed_op<SlicedConv2dBackwardFn>("paradis::sliced_conv2d_backward");
    const Grads grads = op.call(grad_outputs[0], saved[0], saved[1], ints(ctx, "blocks"),
                                ctx->saved_data["num_switches"].toInt(), ints(ctx, "stride"), ints(ctx, "padding"),
                                ints(ctx, "dilation"), ctx->saved_data["input_shared"].toBool(), mask);
    return convolution_grads(mask, grads, 6);
  }
};

Tensor sliced_conv2d_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                              IntArrayRef blocks, int64_t num_switches, IntArrayRef stride, IntArrayRef padding,
                              IntArrayRef dilation, bool input_shared) {
  return SlicedConv2d::apply(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared);
}

// The gradient of y = activation(z) at z, from y: z > 0 exactly where relu's y > 0, and 0 < z < 6
// where 0 < relu6's y < 6.
Tensor gradient_at_sum(const Tensor& grad_y, const Tensor& y, const std::string& activation) {
  if (activation == "relu") return at::threshold_backward(grad_y, y, 0);
  if (activation == "relu6") return at::hardtanh_backward(grad_y, y, 0, 6);
  return grad_y;
}

// Returns (y, mean, var), the statistics not differentiable. With a residual the activation
// follows the sum, so the backward takes its mask from y and the residual's gradient is the one
// at the sum.
class SwitchBatchNorm : public torch::autograd::Function<SwitchBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& running_mean, const Tensor& running_var, IntArrayRef covered,
                               IntArrayRef rows, bool training, double eps, c10::string_view activation,
                               const std::optional<Tensor>& residual) {
    Tensor y, mean, var;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = typed_op<SwitchBatchNormFn>("paradis::switch_batch_norm");
      std::tie(y, mean, var) =
          op.call(x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, residual);
    }
    const bool with_residual = residual.has_value() && residual->defined();
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward(with_residual ? variable_list{x, weight, bias, mean, var, y}
                                         : variable_list{x, weight, bias, mean, var});
    ctx->saved_data["covered"] = covered.vec();
    ctx->saved_data["rows"] = rows.vec();
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    refuse_double_backward("paradis::switch_batch_norm");
    const variable_list saved = ctx->get_saved_variables();
    std::string activation = ctx->saved_data["activation"].toStringRef();
    Tensor grad_y = grad_outputs[0], grad_residual;
    if (saved.size() == 6) {
      grad_y = grad_residual = gradient_at_sum(grad_y, saved[5], activation);
      activation = "none";
    }
    static const auto op = typed_op<SwitchBatchNormBackwardFn>("paradis::switch_batch_norm_backward");
    auto [grad_x, grad_w, grad_b] =
        op.call(grad_y, saved[0], saved[1], saved[2], saved[3], saved[4], ints(ctx, "covered"), ints(ctx, "rows"),
                ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(), activation);
    return {grad_x,   grad_w,   grad_b,   Tensor(), Tensor(),     Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), grad_residual};
  }
};

Stats switch_batch_norm_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                 const Tensor& running_var, IntArrayRef covered, IntArrayRef rows, bool training,
                                 double eps, c10::string_view activation, const std::optional<Tensor>& residual) {
  const variable_list out = SwitchBatchNorm::apply(x, weight, bias, running_mean, running_var, covered, rows, training,
                                                   eps, activation, residual);
  return {out[0], out[1], out[2]};
}

class DepthwiseConv2d : public torch::autograd::Function<DepthwiseConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                        IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
    save_convolution(ctx, x, weight, bias, stride, padding, dilation);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = typed_op<DepthwiseConv2dFn>("paradis::depthwise_conv2d");
    return op.call(x, weight, bias, stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    refuse_double_backward("paradis::depthwise_conv2d");
    const variable_list saved = ctx->get_saved_variables();
    const c10::List<bool> mask = convolution_grad_mask(ctx);
    // grad_y in x's layout, as the kernel reads it (paradis_fast/ops/layout.py's contract)
    const Tensor grad_y = grad_outputs[0].contiguous(kernel_format(saved[0]));
    static const auto op = typed_op<DepthwiseConv2dBackwardFn>("paradis::depthwise_conv2d_backward");
    const Grads grads =
        op.call(grad_y, saved[0], saved[1], ints(ctx, "stride"), ints(ctx, "padding"), ints(ctx, "dilation"), mask);
    return convolution_grads(mask, grads, 3);
  }
};

Tensor depthwise_conv2d_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  return DepthwiseConv2d::apply(x, weight, bias, stride, padding, dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(paradis, Autograd, m) {
  m.impl("sliced_conv2d", TORCH_FN(sliced_conv2d_autograd));
  m.impl("switch_batch_norm", TORCH_FN(switch_batch_norm_autograd));
  m.impl("depthwise_conv2d", TORCH_FN(depthwise_conv2d_autograd));
}

}  // namespace paradis
