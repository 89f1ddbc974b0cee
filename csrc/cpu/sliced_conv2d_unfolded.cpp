// The unfolded path of sliced_conv2d (sliced_conv2d_paths.h), which sliced_conv2d.cpp times against
// the others on a layer shape's first call.
//
// On an image of a few pixels a convolution is one linear map from the C_in*H*W values of an image
// to its C_out*Ho*Wo outputs: the product with the layer's unfolded weight, the matrix
// [C_out*Ho*Wo, C_in*H*W] whose entry (o, p, i, q) is the kernel tap that joins input pixel q to
// output pixel p (zero where none does). An NCHW image is a row of that matrix's columns as it lies
// in memory, channel-major, so each block is one GEMM over column ranges of the stacked tensors,
// written in place. It computes H*W products per channel pair and output pixel where the
// convolution computes kh*kw, taps that read padding included: on kernels as large as the image
// (5x5 on 4-9 px) that is less work, and a few large GEMMs in place of oneDNN's calls on tiny
// images, whose fixed costs and padding taps the masked and native paths pay.
#include "cpu/sliced_conv2d_paths.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/parallel_grain.h"
#include "layout.h"

namespace paradis {
namespace sliced_detail {

using at::Tensor;

namespace {

// The layers it is a candidate for: at most this many products per one of the convolution's
// (H*W <= 4*kh*kw: a 5x5 kernel on images up to 10x10, 3x3 up to 6x6), and unfolded weights of at
// most this many entries (16 MiB of float32).
constexpr int64_t kUnfoldMaxWork = 4;
constexpr int64_t kUnfoldMaxElements = int64_t{1} << 22;

// What each output pixel reads: links[first[p]..first[p+1]) are output pixel p's (input pixel,
// kernel tap) pairs, taps that read padding left out.
struct Links {
  std::vector<int64_t> first;
  std::vector<std::pair<int64_t, int64_t>> links;
};

Links links_of(const Geometry& g) {
  Links out;
  for (int64_t oh = 0; oh < g.Ho; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      out.first.push_back(static_cast<int64_t>(out.links.size()));
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b) {
          const int64_t ih = oh * g.sh - g.ph + a * g.dh, iw = ow * g.sw - g.pw + b * g.dw;
          if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) out.links.push_back({ih * g.W + iw, a * g.kw + b});
        }
    }
  out.first.push_back(static_cast<int64_t>(out.links.size()));
  return out;
}

// Whether channel pair (o, i) lies in some block (only those entries of the unfolded matrices are
// read or folded back).
std::vector<char> in_blocks(const Geometry& g, const std::vector<Block>& blocks) {
  std::vector<char> used(g.C_out * g.C_in, 0);
  for (const Block& b : blocks)
    for (int64_t o = b.o0; o < b.o1; ++o)
      std::fill(used.begin() + o * g.C_in + b.i0, used.begin() + o * g.C_in + b.i1, 1);
  return used;
}

// The unfolded weight [C_out*Ho*Wo, C_in*H*W] (entries of channel pairs outside every block left
// unset: no block reads them).
Tensor unfolded_weight(const Tensor& weight, const Geometry& g, const std::vector<Block>& blocks) {
  const int64_t P = g.Ho * g.Wo, Q = g.H * g.W, taps_per_pair = g.kh * g.kw;
  const Links reach = links_of(g);
  const std::vector<char> used = in_blocks(g, blocks);
  Tensor out = at::empty({g.C_out * P, g.C_in * Q}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sliced_conv2d_unfolded_weight", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* m = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.C_out * P, grain_for(g.C_out * P, out.numel()), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t o = row / P, p = row % P;
        for (int64_t i = 0; i < g.C_in; ++i) {
          if (!used[o * g.C_in + i]) continue;
          const scalar_t* kernel = w + (o * g.C_in + i) * taps_per_pair;
          scalar_t* dst = m + row * g.C_in * Q + i * Q;
          std::fill(dst, dst + Q, scalar_t(0));
          for (int64_t l = reach.first[p]; l < reach.first[p + 1]; ++l)
            dst[reach.links[l].first] = kernel[reach.links[l].second];
        }
      }
    });
  });
  return out;
}

// Adds the gradient of block b's piece of the unfolded weight ([(o1-o0)*Ho*Wo, (i1-i0)*H*W]) to
// grad_weight, each tap the sum of its entries.
void fold_into(const Tensor& grad_weight, const Tensor& piece, const Geometry& g, const Block& b, const Links& reach) {
  const int64_t P = g.Ho * g.Wo, Q = g.H * g.W, taps_per_pair = g.kh * g.kw, width = b.i1 - b.i0;
  AT_DISPATCH_FLOATING_TYPES(grad_weight.scalar_type(), "sliced_conv2d_fold", [&] {
    const scalar_t* src = piece.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    const int64_t work = (b.o1 - b.o0) * width * static_cast<int64_t>(reach.links.size());
    at::parallel_for(b.o0, b.o1, grain_for(b.o1 - b.o0, work), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o)
        for (int64_t i = b.i0; i < b.i1; ++i) {
          scalar_t* kernel = gw + (o * g.C_in + i) * taps_per_pair;
          for (int64_t p = 0; p < P; ++p) {
            const scalar_t* row = src + ((o - b.o0) * P + p) * width * Q + (i - b.i0) * Q;
            for (int64_t l = reach.first[p]; l < reach.first[p + 1]; ++l)
              kernel[reach.links[l].second] += row[reach.links[l].first];
          }
        }
    });
  });
}

// The B images of a block's switch from row `first` on, as rows of `per_channel` values per
// channel, channels [c0, c1) (a view of an NCHW tensor).
Tensor block_columns(const Tensor& t, const Geometry& g, int64_t first, int64_t c0, int64_t c1, int64_t per_channel) {
  return t.reshape({t.size(0), -1}).narrow(0, first, g.B).narrow(1, c0 * per_channel, (c1 - c0) * per_channel);
}

Tensor block_piece(const Tensor& unfolded, const Geometry& g, const Block& b) {
  const int64_t P = g.Ho * g.Wo, Q = g.H * g.W;
  return unfolded.narrow(0, b.o0 * P, (b.o1 - b.o0) * P).narrow(1, b.i0 * Q, (b.i1 - b.i0) * Q);
}

}  // namespace

bool unfolds(const Geometry& g, const Tensor& x) {
  const int64_t P = g.Ho * g.Wo, Q = g.H * g.W;
  return !g.shared && kernel_format(x) == at::MemoryFormat::Contiguous &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && Q <= kUnfoldMaxWork * g.kh * g.kw &&
         g.C_out * P * g.C_in * Q <= kUnfoldMaxElements;
}

// The GEMMs write into views of the op's outputs: out= calls, which autograd refuses when an input
// requires grad (a direct call from C++); a kernel is below autograd anyway.
void forward_unfolded(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                      const std::vector<Block>& blocks) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t P = g.Ho * g.Wo, Q = g.H * g.W;
  const Tensor unfolded = unfolded_weight(weight, g, blocks);
  const Tensor bias_per_output = bias.defined() ? bias.repeat_interleave(P) : Tensor();
  for (const Block& b : blocks) {
    Tensor out = block_columns(y, g, b.y0, b.o0, b.o1, P);
    const Tensor in = block_columns(x, g, b.x0, b.i0, b.i1, Q), w = block_piece(unfolded, g, b).t();
    if (bias.defined())
      at::addmm_out(out, bias_per_output.narrow(0, b.o0 * P, (b.o1 - b.o0) * P), in, w);
    else
      at::mm_out(out, in, w);
  }
}

void backward_unfolded(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                       const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                       const std::vector<Block>& blocks) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t P = g.Ho * g.Wo, Q = g.H * g.W;
  const Tensor unfolded = grad_x.defined() ? unfolded_weight(weight, g, blocks) : Tensor();
  const Links reach = grad_weight.defined() ? links_of(g) : Links();
  for (const Block& b : blocks) {
    const Tensor gy = block_columns(grad_y, g, b.y0, b.o0, b.o1, P);
    if (grad_x.defined()) {
      Tensor out = block_columns(grad_x, g, b.x0, b.i0, b.i1, Q);
      at::mm_out(out, gy, block_piece(unfolded, g, b));
    }
    if (grad_weight.defined())
      fold_into(grad_weight, at::mm(gy.t(), block_columns(x, g, b.x0, b.i0, b.i1, Q)), g, b, reach);
    if (grad_bias.defined()) grad_bias.narrow(0, b.o0, b.o1 - b.o0).add_(gy.reshape({g.B, b.o1 - b.o0, P}).sum({0, 2}));
  }
}

}  // namespace sliced_detail
}  // namespace paradis
