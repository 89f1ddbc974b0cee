#include "cpu/depthwise_conv2d.h"

#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "layout.h"
#include "cpu/narrow_group_conv.h"

#include <array>
#include <tuple>

namespace paradis {

using at::IntArrayRef;
using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> depthwise_conv2d_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                                 const Tensor& weight, IntArrayRef stride,
                                                                 IntArrayRef padding, IntArrayRef dilation,
                                                                 const c10::List<bool>& output_mask) {
  TORCH_CHECK(x.dim() == 4 && grad_y.dim() == 4, "depthwise_conv2d: x and grad_y must be 4-D [B, C, H, W], got ",
              x.sizes(), " and ", grad_y.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
              "depthwise_conv2d: weight must be [C, 1, kh, kw] with C = ", C, " (x's channels), got ", weight.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "depthwise_conv2d: x, grad_y and weight must share a dtype, got ", x.scalar_type(), ", ",
              grad_y.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && output_mask.size() == 3,
              "depthwise_conv2d: stride, padding and dilation need 2 entries, output_mask 3");
  const bool ours = output_mask[1] && x.scalar_type() == at::kFloat && channels_innermost(x) &&
                    channels_innermost(grad_y) && weight.size(2) == 3 && weight.size(3) == 3 && dilation[0] == 1 &&
                    dilation[1] == 1 && narrow_groups_fit(C, C, C);
  const std::array<bool, 3> aten_mask{output_mask[0], output_mask[1] && !ours, output_mask[2]};
  Tensor grad_x, grad_w, grad_b;
  if (aten_mask[0] || aten_mask[1] || aten_mask[2])
    std::tie(grad_x, grad_w, grad_b) = at::convolution_backward(grad_y, x, weight, IntArrayRef{C}, stride, padding,
                                                                dilation, false, {0, 0}, C, aten_mask);
  if (ours)
    grad_w = narrow_group_conv_grad_weight(grad_y, x, C, {stride[0], stride[1], padding[0], padding[1]})
                 .to(weight.options());
  return {grad_x, grad_w, grad_b};
}

TORCH_LIBRARY_IMPL(paradis, CPU, m) { m.impl("depthwise_conv2d_backward", TORCH_FN(depthwise_conv2d_backward_cpu)); }

}  // namespace paradis
