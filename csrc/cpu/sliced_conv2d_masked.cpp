// The masked path of sliced_conv2d (sliced_conv2d_paths.h), which sliced_conv2d.cpp times against
// the native one on a layer shape's first call.
//
// One dense convolution per switch with the weight (and bias) outside the switch's blocks zeroed:
// it computes the zero blocks too (k times the FLOPs of a kx(1/k) switch) but makes S oneDNN calls
// instead of one per unit, and on small layers, where a call's fixed cost outweighs its arithmetic,
// that is the fastest way there is (plain.masked_conv of bench/, the best plain way on many of them).
// Its grouped form makes that one call: the switches become the groups of one grouped convolution
// over x with its switch-major rows moved into channels ([S*B, C] -> [B, S*C]); on the smallest
// layers (images of a few pixels, few channels) the S calls' fixed costs are most of the time.
#include "cpu/sliced_conv2d_paths.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <vector>

#include "layout.h"

namespace paradis {
namespace sliced_detail {

using at::Tensor;

namespace {

// The switches' masked weights (or biases) stacked: [S * C_out, ...], switch s's copy of t zero
// outside its blocks. One pass of row copies: the layers this serves have small weights.
Tensor stacked_masked(const Tensor& t, const std::vector<Block>& blocks, int64_t S) {
  const int64_t rows = t.size(0), row = t.numel() / rows, cols = t.dim() == 1 ? 1 : t.size(1);
  const int64_t tap = row / cols, bytes = t.element_size();
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes[0] *= S;
  Tensor out = at::zeros(sizes, t.options());
  const char* src = static_cast<const char*>(t.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (const Block& b : blocks) {
    const int64_t i0 = t.dim() == 1 ? 0 : b.i0, width = t.dim() == 1 ? 1 : b.i1 - b.i0;
    for (int64_t o = b.o0; o < b.o1; ++o)
      std::memcpy(dst + ((b.s * rows + o) * row + i0 * tap) * bytes, src + (o * row + i0 * tap) * bytes,
                  width * tap * bytes);
  }
  return out;
}

// Switch s's rows [C_out, ...] of a stacked_masked tensor.
Tensor switch_rows(const Tensor& stacked, int64_t s, int64_t rows) { return stacked.narrow(0, s * rows, rows); }

// Adds the pieces of switch s's blocks of its gradient source ([C_out, ...], zero elsewhere) into
// grad, the blocks in table order (the switches' calls in order make a fixed order of additions).
void add_switch_blocks(const Tensor& grad, const Tensor& source, const std::vector<Block>& blocks, int64_t s) {
  const Tensor src_t = source.to(grad.scalar_type()).contiguous();
  const int64_t rows = grad.size(0), row = grad.numel() / rows, cols = grad.dim() == 1 ? 1 : grad.size(1);
  const int64_t tap = row / cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "add_switch_blocks", [&] {
    const scalar_t* src = src_t.const_data_ptr<scalar_t>();
    scalar_t* dst = grad.data_ptr<scalar_t>();
    for (const Block& b : blocks) {
      if (b.s != s) continue;
      const int64_t i0 = grad.dim() == 1 ? 0 : b.i0, width = (grad.dim() == 1 ? 1 : b.i1 - b.i0) * tap;
      for (int64_t o = b.o0; o < b.o1; ++o) {
        const scalar_t* from = src + o * row + i0 * tap;
        scalar_t* to = dst + o * row + i0 * tap;
        for (int64_t e = 0; e < width; ++e) to[e] += from[e];
      }
    }
  });
}

// x's switch-major rows [S*B, C, H, W] as channels [B, S*C, H, W], in x's kernel format.
Tensor switches_as_channels(const Tensor& x, int64_t S) {
  const int64_t B = x.size(0) / S, C = x.size(1), H = x.size(2), W = x.size(3);
  Tensor out = at::empty({B, S * C, H, W}, x.options().memory_format(kernel_format(x)));
  out.view({B, S, C, H, W}).copy_(x.view({S, B, C, H, W}).transpose(0, 1));
  return out;
}

// The inverse of switches_as_channels, written into rows ([S*B, C, H, W]).
void channels_to_switches(const Tensor& grouped, const Tensor& rows, int64_t S) {
  const int64_t B = grouped.size(0), C = grouped.size(1) / S, H = grouped.size(2), W = grouped.size(3);
  rows.view({S, B, C, H, W}).copy_(grouped.view({B, S, C, H, W}).transpose(0, 1));
}

}  // namespace

void forward_masked(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                    const std::vector<Block>& blocks) {
  const Tensor weights = stacked_masked(weight, blocks, g.S);
  const Tensor biases = bias.defined() ? stacked_masked(bias, blocks, g.S) : Tensor();
  for (int64_t s = 0; s < g.S; ++s) {
    const Tensor b = bias.defined() ? switch_rows(biases, s, g.C_out) : Tensor();
    y.narrow(0, s * g.B, g.B)
        .copy_(at::convolution(x.narrow(0, s * g.B, g.B), switch_rows(weights, s, g.C_out), b, {g.sh, g.sw},
                               {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, 1));
  }
}

void backward_masked(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                     const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                     const std::vector<Block>& blocks) {
  const std::vector<int64_t> bias_sizes{g.C_out};
  const bool blas_w = grad_weight.defined() && onednn_pointwise_hazard(g, x);
  const Tensor weights = stacked_masked(weight, blocks, g.S);
  for (int64_t s = 0; s < g.S; ++s) {
    const Tensor gys = grad_y.narrow(0, s * g.B, g.B), xs = x.narrow(0, s * g.B, g.B);
    auto [gx, gw, gb] = at::convolution_backward(
        gys, xs, switch_rows(weights, s, g.C_out),
        grad_bias.defined() ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, {g.sh, g.sw}, {g.ph, g.pw},
        {g.dh, g.dw}, false, {0, 0}, 1, {grad_x.defined(), grad_weight.defined() && !blas_w, grad_bias.defined()});
    if (blas_w) gw = pointwise_grad_weight(gys, xs);
    if (grad_x.defined()) grad_x.narrow(0, s * g.B, g.B).copy_(gx);
    if (grad_weight.defined()) add_switch_blocks(grad_weight, gw, blocks, s);
    if (grad_bias.defined()) add_switch_blocks(grad_bias, gb, blocks, s);
  }
}

void forward_grouped(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                     const std::vector<Block>& blocks) {
  const Tensor y_grouped = at::convolution(switches_as_channels(x, g.S), stacked_masked(weight, blocks, g.S),
                                           bias.defined() ? stacked_masked(bias, blocks, g.S) : Tensor(), {g.sh, g.sw},
                                           {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, g.S);
  channels_to_switches(y_grouped, y, g.S);
}

void backward_grouped(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                      const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                      const std::vector<Block>& blocks) {
  const std::vector<int64_t> bias_sizes{g.S * g.C_out};
  auto [gx, gw, gb] = at::convolution_backward(
      switches_as_channels(grad_y, g.S), switches_as_channels(x, g.S), stacked_masked(weight, blocks, g.S),
      grad_bias.defined() ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, {g.sh, g.sw}, {g.ph, g.pw},
      {g.dh, g.dw}, false, {0, 0}, g.S, {grad_x.defined(), grad_weight.defined(), grad_bias.defined()});
  if (grad_x.defined()) channels_to_switches(gx, grad_x, g.S);
  for (int64_t s = 0; s < g.S; ++s) {
    if (grad_weight.defined()) add_switch_blocks(grad_weight, switch_rows(gw, s, g.C_out), blocks, s);
    if (grad_bias.defined()) add_switch_blocks(grad_bias, switch_rows(gb, s, g.C_out), blocks, s);
  }
}

}  // namespace sliced_detail
}  // namespace paradis
