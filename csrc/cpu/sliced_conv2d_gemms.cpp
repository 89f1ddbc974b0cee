// The GEMMs of sliced_conv2d's native path (sliced_conv2d_paths.h; the overview is at the top of
// sliced_conv2d.cpp): the rules that send channels_last 1x1 layers to them, the products on
// pointwise_gemm.h's kernels or BLAS, and the BLAS weight gradient that the units and the masked
// path use where oneDNN's is unsafe.
#include "cpu/sliced_conv2d_paths.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>

#include "layout.h"
#include "cpu/isa.h"
#include "cpu/pointwise_gemm.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace paradis {
namespace sliced_detail {

using at::Tensor;

namespace {

// A channels_last [N, C, H, W] tensor as the [N*H*W, C] matrix it is in memory (a view).
Tensor pixel_rows(const Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// Channels_last 1x1 layers (stride 1, no padding) run as GEMMs on the channel slices of the
// [pixels, channels] matrices, every block in place, no slice copied: float32 on pointwise_gemm.h's
// kernels (AVX-512), which beat oneDNN's (grouped) convolutions on narrow blocks and save the
// copies of unit outputs, except on small images with few pixel rows per switch (the deepest layers
// of a network: [64, 1024, 2, 2] is 256 rows), where BLAS runs the wide blocks faster; there, and
// for float64 or without AVX-512, one BLAS GEMM per block, which beats oneDNN on images of at most
// 16 pixels, most of all on the weight gradient; larger images go to oneDNN (bench/README.md).
// Images of one pixel are channels_last whatever their layout says (the same memory): [N, C, 1, 1]
// runs as GEMMs too. NCHW 1x1 layers run as GEMMs at every image size: each image's block is a
// [channels, pixels] matrix, a block one batched GEMM over its images, where oneDNN's NCHW
// (grouped) 1x1 convolutions ran at a fraction of that rate (bench/README.md).
// Both thresholds tuned on the Sapphire Rapids host of bench/README.md (2 cores, AVX-512, MKL BLAS,
// oneDNN 3.x) by timing each path on the layers of bench/suites.py.
constexpr int64_t kBlasMaxPixels = 16;
constexpr int64_t kBlasMaxRows = 1024;

// A 1x1 layer of stride 1 without padding, in either layout.
bool pointwise_layer(const Geometry& g) {
  return g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && !g.shared;
}

// An NCHW tensor's images [first, first + count), channels [c0, c1), as [count, c1 - c0, pixels]
// matrices (a view).
Tensor image_matrices(const Tensor& t, int64_t first, int64_t count, int64_t c0, int64_t c1) {
  return t.narrow(0, first, count).narrow(1, c0, c1 - c0).flatten(2);
}

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

// Whether grad_y^T x of two pixel-row matrices runs faster as (x^T grad_y)^T: MKL's GEMM ran these
// long-K products 3-6x slower when x has fewer than 16 columns and grad_y more (the result's narrow
// side is then the GEMM's vector dimension) than transposed, whose small [i, o] result is read
// back transposed; from 16 columns on the two orientations are even (bench/README.md).
constexpr int64_t kNarrowProductColumns = 16;

bool transposes_product(const Tensor& grad_y, const Tensor& x) {
  return x.size(1) < kNarrowProductColumns && x.size(1) < grad_y.size(1);
}

// grad_y^T x ([o, i]) of two pixel-row matrices, in the faster orientation (a view).
Tensor channel_product(const Tensor& grad_y, const Tensor& x) {
  return transposes_product(grad_y, x) ? at::mm(x.t(), grad_y).t() : at::mm(grad_y.t(), x);
}

// grad_weight_block += grad_y^T x, accumulated by the GEMM itself where it can.
void add_channel_product(Tensor grad_weight_block, const Tensor& grad_y, const Tensor& x) {
  if (grad_weight_block.scalar_type() == grad_y.scalar_type() && !transposes_product(grad_y, x))
    grad_weight_block.addmm_(grad_y.t(), x);
  else  // a float32 sum of low-precision products, or the transposed product
    grad_weight_block.add_(channel_product(grad_y, x));
}

// W x[n] for each image of a block ([o, i] by [count, i, pixels] matrices), as [count, o, pixels]:
// one batched GEMM, the weight broadcast. (Into a fresh tensor, then copied: written straight into
// the block's strided images, and on channel-major copies of x, it ran 2-5x slower.)
Tensor images_product(const Tensor& w, const Tensor& images) {
  return at::bmm(w.expand({images.size(0), w.size(0), w.size(1)}), images);
}

// The sum over images of grad_y[n] x[n]^T ([count, o, pixels] by [count, i, pixels] matrices), in
// dtype: batched GEMMs over chunks of images whose [chunk, o, i] products stay under kChunkElements.
constexpr int64_t kChunkElements = int64_t{1} << 20;

Tensor images_channel_product(const Tensor& grad_y, const Tensor& x, at::ScalarType dtype) {
  const int64_t count = grad_y.size(0);
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / (grad_y.size(1) * x.size(1)));
  Tensor sum;
  for (int64_t n = 0; n < count; n += chunk) {
    const int64_t m = std::min(chunk, count - n);
    const Tensor part = at::bmm(grad_y.narrow(0, n, m), x.narrow(0, n, m).transpose(1, 2)).sum(0, false, dtype);
    sum = sum.defined() ? sum.add_(part) : part;
  }
  return sum;
}

// forward_gemms of an NCHW layer: per block, images_product into its images of y.
void forward_image_gemms(const Tensor& x, const Tensor& w2, const Tensor& bias, const Tensor& y, const Geometry& g,
                         const std::vector<Block>& blocks) {
  for (const Block& b : blocks) {
    Tensor out = image_matrices(y, b.y0, g.B, b.o0, b.o1);
    out.copy_(images_product(block_weight(w2, b), image_matrices(x, b.x0, g.B, b.i0, b.i1)));
    if (bias.defined()) out.add_(bias.narrow(0, b.o0, b.o1 - b.o0).view({1, -1, 1}));
  }
}

// backward_gemms of an NCHW layer: grad_x as the forward with the transposed weight, each block's
// weight gradient images_channel_product.
void backward_image_gemms(const Tensor& grad_y, const Tensor& x, const Tensor& w2, const Tensor& grad_x,
                          const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                          const std::vector<Block>& blocks) {
  for (const Block& b : blocks) {
    const Tensor gy = image_matrices(grad_y, b.y0, g.B, b.o0, b.o1);
    if (grad_x.defined())
      image_matrices(grad_x, b.x0, g.B, b.i0, b.i1).copy_(images_product(block_weight(w2, b).t(), gy));
    if (grad_weight.defined()) {
      const Tensor product =
          images_channel_product(gy, image_matrices(x, b.x0, g.B, b.i0, b.i1), grad_weight.scalar_type());
      block_weight(grad_weight.view({g.C_out, g.C_in}), b).add_(product);
    }
    if (grad_bias.defined())
      grad_bias.narrow(0, b.o0, b.o1 - b.o0).add_(gy.sum({0, 2}, false, grad_bias.scalar_type()));
  }
}

}  // namespace

bool onednn_pointwise_hazard(const Geometry& g, const Tensor& x) {
  return pointwise_layer(g) && channels_innermost(x) && !avx512_enabled();
}

Tensor pointwise_grad_weight(const Tensor& grad_y, const Tensor& x) {
  return channel_product(pixel_rows(grad_y), pixel_rows(x)).reshape({grad_y.size(1), x.size(1), 1, 1});
}

bool runs_on_pointwise_gemm(const Geometry& g, const Tensor& x) {
  const bool large = g.Ho * g.Wo > kBlasMaxPixels || g.B * g.Ho * g.Wo >= kBlasMaxRows;
  return pointwise_layer(g) && channels_innermost(x) && large && x.scalar_type() == at::kFloat &&
         pointwise_gemm_enabled();
}

bool runs_on_blas(const Geometry& g, const Tensor& x) {
  return pointwise_layer(g) && (!channels_innermost(x) || g.Ho * g.Wo <= kBlasMaxPixels) &&
         !runs_on_pointwise_gemm(g, x);
}

bool runs_as_gemms(const Geometry& g, const Tensor& x) { return runs_on_blas(g, x) || runs_on_pointwise_gemm(g, x); }

std::optional<Geometry> gathered_pointwise(const Geometry& g, const Tensor& x) {
  if (g.kh != 1 || g.kw != 1 || g.ph != 0 || g.pw != 0 || (g.sh == 1 && g.sw == 1) || g.shared) return std::nullopt;
  Geometry compact = g;
  compact.H = g.Ho;
  compact.W = g.Wo;
  compact.sh = compact.sw = compact.dh = compact.dw = 1;
  if (!pointwise_layer(compact)) return std::nullopt;
  return compact;
}

Tensor on_grid(const Tensor& t, const Geometry& g) { return t.slice(2, 0, g.H, g.sh).slice(3, 0, g.W, g.sw); }

// The BLAS GEMMs write into views of the op's outputs: out= calls, which autograd refuses when an
// input requires grad (a direct call from C++); a kernel is below autograd anyway.
void forward_gemms(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                   const std::vector<Block>& blocks) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (!channels_innermost(x)) {
    forward_image_gemms(x, weight.view({g.C_out, g.C_in}), bias, y, g, blocks);
    return;
  }
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

void backward_gemms(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                    const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                    const std::vector<Block>& blocks) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (!channels_innermost(x)) {
    backward_image_gemms(grad_y, x, weight.view({g.C_out, g.C_in}), grad_x, grad_weight, grad_bias, g, blocks);
    return;
  }
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
      add_channel_product(block_weight(gw2, b), gy, block_rows(x2, g, b.x0, b.i0, b.i1));
    }
  }
  if (grad_bias.defined()) {
    for (const Block& b : blocks)
      grad_bias.narrow(0, b.o0, b.o1 - b.o0)
          .add_(block_rows(gy2, g, b.y0, b.o0, b.o1).sum(0, false, grad_bias.scalar_type()));
  }
}

}  // namespace sliced_detail
}  // namespace paradis
