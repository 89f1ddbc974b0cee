#pragma once
// Internal to the CPU sliced convolution: what its NCHW (sliced_conv2d.cpp) and NHWC
// (sliced_conv2d_nhwc.cpp) kernels share — BLAS on strided sub-matrices, the problem geometry,
// the block table, task sizing and scratch buffers.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

// Fortran BLAS of libtorch_cpu (MKL on x86, OpenBLAS on arm). ATen's at::native::cpublas::gemm
// overloads that reach it are not exported to extensions, and the generic cpublas template is
// ATen's slow fallback, so the kernels call BLAS directly, on strided sub-matrices.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace paradis {
namespace conv {

using at::Tensor;

constexpr int64_t kColumnBuffer = 1 << 18; // elements of an im2col tile: stays in L2
constexpr int64_t kTasksPerThread = 4;    // tasks per thread, to even out unequal blocks
constexpr int64_t kMinTaskWork = 1 << 20; // multiply-adds per task, below which splitting costs
constexpr int64_t kRowAlign = 8;          // task row chunks are multiples of this
constexpr int kLanes = 8;                 // independent partial sums of a reduction

// Row-major C[m, n] = op(A)[m, k] @ op(B)[k, n] + beta * C, op(X) = X^T when trans_x. A row-major
// matrix is its column-major transpose, so BLAS computes C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&tb, &ta, &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
  else
    dgemm_(&tb, &ta, &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
}

struct Geometry {
  int64_t S, B, C_in, C_out, H, W, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw;
  bool shared;
  int64_t hw() const { return H * W; }
  int64_t ohw() const { return Ho * Wo; }
  int64_t taps() const { return kh * kw; }
  int64_t w_ld() const { return C_in * kh * kw; } // elements per weight row
  // The input rows are the output columns: no im2col needed.
  bool pointwise() const { return taps() == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
};

// One (switch, sub-network) block; x0 / y0 are its first sample rows in x and y.
struct Block {
  int64_t s, i0, i1, o0, o1, x0, y0;
  int64_t depth(const Geometry& g) const { return (i1 - i0) * g.taps(); } // im2col rows
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits [begin, end) into chunks of kRowAlign-multiple size, each about `target` work.
inline std::vector<std::pair<int64_t, int64_t>> row_chunks(int64_t begin, int64_t end, int64_t work_per_row,
                                                    int64_t target) {
  int64_t size = std::max<int64_t>(1, target / std::max<int64_t>(1, work_per_row));
  size = ceil_div(size, kRowAlign) * kRowAlign;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t r = begin; r < end; r += size) chunks.push_back({r, std::min(end, r + size)});
  return chunks;
}

inline int64_t task_target(int64_t total_work) {
  return std::max(kMinTaskWork, total_work / (at::get_num_threads() * kTasksPerThread));
}

// Output indices o in [0, out) whose input o * stride - pad + offset lies in [0, in).
inline std::pair<int64_t, int64_t> valid_outputs(int64_t in, int64_t out, int64_t stride, int64_t pad,
                                          int64_t offset) {
  const int64_t first = pad - offset; // o * stride >= first
  const int64_t last = in - 1 + pad - offset; // o * stride <= last
  const int64_t lo = first <= 0 ? 0 : ceil_div(first, stride);
  const int64_t hi = last < 0 ? 0 : last / stride + 1;
  return {std::min(lo, out), std::clamp(hi, std::min(lo, out), out)};
}

template <typename T>
T row_sum(const T* a, int64_t n) {
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j];
  }
  for (; i < n; ++i) lanes[0] += a[i];
  T total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// A thread's scratch matrix (64-byte aligned by ATen's allocator, so BLAS takes the same path on
// every run: results are bit-reproducible).
template <typename T>
struct Scratch {
  Tensor storage;
  T* get(int64_t n) {
    if (!storage.defined() || storage.numel() < n)
      storage = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    return storage.template data_ptr<T>();
  }
};

// The NHWC kernels (sliced_conv2d_nhwc.cpp): x, y, grad_y, grad_x channels_last-contiguous;
// outputs preallocated (y and a pointwise grad_x with uncovered channels zero, other grads all
// zero); bias / grad tensors may be undefined (not needed). `groups`: the blocks that write the
// same grad_x rows and channels (one block each; all blocks with input_shared).
void nhwc_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                  const std::vector<Block>& blocks);
void nhwc_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                   const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                   const std::vector<Block>& blocks, const std::vector<std::vector<Block>>& groups);

} // namespace conv
} // namespace paradis
