// Checks the CPU depthwise convolution backward (its own weight-gradient kernels on images smaller
// than the kernel and, with AVX-512, on float32 layers of 16k channels; ATen's elsewhere) against
// autograd of at::conv2d in double, and that a weight of the wrong shape is rejected.
#include "cpu/depthwise_conv2d.h"
#include "expect.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

using at::Tensor;

namespace {

struct Case {
  std::string name;
  int64_t batch, channels, height, width, stride, padding;
};

void run(const Case& c, at::ScalarType dtype, at::MemoryFormat format) {
  const std::string tag =
      c.name + (dtype == at::kFloat ? " f32" : " f64") + (format == at::MemoryFormat::ChannelsLast ? " nhwc" : " nchw");
  const double tol = dtype == at::kFloat ? 1e-3 : 1e-10;
  const auto opts = at::TensorOptions().dtype(dtype);
  const Tensor x = at::randn({c.batch, c.channels, c.height, c.width}, opts).contiguous(format);
  const Tensor w = at::randn({c.channels, 1, 3, 3}, opts);
  const std::vector<int64_t> stride{c.stride, c.stride}, padding{c.padding, c.padding}, dilation{1, 1};
  const Tensor xd = x.to(at::kDouble).requires_grad_(), wd = w.to(at::kDouble).requires_grad_();
  const Tensor yd = at::conv2d(xd, wd, {}, stride, padding, dilation, c.channels);
  const Tensor grad_y = at::randn(yd.sizes(), opts).contiguous(format);
  yd.backward(grad_y.to(at::kDouble));
  const auto [gx, gw, gb] = paradis::depthwise_conv2d_backward_cpu(grad_y, x, w, stride, padding, dilation,
                                                                   c10::List<bool>({true, true, false}));
  expect(gx.is_contiguous(format), tag + ": grad x not in the layout of x");
  expect(!gb.defined(), tag + ": grad bias computed though not requested");
  expect_close(gx, xd.grad(), tol, tag + ": grad x");
  expect_close(gw, wd.grad(), tol, tag + ": grad weight");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      {"32 channels", 3, 32, 7, 9, 1, 1},          {"16 channels, stride 2, padding 2", 2, 16, 9, 6, 2, 2},
      {"odd channels", 2, 19, 5, 5, 1, 1},         {"2x2 images, 70 channels", 5, 70, 2, 2, 1, 1},
      {"1x3 images, stride 2", 3, 40, 1, 3, 2, 1},
  };
  for (const Case& c : cases)
    for (const auto dtype : {at::kFloat, at::kDouble})
      for (const auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) run(c, dtype, format);
  try {
    paradis::depthwise_conv2d_backward_cpu(at::randn({1, 4, 5, 5}), at::randn({1, 4, 5, 5}), at::randn({4, 2, 3, 3}),
                                           {1, 1}, {1, 1}, {1, 1}, c10::List<bool>({true, true, true}));
    expect(false, "a [4, 2, 3, 3] weight was accepted");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find("weight must be [C, 1, kh, kw]") != std::string::npos,
           std::string("message: ") + e.what_without_backtrace());
  }
  return report();
}
