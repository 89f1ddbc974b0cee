#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace paradis {

// GEMMs on channel slices of [pixels, channels] matrices (channels_last images seen as matrices),
// for the 1x1 convolutions of sliced_conv2d: every block of a layer reads and writes its slice of
// the stacked tensors in place, so no slice is copied and no unit output is copied back. oneDNN's
// grouped 1x1 convolutions run narrow groups at a fraction of the dense rate, and its outputs
// must be copied into the stacked tensors (bench/README.md). AVX-512, float32.

// out[out_row0 + r, n0 + n] = sum_k in[in_row0 + r, k0 + k] * m[k0 + k, n0 + n] (+ bias[n0 + n]),
// for r < rows, n < n1 - n0, k < k1 - k0.
struct GemmBlock {
  int64_t in_row0, out_row0, rows, k0, k1, n0, n1;
};

// Whether the kernels can run here (AVX-512F, not turned off by PARADIS_CPU_ISA=baseline).
bool pointwise_gemm_enabled();

// Every block's product, written into out. in [*, K], out [*, N]: float32, unit channel stride, any
// row stride; m [K, N] any strides (the weight or its transpose); bias [N] or undefined. Blocks
// with the same rows run together, a tile of rows at a time.
void pointwise_gemm(const at::Tensor& in, const at::Tensor& m, const at::Tensor& bias, const at::Tensor& out,
                    const std::vector<GemmBlock>& blocks);

// The gradient of m, transposed: grad_w[n0:n1, k0:k1] += grad_out[rows, n0:n1]^T . in[rows, k0:k1]
// for each block, in block order (with m = weight^T, grad_w is the weight's gradient). Each block
// sums its rows over a fixed partition of them, so the result is the same on every run and for any
// number of threads. grad_w [N, K] float32 with unit column stride.
void pointwise_gemm_grad_weight(const at::Tensor& in, const at::Tensor& grad_out, const at::Tensor& grad_w,
                                const std::vector<GemmBlock>& blocks);

}  // namespace paradis
