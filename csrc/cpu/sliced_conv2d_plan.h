// The block model of sliced_conv2d's CPU kernel (sliced_conv2d.h), shared by the files that make it
// up: a layer's geometry and its (switch, sub-network) blocks, unpacked from the op's block table
// and validated. sliced_conv2d.cpp chooses a path per layer shape and registers the op; the paths
// are declared in sliced_conv2d_paths.h. Internal to the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace paradis {
namespace sliced_detail {

// A layer: S switches of B images each (with input_shared, B is every row of x, which all switches
// read), C_in -> C_out channels, H x W images, a kh x kw kernel, Ho x Wo outputs, stride sh x sw,
// padding ph x pw, dilation dh x dw.
struct Geometry {
  int64_t S, B, C_in, C_out, H, W, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw;
  bool shared;
};

// One (switch, sub-network) block; x0 / y0 are its first sample rows in x and y.
struct Block {
  int64_t s, i0, i1, o0, o1, x0, y0;
};

struct Problem {
  Geometry g;
  std::vector<Block> blocks;
};

// Validates everything but the data (before anything is allocated) and unpacks the block table.
Problem validate(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef table, int64_t num_switches,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool shared);

// Zeroes the channels of each switch's rows of t that none of its blocks covers: output channels
// of y, or the input channels that grad_x gets nothing for.
void zero_uncovered(const at::Tensor& t, const Geometry& g, const std::vector<Block>& blocks, bool inputs);

// The disjoint output ranges that the blocks of input_shared cover, each computed once.
std::vector<Block> shared_output_blocks(const Geometry& g, const std::vector<Block>& blocks);

}  // namespace sliced_detail
}  // namespace paradis
