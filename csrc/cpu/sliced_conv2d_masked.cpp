// The masked path of sliced_conv2d (sliced_conv2d_paths.h), which sliced_conv2d.cpp times against
// the native one on a layer shape's first call.
//
// One dense convolution per switch with the weight (and bias) outside the switch's blocks zeroed:
// it computes the zero blocks too (k times the FLOPs of a kx(1/k) switch) but makes S oneDNN calls
// instead of one per unit, and on small layers, where a call's fixed cost outweighs its arithmetic,
// that is the fastest way there is (plain.masked_conv of bench/, the best plain way on many of them).
#include "cpu/sliced_conv2d_paths.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/zeros_like.h>

#include <vector>

namespace paradis {
namespace sliced_detail {

using at::Tensor;

namespace {

// The piece of t (a weight [C_out, C_in, kh, kw] or a bias [C_out]) that block b owns.
Tensor block_of(const Tensor& t, const Block& b) {
  return t.dim() == 1 ? t.narrow(0, b.o0, b.o1 - b.o0) : t.narrow(0, b.o0, b.o1 - b.o0).narrow(1, b.i0, b.i1 - b.i0);
}

// t (a weight or bias) with everything outside switch s's blocks zero.
Tensor switch_masked(const Tensor& t, const std::vector<Block>& blocks, int64_t s) {
  Tensor out = at::zeros_like(t);
  for (const Block& b : blocks)
    if (b.s == s) block_of(out, b).copy_(block_of(t, b));
  return out;
}

}  // namespace

void forward_masked(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                    const std::vector<Block>& blocks) {
  for (int64_t s = 0; s < g.S; ++s) {
    const Tensor b = bias.defined() ? switch_masked(bias, blocks, s) : Tensor();
    y.narrow(0, s * g.B, g.B)
        .copy_(at::convolution(x.narrow(0, s * g.B, g.B), switch_masked(weight, blocks, s), b, {g.sh, g.sw},
                               {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, 1));
  }
}

void backward_masked(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                     const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                     const std::vector<Block>& blocks) {
  const std::vector<int64_t> bias_sizes{g.C_out};
  const bool blas_w = grad_weight.defined() && onednn_pointwise_hazard(g, x);
  for (int64_t s = 0; s < g.S; ++s) {
    const Tensor gys = grad_y.narrow(0, s * g.B, g.B), xs = x.narrow(0, s * g.B, g.B);
    auto [gx, gw, gb] = at::convolution_backward(
        gys, xs, switch_masked(weight, blocks, s),
        grad_bias.defined() ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, {g.sh, g.sw}, {g.ph, g.pw},
        {g.dh, g.dw}, false, {0, 0}, 1, {grad_x.defined(), grad_weight.defined() && !blas_w, grad_bias.defined()});
    if (blas_w) gw = pointwise_grad_weight(gys, xs);
    if (grad_x.defined()) grad_x.narrow(0, s * g.B, g.B).copy_(gx);
    for (const Block& b : blocks) {
      if (b.s != s) continue;
      if (grad_weight.defined()) block_of(grad_weight, b).add_(block_of(gw, b));
      if (grad_bias.defined()) block_of(grad_bias, b).add_(block_of(gb, b));
    }
  }
}

}  // namespace sliced_detail
}  // namespace paradis
