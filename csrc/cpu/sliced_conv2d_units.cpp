// The units of sliced_conv2d's native path (sliced_conv2d_paths.h; the overview is at the top of
// sliced_conv2d.cpp): one grouped convolution per run of equal-width blocks of a switch, on the
// switch's rows, by oneDNN through ATen with its output copied into the stacked tensor, or in place
// on narrow_group_conv.h's kernels; and the input_shared layers' backward (shared_backward).
#include "cpu/sliced_conv2d_paths.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>

#include "layout.h"
#include "cpu/narrow_group_conv.h"

#include <tuple>
#include <vector>

namespace paradis {
namespace sliced_detail {

using at::Tensor;

namespace {

// A run of one switch's blocks that a single grouped convolution computes: blocks [first,
// first + count), of equal widths, side by side in both inputs and outputs.
struct Unit {
  int64_t first, count;
};

std::vector<Unit> units(const std::vector<Block>& blocks) {
  std::vector<Unit> out;
  for (int64_t k = 0; k < static_cast<int64_t>(blocks.size()); ++k) {
    const Block& b = blocks[k];
    if (!out.empty()) {
      const Block& last = blocks[k - 1];
      const bool joins = b.s == last.s && b.x0 == last.x0 && b.i0 == last.i1 && b.o0 == last.o1 &&
                         b.i1 - b.i0 == last.i1 - last.i0 && b.o1 - b.o0 == last.o1 - last.o0;
      if (joins) {
        ++out.back().count;
        continue;
      }
    }
    out.push_back({k, 1});
  }
  return out;
}

// A unit's pieces: its input rows and channels, grouped weight [count * out width, in width, kh,
// kw] and output channel range.
struct UnitView {
  const Block& first;
  int64_t in_width, out_width, count;
  Tensor weight;
};

UnitView view(const Tensor& weight, const std::vector<Block>& blocks, const Unit& u) {
  const Block& f = blocks[u.first];
  const Block& l = blocks[u.first + u.count - 1];
  std::vector<Tensor> pieces;
  for (int64_t k = u.first; k < u.first + u.count; ++k) {
    const Block& b = blocks[k];
    pieces.push_back(weight.narrow(0, b.o0, b.o1 - b.o0).narrow(1, b.i0, b.i1 - b.i0));
  }
  return {f, l.i1 - f.i0, l.o1 - f.o0, u.count, u.count == 1 ? pieces[0] : at::cat(pieces)};
}

// pointwise_grad_weight of a unit of `groups` equal blocks side by side: [groups * out width,
// in width, 1, 1], as oneDNN's grouped weight gradient returns it.
Tensor unit_pointwise_grad_weight(const Tensor& grad_y, const Tensor& x, int64_t groups) {
  if (groups == 1) return pointwise_grad_weight(grad_y, x);
  const int64_t ow = grad_y.size(1) / groups, iw = x.size(1) / groups;
  std::vector<Tensor> pieces;
  for (int64_t k = 0; k < groups; ++k)
    pieces.push_back(pointwise_grad_weight(grad_y.narrow(1, k * ow, ow), x.narrow(1, k * iw, iw)));
  return at::cat(pieces);
}

// Whether a unit runs on the narrow-group kernels (narrow_group_conv.h) instead of oneDNN: 3x3
// float32 channels_last layers, groups of 1, 4 or 8 channels.
bool runs_narrow(const Geometry& g, const UnitView& v, const Tensor& x) {
  return x.scalar_type() == at::kFloat && kernel_format(x) == at::MemoryFormat::ChannelsLast && g.kh == 3 &&
         g.kw == 3 && g.dh == 1 && g.dw == 1 && !g.shared && narrow_groups_fit(v.count, v.in_width, v.out_width);
}

ConvWindow window(const Geometry& g) { return {g.sh, g.sw, g.ph, g.pw}; }

}  // namespace

void forward_units(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                   const std::vector<Block>& blocks) {
  for (const Unit& u : units(blocks)) {
    const UnitView v = view(weight, blocks, u);
    const Tensor xs = x.narrow(0, v.first.x0, g.B).narrow(1, v.first.i0, v.in_width);
    const Tensor b = bias.defined() ? bias.narrow(0, v.first.o0, v.out_width) : Tensor();
    const Tensor ys = y.narrow(0, v.first.y0, g.B).narrow(1, v.first.o0, v.out_width);
    if (runs_narrow(g, v, x))
      narrow_group_conv_forward(xs, v.weight, b, ys, v.count, window(g));
    else
      ys.copy_(at::convolution(xs, v.weight, b, {g.sh, g.sw}, {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, v.count));
  }
}

void backward_units(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                    const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                    const std::vector<Block>& blocks) {
  for (const Unit& u : units(blocks)) {
    const UnitView v = view(weight, blocks, u);
    const Tensor xs = x.narrow(0, v.first.x0, g.B).narrow(1, v.first.i0, v.in_width);
    const Tensor gys = grad_y.narrow(0, v.first.y0, g.B).narrow(1, v.first.o0, v.out_width);
    const bool narrow = runs_narrow(g, v, x);
    const bool narrow_x =
        grad_x.defined() && narrow && narrow_groups_fit_grad_input(v.count, v.in_width, v.out_width, window(g));
    const bool blas_w = grad_weight.defined() && onednn_pointwise_hazard(g, x);
    const bool dnnl_x = grad_x.defined() && !narrow_x, dnnl_w = grad_weight.defined() && !narrow && !blas_w;
    const std::vector<int64_t> bias_sizes{v.out_width};
    Tensor gx, gw, gb;
    if (dnnl_x || dnnl_w || grad_bias.defined())
      std::tie(gx, gw, gb) = at::convolution_backward(
          gys, xs, v.weight, grad_bias.defined() ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, {g.sh, g.sw},
          {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, v.count, {dnnl_x, dnnl_w, grad_bias.defined()});
    if (grad_weight.defined() && narrow) gw = narrow_group_conv_grad_weight(gys, xs, v.count, window(g));
    if (blas_w) gw = unit_pointwise_grad_weight(gys, xs, v.count);
    if (grad_x.defined()) {
      const Tensor target = grad_x.narrow(0, v.first.x0, g.B).narrow(1, v.first.i0, v.in_width);
      if (narrow_x)
        narrow_group_conv_grad_input(gys, v.weight, target, v.count, window(g));
      else
        target.copy_(gx);
    }
    if (grad_bias.defined()) grad_bias.narrow(0, v.first.o0, v.out_width).add_(gb);
    if (!grad_weight.defined()) continue;
    const int64_t ow = v.out_width / v.count;
    for (int64_t k = 0; k < v.count; ++k) {
      const Block& b = blocks[u.first + k];
      grad_weight.narrow(0, b.o0, b.o1 - b.o0).narrow(1, b.i0, b.i1 - b.i0).add_(gw.narrow(0, k * ow, ow));
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> shared_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                   const Geometry& g, const std::vector<Block>& blocks,
                                                   const c10::List<bool>& output_mask) {
  const Tensor summed = at::empty({g.B, g.C_out, g.Ho, g.Wo}, grad_y.options().memory_format(kernel_format(x))).zero_();
  for (const Block& b : blocks)
    summed.narrow(1, b.o0, b.o1 - b.o0).add_(grad_y.narrow(0, b.y0, g.B).narrow(1, b.o0, b.o1 - b.o0));
  const std::vector<int64_t> bias_sizes{g.C_out};
  auto [grad_x, grad_w, grad_b] = at::convolution_backward(
      summed, x, weight, output_mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, {g.sh, g.sw},
      {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, 1, {output_mask[0], output_mask[1], output_mask[2]});
  // the layouts the op promises (its fake kernel): grad_x as x, the weight gradient contiguous
  // (oneDNN returns it channels_last for channels_last images)
  const auto layout = [](const Tensor& t, at::MemoryFormat format) { return t.defined() ? t.contiguous(format) : t; };
  return {layout(grad_x, kernel_format(x)), layout(grad_w, at::MemoryFormat::Contiguous), grad_b};
}

}  // namespace sliced_detail
}  // namespace paradis
