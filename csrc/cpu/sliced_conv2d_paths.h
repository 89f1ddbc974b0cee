// The paths of sliced_conv2d's CPU kernel (sliced_conv2d.h) that sliced_conv2d.cpp chooses
// between, each in its own file: the units (sliced_conv2d_units.cpp), the GEMMs of channels_last
// 1x1 layers (sliced_conv2d_gemms.cpp), the masked dense convolutions (sliced_conv2d_masked.cpp)
// and the unfolded weight's GEMMs of small NCHW images (sliced_conv2d_unfolded.cpp).
// Internal to the CPU kernels.
//
// What they take: x and grad_y the stacked tensors (x a gathered layer's compact image:
// gathered_pointwise), contiguous in x's kernel format (layout.h), weight contiguous, bias [C_out]
// or undefined; g and blocks of sliced_conv2d_plan.h. y and grad_x (x's) are written in place;
// grad_weight and grad_bias start at zero, in the dtype they add up in, and each block's gradient
// is added to them in a fixed order (the same on every run). A gradient not wanted is undefined.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/sliced_conv2d_plan.h"

namespace paradis {
namespace sliced_detail {

// The units (sliced_conv2d_units.cpp): each run of a switch's equal-width blocks, side by side, is
// one grouped convolution, on narrow_group_conv.h's kernels or oneDNN's (through ATen). Both write
// only the channels that the blocks cover; the caller zeroes the rest (zero_uncovered).

// y (or the input_shared scratch) = every unit's convolution, in place.
void forward_units(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                   const Geometry& g, const std::vector<Block>& blocks);

// Gradients of every unit (not input_shared: see shared_backward). grad_x: each unit writes its own
// rows and input channels. Weight gradients (which start at zero): the blocks of different
// switches that share weights add up in a fixed order.
void backward_units(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& grad_x,
                    const at::Tensor& grad_weight, const at::Tensor& grad_bias, const Geometry& g,
                    const std::vector<Block>& blocks);

// input_shared (a network's stem): every block convolves the same image with all its channels, so
// the gradients of all blocks are those of one convolution whose output gradient sums the blocks'
// (each block's output channels from its switch's rows): one oneDNN call instead of one per unit
// (ResNet20's stem, 7 blocks: bench/README.md). Channels no block covers get zero gradients.
// Returns (grad_x, grad_weight, grad_bias), those output_mask asks for (the others undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& weight, const Geometry& g,
                                                               const std::vector<Block>& blocks,
                                                               const c10::List<bool>& output_mask);

// The GEMMs (sliced_conv2d_gemms.cpp): channels_last 1x1 layers as products of the channel slices
// of the [pixels, channels] matrices, NCHW ones as products of each image's [channels, pixels]
// slices (one batched GEMM per block), every block in place.

// Whether a layer runs as GEMMs, and on which (the rules and their thresholds:
// sliced_conv2d_gemms.cpp): pointwise_gemm.h's kernels, or one BLAS GEMM per block.
bool runs_on_pointwise_gemm(const Geometry& g, const at::Tensor& x);
bool runs_on_blas(const Geometry& g, const at::Tensor& x);
bool runs_as_gemms(const Geometry& g, const at::Tensor& x);

// A 1x1 layer of stride > 1 (no padding) reads only the pixels on its stride's grid: gathered into
// a compact image, it is a stride-1 layer (the geometry returned) that runs as GEMMs, on
// pointwise_gemm.h's kernels where runs_on_pointwise_gemm says, else BLAS GEMMs at any image size; its input gradient
// is that layer's, put back on the grid, zero elsewhere. oneDNN ran these layers at 15-25% of the dense-GEMM rate
// (ResNet's shortcuts), and its AVX2 weight gradient of them hangs or crashes on some shapes (bench/README.md).
std::optional<Geometry> gathered_pointwise(const Geometry& g, const at::Tensor& x);

// The pixels of t on the stride grid of a 1x1 layer (a view).
at::Tensor on_grid(const at::Tensor& t, const Geometry& g);

// y = every block's product, for a runs_as_gemms layer or gathered_pointwise's compact one: on
// pointwise_gemm.h's kernels where runs_on_pointwise_gemm says, else one BLAS GEMM per block.
// Writes only the channels that the blocks cover, as the units do.
void forward_gemms(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                   const Geometry& g, const std::vector<Block>& blocks);

// As backward_units; the weight gradient of each block is accumulated by the GEMM itself.
void backward_gemms(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& grad_x,
                    const at::Tensor& grad_weight, const at::Tensor& grad_bias, const Geometry& g,
                    const std::vector<Block>& blocks);

// On CPUs without AVX-512 oneDNN runs channels_last 1x1 weight gradients on an AVX2 kernel that
// hangs or crashes on some shapes (bench/README.md): there the units and the masked path take the
// weight gradient of such layers from BLAS (pointwise_grad_weight) and only the rest from oneDNN.
bool onednn_pointwise_hazard(const Geometry& g, const at::Tensor& x);

// The weight gradient [C_out, C_in, 1, 1] of a stride-1 1x1 convolution of channels-innermost x
// (channel slices of the stacked tensors too): one GEMM over the pixel rows.
at::Tensor pointwise_grad_weight(const at::Tensor& grad_y, const at::Tensor& x);

// The masked path (sliced_conv2d_masked.cpp): one dense convolution per switch, with the weight
// (and bias) outside the switch's blocks zeroed. y: each switch's rows written whole (the channels
// no block covers come out zero).
void forward_masked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                    const Geometry& g, const std::vector<Block>& blocks);

// As backward_units: grad_x rows written (zero where the masked weight reads nothing), the blocks'
// weight and bias gradients added in a fixed order.
void backward_masked(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& grad_x,
                     const at::Tensor& grad_weight, const at::Tensor& grad_bias, const Geometry& g,
                     const std::vector<Block>& blocks);

// The masked path's grouped form: the switches as the groups of one convolution over x's rows
// moved into channels ([S*B, C] -> [B, S*C]). Writes what forward_masked / backward_masked write.
// Not for onednn_pointwise_hazard layers (oneDNN computes its weight gradient).
void forward_grouped(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                     const Geometry& g, const std::vector<Block>& blocks);
void backward_grouped(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& grad_x,
                      const at::Tensor& grad_weight, const at::Tensor& grad_bias, const Geometry& g,
                      const std::vector<Block>& blocks);

// The unfolded path (sliced_conv2d_unfolded.cpp): each image one row of C_in*H*W values, the layer
// the product with its unfolded weight [C_out*Ho*Wo, C_in*H*W], one GEMM per block over column
// ranges of the NCHW tensors, in place. Writes what forward_gemms / backward_gemms write.
// Whether a layer may run on it: NCHW float32 / float64 x, small images (bounded extra work and
// unfolded-weight size; the file says which).
bool unfolds(const Geometry& g, const at::Tensor& x);
void forward_unfolded(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                      const Geometry& g, const std::vector<Block>& blocks);
void backward_unfolded(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& grad_x, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                       const Geometry& g, const std::vector<Block>& blocks);

}  // namespace sliced_detail
}  // namespace paradis
