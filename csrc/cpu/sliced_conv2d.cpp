#include "cpu/sliced_conv2d.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "layout.h"
#include "cpu/isa.h"
#include "cpu/measured_choice.h"
#include "cpu/narrow_group_conv.h"
#include "cpu/pointwise_gemm.h"

#include <algorithm>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// Every (switch, sub-network) block of a layer in one op call, on oneDNN's convolutions through
// ATen: one grouped convolution per run of equal-width blocks of a switch (a whole kx(1/k) switch
// is one call) on the switch's rows, copied into the stacked output; weight gradients of blocks
// that share weights added in a fixed order. NCHW or channels_last, as x comes. Against strided
// BLAS GEMMs (1x1) and im2col + GEMM (k x k) on channel slices, which this file held before, it
// was as fast or faster on every layer of bench/suites.py, in both layouts, most of all on small
// channel counts -- except channels_last 1x1 layers on small images (the deep layers of a
// network), where a block is a GEMM of few rows that BLAS runs faster than oneDNN, straight into
// the stacked tensors with no copy (bench/README.md): those run as one GEMM per block. Our own
// kernels, AVX-512 and float32, in place: channels_last 1x1 layers with many pixel rows on
// pointwise_gemm.h's (faster than oneDNN on narrow blocks, and no unit output copied), 3x3 units of
// 1-, 4- or 8-channel groups, which oneDNN runs at a fraction of its dense rate, on
// narrow_group_conv.h's. Those fixed rules make the "native" path; on a layer shape's first call it
// is timed against the "masked" path (one dense convolution per switch, fastest on small layers)
// and the faster runs from then on (measured_choice.h).
namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;

constexpr int64_t kFields = 5;  // ints per block in the table

struct Geometry {
  int64_t S, B, C_in, C_out, H, W, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw;
  bool shared;
};

// One (switch, sub-network) block; x0 / y0 are its first sample rows in x and y.
struct Block {
  int64_t s, i0, i1, o0, o1, x0, y0;
};

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

// Zeroes the channels of each switch's rows of t that none of its blocks covers: output channels
// of y, or the input channels that grad_x gets nothing for.
void zero_uncovered(const Tensor& t, const Geometry& g, const std::vector<Block>& blocks, bool inputs) {
  const int64_t channels = t.size(1);
  for (int64_t s = 0; s < g.S; ++s) {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (const Block& b : blocks) {
      if (b.s == s) ranges.push_back(inputs ? std::pair{b.i0, b.i1} : std::pair{b.o0, b.o1});
    }
    std::sort(ranges.begin(), ranges.end());
    const Tensor rows = t.narrow(0, s * g.B, g.B);
    int64_t done = 0;
    for (auto [a, b] : ranges) {
      if (a > done) rows.narrow(1, done, a - done).zero_();
      done = std::max(done, b);
    }
    if (done < channels) rows.narrow(1, done, channels - done).zero_();
  }
}

// The disjoint output ranges that the blocks of input_shared cover, each computed once.
std::vector<Block> shared_output_blocks(const Geometry& g, const std::vector<Block>& blocks) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (const Block& b : blocks) ranges.push_back({b.o0, b.o1});
  std::sort(ranges.begin(), ranges.end());
  std::vector<Block> merged;
  for (auto [a, b] : ranges) {
    if (!merged.empty() && a <= merged.back().o1)
      merged.back().o1 = std::max(merged.back().o1, b);
    else
      merged.push_back({0, 0, g.C_in, a, b, 0, 0});
  }
  return merged;
}

struct Problem {
  Geometry g;
  std::vector<Block> blocks;
};

// Validates everything but the data (before anything is allocated) and unpacks the block table.
Problem validate(const Tensor& x, const Tensor& weight, IntArrayRef table, int64_t num_switches, IntArrayRef stride,
                 IntArrayRef padding, IntArrayRef dilation, bool shared) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "sliced_conv2d: cpu kernel got tensors on ", x.device(),
              " and ", weight.device());
  TORCH_CHECK(x.dim() == 4, "sliced_conv2d: x must be 4-D [S*B, C_in, H, W], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "sliced_conv2d: weight must be 4-D [C_out, C_in, kh, kw], got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "sliced_conv2d: x is ", x.scalar_type(), " but weight is ",
              weight.scalar_type());
  TORCH_CHECK(x.size(1) == weight.size(1), "sliced_conv2d: x has ", x.size(1), " channels but weight expects ",
              weight.size(1));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "sliced_conv2d: stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(
      stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
      "sliced_conv2d: stride ", stride, " and dilation ", dilation, " must be >= 1, padding ", padding, " >= 0");
  TORCH_CHECK(num_switches >= 1, "sliced_conv2d: num_switches must be >= 1, got ", num_switches);
  TORCH_CHECK(shared || x.size(0) % num_switches == 0, "sliced_conv2d: x has ", x.size(0),
              " rows, not a multiple of the ", num_switches, " switches");
  Geometry g{num_switches,
             shared ? x.size(0) : x.size(0) / num_switches,
             x.size(1),
             weight.size(0),
             x.size(2),
             x.size(3),
             weight.size(2),
             weight.size(3),
             0,
             0,
             stride[0],
             stride[1],
             padding[0],
             padding[1],
             dilation[0],
             dilation[1],
             shared};
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "sliced_conv2d: input of spatial size ", x.sizes().slice(2), " is smaller than the kernel");

  TORCH_CHECK(!table.empty() && table.size() % kFields == 0, "sliced_conv2d: blocks must hold ", kFields,
              " ints per block (switch, in_start, in_stop, out_start, out_stop), got ", table.size());
  std::vector<Block> blocks;
  for (size_t k = 0; k < table.size(); k += kFields) {
    const int64_t s = table[k], i0 = table[k + 1], i1 = table[k + 2], o0 = table[k + 3], o1 = table[k + 4];
    TORCH_CHECK(s >= 0 && s < num_switches && 0 <= i0 && i0 < i1 && i1 <= g.C_in && 0 <= o0 && o0 < o1 && o1 <= g.C_out,
                "sliced_conv2d: block ", k / kFields, " (", s, ", ", i0, ", ", i1, ", ", o0, ", ", o1, ") is outside ",
                num_switches, " switches, ", g.C_in, " inputs, ", g.C_out, " outputs");
    TORCH_CHECK(!shared || (i0 == 0 && i1 == g.C_in),
                "sliced_conv2d: with input_shared every block reads "
                "all ",
                g.C_in, " input channels, block ", k / kFields, " reads [", i0, ", ", i1, ")");
    for (const Block& other : blocks) {
      const bool outputs_meet = other.o0 < o1 && o0 < other.o1;
      const bool inputs_meet = !shared && other.i0 < i1 && i0 < other.i1;
      TORCH_CHECK(other.s != s || !(outputs_meet || inputs_meet), "sliced_conv2d: blocks of switch ", s,
                  " overlap: sub-networks must own disjoint channels");
    }
    blocks.push_back({s, i0, i1, o0, o1, shared ? 0 : s * g.B, s * g.B});
  }
  return {g, blocks};
}

// A channels_last [N, C, H, W] tensor as the [N*H*W, C] matrix it is in memory (a view).
Tensor pixel_rows(const Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// On CPUs without AVX-512 oneDNN runs channels_last 1x1 weight gradients on an AVX2 kernel that
// hangs or crashes on some shapes (bench/README.md): there the units and the masked path take the
// weight gradient of such layers from BLAS (pointwise_grad_weight) and only the rest from oneDNN.
bool onednn_pointwise_hazard(const Geometry& g, const Tensor& x) {
  return channels_innermost(x) && g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
         !avx512_enabled();
}

// The weight gradient [C_out, C_in, 1, 1] of a stride-1 1x1 convolution of channels-innermost x
// (channel slices of the stacked tensors too): one GEMM over the pixel rows.
Tensor pointwise_grad_weight(const Tensor& grad_y, const Tensor& x) {
  return at::mm(pixel_rows(grad_y).t(), pixel_rows(x)).view({grad_y.size(1), x.size(1), 1, 1});
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

// y (or the input_shared scratch) = every unit's convolution, in place.
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

// Gradients of every unit (not input_shared: see shared_backward). grad_x: each unit writes its own
// rows and input channels. Weight gradients (which start at zero): the blocks of different
// switches that share weights add up in a fixed order.
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

// input_shared (a network's stem): every block convolves the same image with all its channels, so
// the gradients of all blocks are those of one convolution whose output gradient sums the blocks'
// (each block's output channels from its switch's rows): one oneDNN call instead of one per unit
// (ResNet20's stem, 7 blocks: bench/README.md). Channels no block covers get zero gradients.
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

// Channels_last 1x1 layers (stride 1, no padding) run as GEMMs on the channel slices of the
// [pixels, channels] matrices, every block in place, no slice copied: float32 on pointwise_gemm.h's
// kernels (AVX-512), which beat oneDNN's (grouped) convolutions on narrow blocks and save the
// copies of unit outputs, except on small images with few pixel rows per switch (the deepest layers
// of a network: [64, 1024, 2, 2] is 256 rows), where BLAS runs the wide blocks faster; there, and
// for float64 or without AVX-512, one BLAS GEMM per block, which beats oneDNN on images of at most
// 16 pixels, most of all on the weight gradient; larger images go to oneDNN (bench/README.md).
// Images of one pixel are channels_last whatever their layout says (the same memory): [N, C, 1, 1]
// runs as GEMMs too.
// Both thresholds tuned on the Sapphire Rapids host of bench/README.md (2 cores, AVX-512, MKL BLAS,
// oneDNN 3.x) by timing each path on the layers of bench/suites.py.
constexpr int64_t kBlasMaxPixels = 16;
constexpr int64_t kBlasMaxRows = 1024;

bool pointwise_layer(const Geometry& g, const Tensor& x) {
  return channels_innermost(x) && g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
         !g.shared;
}

bool runs_on_pointwise_gemm(const Geometry& g, const Tensor& x) {
  const bool large = g.Ho * g.Wo > kBlasMaxPixels || g.B * g.Ho * g.Wo >= kBlasMaxRows;
  return pointwise_layer(g, x) && large && x.scalar_type() == at::kFloat && pointwise_gemm_enabled();
}

bool runs_on_blas(const Geometry& g, const Tensor& x) {
  return pointwise_layer(g, x) && g.Ho * g.Wo <= kBlasMaxPixels && !runs_on_pointwise_gemm(g, x);
}

bool runs_as_gemms(const Geometry& g, const Tensor& x) { return runs_on_blas(g, x) || runs_on_pointwise_gemm(g, x); }

// A channels-innermost 1x1 layer of stride > 1 (no padding) reads only the pixels on its stride's
// grid: gathered into a compact image, it is a stride-1 layer (the geometry returned) that runs as
// GEMMs, on pointwise_gemm.h's kernels where runs_on_pointwise_gemm says, else one BLAS GEMM per
// block at any image size; its input gradient is that layer's, put back on the grid, zero
// elsewhere. oneDNN ran these layers at 15-25% of the dense-GEMM rate (ResNet's shortcuts), and its
// AVX2 weight gradient of them hangs or crashes on some shapes (bench/README.md).
std::optional<Geometry> gathered_pointwise(const Geometry& g, const Tensor& x) {
  if (g.kh != 1 || g.kw != 1 || g.ph != 0 || g.pw != 0 || (g.sh == 1 && g.sw == 1) || g.shared) return std::nullopt;
  Geometry compact = g;
  compact.H = g.Ho;
  compact.W = g.Wo;
  compact.sh = compact.sw = compact.dh = compact.dw = 1;
  if (!pointwise_layer(compact, x)) return std::nullopt;
  return compact;
}

// The pixels of t on the stride grid of a 1x1 layer (a view).
Tensor on_grid(const Tensor& t, const Geometry& g) { return t.slice(2, 0, g.H, g.sh).slice(3, 0, g.W, g.sw); }

// The block's piece of a pixel_rows matrix: the B images from row `first` on, channels [c0, c1).
Tensor block_rows(const Tensor& rows, const Geometry& g, int64_t first, int64_t c0, int64_t c1) {
  const int64_t pixels = g.Ho * g.Wo;
  return rows.narrow(0, first * pixels, g.B * pixels).narrow(1, c0, c1 - c0);
}

Tensor block_weight(const Tensor& w2, const Block& b) {
  return w2.narrow(0, b.o0, b.o1 - b.o0).narrow(1, b.i0, b.i1 - b.i0);
}

// The blocks as pointwise_gemm products from x's rows and input channels to y's rows and output
// channels (forward and weight gradient), or from grad_y's to grad_x's (input gradient).
std::vector<GemmBlock> gemm_blocks(const Geometry& g, const std::vector<Block>& blocks, bool to_input) {
  const int64_t pixels = g.Ho * g.Wo;
  std::vector<GemmBlock> out;
  for (const Block& b : blocks)
    out.push_back(to_input ? GemmBlock{b.y0 * pixels, b.x0 * pixels, g.B * pixels, b.o0, b.o1, b.i0, b.i1}
                           : GemmBlock{b.x0 * pixels, b.y0 * pixels, g.B * pixels, b.i0, b.i1, b.o0, b.o1});
  return out;
}

// The BLAS GEMMs write into views of the op's outputs: out= calls, which autograd refuses when an
// input requires grad (a direct call from C++); a kernel is below autograd anyway.
void forward_gemms(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                   const std::vector<Block>& blocks) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor x2 = pixel_rows(x), y2 = pixel_rows(y), w2 = weight.view({g.C_out, g.C_in});
  if (runs_on_pointwise_gemm(g, x)) {
    pointwise_gemm(x2, w2.t(), bias, y2, gemm_blocks(g, blocks, false));
    return;
  }
  for (const Block& b : blocks) {
    Tensor out = block_rows(y2, g, b.y0, b.o0, b.o1);
    const Tensor in = block_rows(x2, g, b.x0, b.i0, b.i1), w = block_weight(w2, b).t();
    if (bias.defined())
      at::addmm_out(out, bias.narrow(0, b.o0, b.o1 - b.o0), in, w);
    else
      at::mm_out(out, in, w);
  }
}

// As backward_units; the weight gradient of each block is accumulated by the GEMM itself.
void backward_gemms(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                    const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                    const std::vector<Block>& blocks) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor x2 = pixel_rows(x), gy2 = pixel_rows(grad_y), w2 = weight.view({g.C_out, g.C_in});
  const Tensor gx2 = grad_x.defined() ? pixel_rows(grad_x) : Tensor();
  const Tensor gw2 = grad_weight.defined() ? grad_weight.view({g.C_out, g.C_in}) : Tensor();
  if (runs_on_pointwise_gemm(g, x)) {
    if (gx2.defined()) pointwise_gemm(gy2, w2, Tensor(), gx2, gemm_blocks(g, blocks, true));
    if (gw2.defined()) pointwise_gemm_grad_weight(x2, gy2, gw2, gemm_blocks(g, blocks, false));
  } else {
    for (const Block& b : blocks) {
      const Tensor gy = block_rows(gy2, g, b.y0, b.o0, b.o1);
      if (gx2.defined()) {
        Tensor out = block_rows(gx2, g, b.x0, b.i0, b.i1);
        at::mm_out(out, gy, block_weight(w2, b));
      }
      if (!gw2.defined()) continue;
      const Tensor xb = block_rows(x2, g, b.x0, b.i0, b.i1);
      if (gw2.scalar_type() == gy.scalar_type())
        block_weight(gw2, b).addmm_(gy.t(), xb);
      else  // a float32 sum of low-precision products
        block_weight(gw2, b).add_(at::mm(gy.t(), xb));
    }
  }
  if (grad_bias.defined()) {
    for (const Block& b : blocks)
      grad_bias.narrow(0, b.o0, b.o1 - b.o0)
          .add_(block_rows(gy2, g, b.y0, b.o0, b.o1).sum(0, false, grad_bias.scalar_type()));
  }
}

// One dense convolution per switch with the weight (and bias) outside the switch's blocks zeroed:
// it computes the zero blocks too (k times the FLOPs of a kx(1/k) switch) but makes S oneDNN calls
// instead of one per unit, and on small layers, where a call's fixed cost outweighs its arithmetic,
// that is the fastest way there is (plain.masked_conv of bench/, the best plain way on many of them).
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

void forward_masked(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                    const std::vector<Block>& blocks) {
  for (int64_t s = 0; s < g.S; ++s) {
    const Tensor b = bias.defined() ? switch_masked(bias, blocks, s) : Tensor();
    y.narrow(0, s * g.B, g.B)
        .copy_(at::convolution(x.narrow(0, s * g.B, g.B), switch_masked(weight, blocks, s), b, {g.sh, g.sw},
                               {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, 1));
  }
}

// As backward_units: grad_x rows written (zero where the masked weight reads nothing), the blocks'
// weight and bias gradients added in a fixed order.
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

// The paths a layer may run on: "native" (the fixed rules above: the package's GEMM and narrow-group
// kernels, BLAS, oneDNN's units), "masked", and "relayout": x and grad_y copied to the other
// memory format (NCHW <-> channels_last) and the op called on the copies, choosing again there
// between native and masked, the results copied back -- most of the fast paths are channels_last,
// and oneDNN's channels_last kernels have slow cases NCHW has not (kernels larger than the image);
// measured_choice.h picks per shape.
enum Path : size_t { kNative = 0, kMasked = 1, kRelayout = 2 };

MeasuredChoices& choices() {
  static MeasuredChoices instance("PARADIS_CPU_CONV_PATH", {"native", "masked", "relayout"});
  return instance;
}

// Set while the op runs on relayout's copies, which do not relayout again.
thread_local bool in_relayout = false;

struct RelayoutScope {
  RelayoutScope() { in_relayout = true; }
  ~RelayoutScope() { in_relayout = false; }
};

// x's layout swapped: NCHW <-> channels_last.
at::MemoryFormat other_format(const Tensor& x) {
  return kernel_format(x) == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::Contiguous
                                                            : at::MemoryFormat::ChannelsLast;
}

// The candidates for x (contiguous in its kernel format); one-pixel images are the same memory in
// both layouts.
std::vector<std::string> candidates(const Tensor& x) {
  if (in_relayout || x.size(2) * x.size(3) == 1) return {"native", "masked"};
  return {"native", "masked", "relayout"};
}

// input_shared layers (a network's stem) have one path: each output channel computed once.
constexpr const char* kSharedRule = "input_shared: one oneDNN convolution per distinct output range";

// What the native rules run for a non-input_shared layer.
const char* native_rule(const Geometry& g, const Tensor& x, bool gathered) {
  if (runs_on_pointwise_gemm(g, x))
    return gathered ? "stride grid gathered, pointwise GEMM kernels" : "pointwise GEMM kernels";
  if (gathered || runs_on_blas(g, x))
    return gathered ? "stride grid gathered, BLAS GEMM per block" : "BLAS GEMM per block";
  return "units (narrow-group kernels or oneDNN grouped convolutions)";
}

// The key a decision is cached under: everything the paths' speed depends on. phase: 0 for the
// forward, 1 + the output_mask bits for a backward.
ChoiceKey choice_key(int64_t phase, const Geometry& g, const std::vector<Block>& blocks, const Tensor& x) {
  ChoiceKey key{phase,
                g.S,
                g.B,
                g.C_in,
                g.C_out,
                g.H,
                g.W,
                g.kh,
                g.kw,
                g.sh,
                g.sw,
                g.ph,
                g.pw,
                g.dh,
                g.dw,
                g.shared,
                static_cast<int64_t>(x.scalar_type()),
                kernel_format(x) == at::MemoryFormat::ChannelsLast,
                at::get_num_threads(),
                avx512_enabled(),
                pointwise_gemm_enabled()};
  for (const Block& b : blocks) key.insert(key.end(), {b.s, b.i0, b.i1, b.o0, b.o1});
  return key;
}

int64_t backward_phase(bool need_x, bool need_w, bool need_b) { return 1 + need_x + 2 * need_w + 4 * need_b; }

// The key in words, for explain.
std::string choice_words(int64_t phase, const Geometry& g, const std::vector<Block>& blocks, const Tensor& x,
                         const char* rule) {
  std::ostringstream words;
  if (phase == 0) {
    words << "forward";
  } else {
    const int64_t mask = phase - 1;
    words << "backward (grad x " << (mask & 1 ? "yes" : "no") << ", weight " << (mask & 2 ? "yes" : "no") << ", bias "
          << (mask & 4 ? "yes" : "no") << ")";
  }
  words << " " << g.kh << "x" << g.kw << " stride " << g.sh << "x" << g.sw << " padding " << g.ph << "x" << g.pw
        << " dilation " << g.dh << "x" << g.dw << ", x [" << (g.shared ? g.B : g.S * g.B) << ", " << g.C_in << ", "
        << g.H << ", " << g.W << "] " << x.scalar_type()
        << (kernel_format(x) == at::MemoryFormat::ChannelsLast ? " channels_last" : " NCHW") << " -> " << g.C_out
        << " channels, " << g.S << " switches, blocks";
  for (const Block& b : blocks) words << " " << b.s << ":" << b.i0 << "-" << b.i1 << ">" << b.o0 << "-" << b.o1;
  words << ", " << at::get_num_threads() << " threads; native = " << rule;
  return words.str();
}

// What the native and masked paths run on: a strided 1x1 layer's gathered stride grid
// (gathered_pointwise) with its stride-1 geometry, else the layer itself.
struct RunInput {
  std::optional<Geometry> compact;
  Geometry g;
  Tensor x;
};

RunInput run_input(const Geometry& g, const Tensor& x, at::MemoryFormat format) {
  const std::optional<Geometry> compact = gathered_pointwise(g, x);
  if (!compact) return {compact, g, x};
  return {compact, *compact, on_grid(x, g).contiguous(format)};
}

bool reduced_precision(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// Whether a bfloat16 / float16 call computes in float32 on the float32 kernels (isa.h).
bool upcast(const Tensor& x) { return reduced_precision(x) && !low_precision_native(x.scalar_type() == at::kBFloat16); }

void check_dtype(const Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sliced_conv2d: cpu kernel supports floating dtypes, got ",
              x.scalar_type());
}

// The dtype weight and bias gradients add up in: float32 for bfloat16 / float16 (blocks of several
// switches share weights), else the weight's.
at::ScalarType accumulation(const Tensor& weight) { return at::toOpMathType(weight.scalar_type()); }

}  // namespace

Tensor sliced_conv2d_forward_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 IntArrayRef table, int64_t num_switches, IntArrayRef stride, IntArrayRef padding,
                                 IntArrayRef dilation, bool input_shared) {
  const Problem problem = validate(x, weight, table, num_switches, stride, padding, dilation, input_shared);
  const Geometry& g = problem.g;
  const std::vector<Block>& blocks = problem.blocks;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.C_out, "sliced_conv2d: bias must be [", g.C_out, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "sliced_conv2d: bias is ", bias->scalar_type(), " but x is ",
                x.scalar_type());
  }
  if (upcast(x)) {  // accumulate in float32, as the other backends do
    const auto b = has_bias ? std::optional<Tensor>(bias->to(at::kFloat)) : std::nullopt;
    return sliced_conv2d_forward_cpu(x.to(at::kFloat), weight.to(at::kFloat), b, table, num_switches, stride, padding,
                                     dilation, input_shared)
        .to(x.scalar_type());
  }
  check_dtype(x);
  const at::MemoryFormat format = kernel_format(x);
  const Tensor xc = x.contiguous(format), wc = weight.contiguous();
  const Tensor bc = has_bias ? bias->contiguous() : Tensor();
  const auto options = xc.options().memory_format(format);
  if (input_shared) {
    // every switch reads the same image, so each output channel is computed once (into a scratch
    // when several switches need it) and copied into the rows of each switch
    const auto shared_forward = [&](size_t) {
      Tensor y = at::empty({g.S * g.B, g.C_out, g.Ho, g.Wo}, options);
      zero_uncovered(y, g, blocks, false);
      const bool dedupe = g.S > 1;
      const Tensor target = dedupe ? at::empty({g.B, g.C_out, g.Ho, g.Wo}, options) : y;
      forward_units(xc, wc, bc, target, g, dedupe ? shared_output_blocks(g, blocks) : blocks);
      if (dedupe) {
        for (const Block& b : blocks)
          y.narrow(0, b.y0, g.B).narrow(1, b.o0, b.o1 - b.o0).copy_(target.narrow(1, b.o0, b.o1 - b.o0));
      }
      return y;
    };
    return choices().run<Tensor>(choice_key(0, g, blocks, xc), {"native"}, shared_forward,
                                 [&] { return choice_words(0, g, blocks, xc, kSharedRule); });
  }
  const RunInput in = run_input(g, xc, format);
  const std::optional<Geometry>& compact = in.compact;
  const Geometry& run_g = in.g;
  const Tensor& run_x = in.x;
  const char* rule = native_rule(run_g, run_x, compact.has_value());
  const auto run = [&](size_t path) {
    if (path == kRelayout) {
      const RelayoutScope scope;
      return sliced_conv2d_forward_cpu(xc.contiguous(other_format(xc)), weight, bias, table, num_switches, stride,
                                       padding, dilation, input_shared)
          .contiguous(format);
    }
    Tensor y = at::empty({g.S * g.B, g.C_out, g.Ho, g.Wo}, options);
    if (path == kMasked) {
      forward_masked(run_x, wc, bc, y, run_g, blocks);
      return y;
    }
    zero_uncovered(y, g, blocks, false);
    if (compact || runs_as_gemms(run_g, run_x))
      forward_gemms(run_x, wc, bc, y, run_g, blocks);
    else
      forward_units(run_x, wc, bc, y, run_g, blocks);
    return y;
  };
  return choices().run<Tensor>(choice_key(0, g, blocks, xc), candidates(xc), run,
                               [&] { return choice_words(0, g, blocks, xc, rule); });
}

std::tuple<Tensor, Tensor, Tensor> sliced_conv2d_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                              const Tensor& weight, IntArrayRef table,
                                                              int64_t num_switches, IntArrayRef stride,
                                                              IntArrayRef padding, IntArrayRef dilation,
                                                              bool input_shared, const c10::List<bool>& output_mask) {
  const Problem problem = validate(x, weight, table, num_switches, stride, padding, dilation, input_shared);
  const Geometry& g = problem.g;
  const std::vector<Block>& blocks = problem.blocks;
  TORCH_CHECK(output_mask.size() == 3, "sliced_conv2d: output_mask must have 3 entries, got ", output_mask.size());
  const std::vector<int64_t> y_shape{g.S * g.B, g.C_out, g.Ho, g.Wo};
  TORCH_CHECK(grad_y.sizes() == IntArrayRef(y_shape), "sliced_conv2d: grad_y must be ", IntArrayRef(y_shape), ", got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "sliced_conv2d: grad_y is ", grad_y.scalar_type(), " but x is ",
              x.scalar_type());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  if (upcast(x)) {  // accumulate in float32, as the other backends do
    auto [gx, gw, gb] =
        sliced_conv2d_backward_cpu(grad_y.to(at::kFloat), x.to(at::kFloat), weight.to(at::kFloat), table, num_switches,
                                   stride, padding, dilation, input_shared, output_mask);
    const auto back = [&](const Tensor& t) { return t.defined() ? t.to(x.scalar_type()) : t; };
    return {back(gx), back(gw), back(gb)};
  }
  check_dtype(x);
  const at::MemoryFormat format = kernel_format(x);
  const Tensor gyc = grad_y.contiguous(format), xc = x.contiguous(format), wc = weight.contiguous();
  const int64_t phase = backward_phase(need_x, need_w, need_b);
  if (input_shared) {
    return choices().run<std::tuple<Tensor, Tensor, Tensor>>(
        choice_key(phase, g, blocks, xc), {"native"},
        [&](size_t) { return shared_backward(gyc, xc, wc, g, blocks, output_mask); },
        [&] { return choice_words(phase, g, blocks, xc, kSharedRule); });
  }
  const RunInput in = run_input(g, xc, format);
  const std::optional<Geometry>& compact = in.compact;
  const Geometry& run_g = in.g;
  const Tensor& run_x = in.x;
  const char* rule = native_rule(run_g, run_x, compact.has_value());
  const auto run = [&](size_t path) {
    if (path == kRelayout) {
      const RelayoutScope scope;
      const at::MemoryFormat other = other_format(xc);
      auto [grad_x, grad_w, grad_b] =
          sliced_conv2d_backward_cpu(gyc.contiguous(other), xc.contiguous(other), weight, table, num_switches, stride,
                                     padding, dilation, input_shared, output_mask);
      return std::tuple<Tensor, Tensor, Tensor>{grad_x.defined() ? grad_x.contiguous(format) : grad_x, grad_w, grad_b};
    }
    Tensor grad_x, grad_w, grad_b;
    // the gradient of run_x: the units write the inputs they cover (the others get zero); a
    // gathered layer's is put back on the stride grid of a zeroed grad_x
    Tensor run_grad_x;
    if (need_x) {
      run_grad_x = at::empty(run_x.sizes(), run_x.options().memory_format(format));
      if (path != kMasked) zero_uncovered(run_grad_x, run_g, blocks, true);
    }
    if (need_w) grad_w = at::zeros(wc.sizes(), wc.options().dtype(accumulation(wc)));
    if (need_b) grad_b = at::zeros({g.C_out}, wc.options().dtype(accumulation(wc)));
    if (path == kMasked)
      backward_masked(gyc, run_x, wc, run_grad_x, grad_w, grad_b, run_g, blocks);
    else if (compact || runs_as_gemms(run_g, run_x))
      backward_gemms(gyc, run_x, wc, run_grad_x, grad_w, grad_b, run_g, blocks);
    else
      backward_units(gyc, run_x, wc, run_grad_x, grad_w, grad_b, run_g, blocks);
    if (need_x && compact) {
      grad_x = at::empty(xc.sizes(), xc.options().memory_format(format)).zero_();
      on_grid(grad_x, g).copy_(run_grad_x);
    } else {
      grad_x = run_grad_x;
    }
    const auto in_weight_dtype = [&](const Tensor& t) { return t.defined() ? t.to(wc.scalar_type()) : t; };
    return std::tuple<Tensor, Tensor, Tensor>{grad_x, in_weight_dtype(grad_w), in_weight_dtype(grad_b)};
  };
  return choices().run<std::tuple<Tensor, Tensor, Tensor>>(choice_key(phase, g, blocks, xc), candidates(xc), run,
                                                           [&] { return choice_words(phase, g, blocks, xc, rule); });
}

std::vector<std::string> sliced_conv2d_decisions() { return choices().describe(); }

TORCH_LIBRARY_IMPL(paradis, CPU, m) {
  m.impl("sliced_conv2d", TORCH_FN(sliced_conv2d_forward_cpu));
  m.impl("sliced_conv2d_backward", TORCH_FN(sliced_conv2d_backward_cpu));
}

}  // namespace paradis
