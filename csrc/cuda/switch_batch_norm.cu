// CUDA kernels of paradis::switch_batch_norm and its backward: the contract of
// csrc/cpu/switch_batch_norm.h (per-switch BatchNorm + activation over switch-major stacked
// activations x = [S*B, C, *]) on the GPU, launched on the current stream.
//
// The B*HW values of one (switch, channel) pair are split into `chunks` blocks so the grid fills
// the GPU whatever S*C is. Forward: per-chunk Welford (count, mean, M2) in fp32 (fp64 for double),
// merged within a block by warp shuffles, across chunks by Chan's formula in a fixed order
// (deterministic). Backward: per-chunk sums of g and g*xhat, then grad_x. Headers: only c10/cuda
// ones, which need nothing beyond the CUDA runtime (ATen/cuda/CUDAContext.h pulls in cuBLAS and
// cuSPARSE headers), so the file compiles wherever nvcc does.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "activation.h"
#include "layout.h"
#include "switch_batch_norm_checks.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;

// y = activation(y) in place, for the residual's separate pass.
Tensor activate_(Tensor y, Act act) {
  if (act == Act::Relu) return y.relu_();
  if (act == Act::Relu6) return y.clamp_(0, 6);
  return y;
}

// Not tuned yet (no GPU has run this file): common first choices for an H100.
constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kMaxSwitches = 64;
constexpr int64_t kTargetBlocks = 2048;  // chunks per pair are chosen to reach about this many
constexpr int64_t kMinValuesPerBlock = 4 * kThreads;

// Per-switch tables, passed by value as a kernel argument (no host-to-device copy).
struct SwitchTable {
  int64_t covered[kMaxSwitches];
  int64_t rows[kMaxSwitches];
};

// x = [S*B, C, HW] contiguous, its pairs' values split into `chunks` runs of `chunk` values.
struct Geometry {
  int64_t S, B, C, HW, chunk, chunks;
  __host__ __device__ int64_t count() const { return B * HW; }
  __device__ int64_t offset(int64_t s, int64_t c, int64_t i) const {
    const int64_t b = i / HW;
    return ((s * B + b) * C + c) * HW + (i - b * HW);
  }
};

template <typename T>
struct Moments {
  T count, mean, m2;
  __device__ void merge(const Moments& o) {  // Chan et al.
    const T total = count + o.count;
    if (total == T(0)) return;
    const T delta = o.mean - mean;
    mean += delta * (o.count / total);
    m2 += o.m2 + delta * delta * (count * o.count / total);
    count = total;
  }
};

template <typename T>
__device__ Moments<T> shuffle_down(const Moments<T>& m, int lane) {
  return {__shfl_down_sync(0xffffffffu, m.count, lane), __shfl_down_sync(0xffffffffu, m.mean, lane),
          __shfl_down_sync(0xffffffffu, m.m2, lane)};
}

// Block-wide merge of every thread's moments; the result is valid in thread 0.
template <typename T>
__device__ Moments<T> block_merge(Moments<T> m) {
  __shared__ Moments<T> warps[kThreads / kWarp];
  for (int lane = kWarp / 2; lane > 0; lane /= 2) m.merge(shuffle_down(m, lane));
  if (threadIdx.x % kWarp == 0) warps[threadIdx.x / kWarp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / kWarp; ++w) m.merge(warps[w]);
  }
  return m;
}

// Block-wide sums of two values; valid in thread 0.
template <typename T>
__device__ void block_sum2(T& a, T& b) {
  __shared__ T warps[2][kThreads / kWarp];
  for (int lane = kWarp / 2; lane > 0; lane /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, lane);
    b += __shfl_down_sync(0xffffffffu, b, lane);
  }
  if (threadIdx.x % kWarp == 0) {
    warps[0][threadIdx.x / kWarp] = a;
    warps[1][threadIdx.x / kWarp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / kWarp; ++w) {
      a += warps[0][w];
      b += warps[1][w];
    }
  }
}

// Block (pair, chunk) of the grid: the value range [start, stop) of switch s, channel c.
struct Work {
  int64_t pair, k, s, c, start, stop;
  __device__ Work(const Geometry& g)
      : pair(blockIdx.x),
        k(blockIdx.y),
        s(pair / g.C),
        c(pair % g.C),
        start(k * g.chunk),
        stop(start + g.chunk < g.count() ? start + g.chunk : g.count()) {}
};

// partials[pair, k] = (mean, M2) of chunk k.
template <typename scalar_t, typename acc_t>
__global__ void welford_partials_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ partials, SwitchTable table,
                                        Geometry g) {
  const Work w(g);
  Moments<acc_t> m{0, 0, 0};
  if (w.c < table.covered[w.s]) {
    for (int64_t i = w.start + threadIdx.x; i < w.stop; i += blockDim.x) {
      const acc_t v = static_cast<acc_t>(x[g.offset(w.s, w.c, i)]);
      m.count += acc_t(1);
      const acc_t delta = v - m.mean;
      m.mean += delta / m.count;
      m.m2 += delta * (v - m.mean);
    }
  }
  m = block_merge(m);
  if (threadIdx.x == 0) {
    partials[(w.pair * g.chunks + w.k) * 2] = m.mean;
    partials[(w.pair * g.chunks + w.k) * 2 + 1] = m.m2;
  }
}

// y = act(x * scale + shift), statistics merged from the partials (training) or running ones.
template <typename scalar_t, typename acc_t, Act A>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                 const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                 const acc_t* __restrict__ running_mean, const acc_t* __restrict__ running_var,
                                 const acc_t* __restrict__ partials, acc_t* __restrict__ mean_out,
                                 acc_t* __restrict__ var_out, SwitchTable table, Geometry g, bool training, acc_t eps) {
  const Work w(g);
  const bool covered = w.c < table.covered[w.s];
  const int64_t p = table.rows[w.s] * g.C + w.c;
  __shared__ acc_t scale_shift[2];
  if (threadIdx.x == 0) {
    acc_t mean = 0, var = 0;
    if (covered && training) {
      Moments<acc_t> m{0, 0, 0};
      for (int64_t k = 0; k < g.chunks; ++k) {
        const int64_t left = g.count() - k * g.chunk;
        const acc_t n = static_cast<acc_t>(left < g.chunk ? left : g.chunk);
        m.merge({n, partials[(w.pair * g.chunks + k) * 2], partials[(w.pair * g.chunks + k) * 2 + 1]});
      }
      mean = m.mean;
      var = m.m2 / m.count;
    } else if (covered) {
      mean = running_mean[p];
      var = running_var[p];
    }
    if (w.k == 0) {
      mean_out[w.pair] = mean;
      var_out[w.pair] = var;
    }
    const acc_t scale = covered ? weight[p] / sqrt(var + eps) : acc_t(0);
    scale_shift[0] = scale;
    scale_shift[1] = covered ? bias[p] - mean * scale : acc_t(0);  // uncovered: act(0) = 0
  }
  __syncthreads();
  const acc_t scale = scale_shift[0], shift = scale_shift[1];
  for (int64_t i = w.start + threadIdx.x; i < w.stop; i += blockDim.x) {
    const int64_t o = g.offset(w.s, w.c, i);
    const acc_t v = covered ? static_cast<acc_t>(x[o]) : acc_t(0);
    y[o] = static_cast<scalar_t>(activate<A>(v * scale + shift));
  }
}

// partials[pair, k] = (sum g, sum g * xhat) over chunk k, g masked by the activation.
template <typename scalar_t, typename acc_t, Act A>
__global__ void grad_partials_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                                     const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                     acc_t* __restrict__ partials, SwitchTable table, Geometry g, acc_t eps) {
  const Work w(g);
  const int64_t p = table.rows[w.s] * g.C + w.c;
  const acc_t mu = mean[w.pair], invstd = acc_t(1) / sqrt(var[w.pair] + eps);
  const acc_t wp = weight[p], bp = bias[p];
  acc_t sum_g = 0, sum_g_xhat = 0;
  if (w.c < table.covered[w.s]) {
    for (int64_t i = w.start + threadIdx.x; i < w.stop; i += blockDim.x) {
      const int64_t o = g.offset(w.s, w.c, i);
      const acc_t xhat = (static_cast<acc_t>(x[o]) - mu) * invstd;
      const acc_t gi = mask_grad<A>(static_cast<acc_t>(grad_y[o]), xhat * wp + bp);
      sum_g += gi;
      sum_g_xhat += gi * xhat;
    }
  }
  block_sum2(sum_g, sum_g_xhat);
  if (threadIdx.x == 0) {
    partials[(w.pair * g.chunks + w.k) * 2] = sum_g;
    partials[(w.pair * g.chunks + w.k) * 2 + 1] = sum_g_xhat;
  }
}

// grad_x = scale * (g - sum_g / M - xhat * sum_g_xhat / M) in training, scale * g in eval; the
// chunk-0 block of each pair writes grad_weight and grad_bias.
template <typename scalar_t, typename acc_t, Act A>
__global__ void grad_input_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ grad_x, const acc_t* __restrict__ weight,
                                  const acc_t* __restrict__ bias, const acc_t* __restrict__ mean,
                                  const acc_t* __restrict__ var, const acc_t* __restrict__ partials,
                                  acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias, SwitchTable table,
                                  Geometry g, bool training, acc_t eps) {
  const Work w(g);
  const bool covered = w.c < table.covered[w.s];
  const int64_t p = table.rows[w.s] * g.C + w.c;
  const acc_t mu = mean[w.pair], invstd = acc_t(1) / sqrt(var[w.pair] + eps);
  const acc_t wp = weight[p], bp = bias[p];
  __shared__ acc_t sums[2];
  if (threadIdx.x == 0) {
    acc_t sum_g = 0, sum_g_xhat = 0;
    for (int64_t k = 0; k < g.chunks; ++k) {
      sum_g += partials[(w.pair * g.chunks + k) * 2];
      sum_g_xhat += partials[(w.pair * g.chunks + k) * 2 + 1];
    }
    if (w.k == 0 && covered) {
      grad_weight[p] = sum_g_xhat;
      grad_bias[p] = sum_g;
    }
    sums[0] = sum_g;
    sums[1] = sum_g_xhat;
  }
  __syncthreads();
  const acc_t scale = covered ? wp * invstd : acc_t(0);
  const acc_t M = static_cast<acc_t>(g.count());
  const acc_t proj = training ? scale * sums[1] / M : acc_t(0);
  const acc_t offset = training ? scale * sums[0] / M : acc_t(0);
  for (int64_t i = w.start + threadIdx.x; i < w.stop; i += blockDim.x) {
    const int64_t o = g.offset(w.s, w.c, i);
    acc_t out = 0;
    if (covered) {
      const acc_t xhat = (static_cast<acc_t>(x[o]) - mu) * invstd;
      const acc_t gi = mask_grad<A>(static_cast<acc_t>(grad_y[o]), xhat * wp + bp);
      out = gi * scale - xhat * proj - offset;
    }
    grad_x[o] = static_cast<scalar_t>(out);
  }
}

// Validates the call (as the CPU kernel does); returns the switch tables and the geometry.
std::pair<SwitchTable, Geometry> plan(const Tensor& x, const Tensor& weight, IntArrayRef covered, IntArrayRef rows) {
  const int64_t S = check_switches(x, weight, covered, rows, c10::DeviceType::CUDA), C = x.size(1);
  TORCH_CHECK(S <= kMaxSwitches, "switch_batch_norm: the CUDA kernels take 1 to ", kMaxSwitches, " switches, got ", S);
  SwitchTable table{};
  for (int64_t s = 0; s < S; ++s) {
    table.covered[s] = covered[s];
    table.rows[s] = rows[s];
  }
  int64_t HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) HW *= x.size(d);
  Geometry g{S, x.size(0) / S, C, HW, 0, 0};
  const int64_t pairs = std::max<int64_t>(1, S * C), count = std::max<int64_t>(1, g.count());
  const int64_t chunks =
      std::clamp<int64_t>(kTargetBlocks / pairs, 1, (count + kMinValuesPerBlock - 1) / kMinValuesPerBlock);
  g.chunk = (count + chunks - 1) / chunks;
  g.chunks = (count + g.chunk - 1) / g.chunk;
  return {table, g};
}

std::tuple<Tensor, Tensor, Tensor> switch_batch_norm_forward_cuda(const Tensor& x, const Tensor& weight,
                                                                  const Tensor& bias, const Tensor& running_mean,
                                                                  const Tensor& running_var, IntArrayRef covered,
                                                                  IntArrayRef rows, bool training, double eps,
                                                                  c10::string_view activation,
                                                                  const std::optional<Tensor>& residual) {
  // A residual is added after the normalisation, in a pass of its own (the CPU kernel fuses it).
  if (residual.has_value() && residual->defined()) {
    auto [y, mean, var] = switch_batch_norm_forward_cuda(x, weight, bias, running_mean, running_var, covered, rows,
                                                         training, eps, "none", std::nullopt);
    return {activate_(y.add_(*residual), parse_activation(activation)), mean, var};
  }
  const Act act = parse_activation(activation);
  SwitchTable table;
  Geometry g;
  std::tie(table, g) = plan(x, weight, covered, rows);
  check_table(weight, "weight", x, weight.size(0));
  check_table(bias, "bias", x, weight.size(0));
  check_table(running_mean, "running_mean", x, weight.size(0));
  check_table(running_var, "running_var", x, weight.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto to_acc = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  const Tensor xc = x.contiguous();
  Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  Tensor mean = at::empty({g.S, g.C}, xc.options().dtype(acc));
  Tensor var = at::empty({g.S, g.C}, xc.options().dtype(acc));
  if (xc.numel() == 0 || g.C == 0) return {y, mean.zero_(), var.zero_()};
  Tensor partials = at::empty({g.S * g.C, g.chunks, 2}, xc.options().dtype(acc));
  const Tensor w = to_acc(weight), b = to_acc(bias), rm = to_acc(running_mean), rv = to_acc(running_var);
  const dim3 grid(static_cast<unsigned>(g.S * g.C), static_cast<unsigned>(g.chunks));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_batch_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) {
      welford_partials_kernel<scalar_t, acc_t>
          <<<grid, kThreads, 0, stream>>>(xc.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(), table, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dispatch_act(act, [&](auto a) {
      normalize_kernel<scalar_t, acc_t, decltype(a)::value><<<grid, kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
          b.const_data_ptr<acc_t>(), rm.const_data_ptr<acc_t>(), rv.const_data_ptr<acc_t>(),
          partials.const_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), table, g,
          training, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y.contiguous(kernel_format(x)), mean, var};
}

std::tuple<Tensor, Tensor, Tensor> switch_batch_norm_backward_cuda(const Tensor& grad_y, const Tensor& x,
                                                                   const Tensor& weight, const Tensor& bias,
                                                                   const Tensor& mean, const Tensor& var,
                                                                   IntArrayRef covered, IntArrayRef rows, bool training,
                                                                   double eps, c10::string_view activation) {
  const Act act = parse_activation(activation);
  SwitchTable table;
  Geometry g;
  std::tie(table, g) = plan(x, weight, covered, rows);
  check_table(weight, "weight", x, weight.size(0));
  check_table(bias, "bias", x, weight.size(0));
  check_table(mean, "mean", x, g.S);
  check_table(var, "var", x, g.S);
  check_like_x(grad_y, "grad_y", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), "switch_batch_norm: grad_y (",
              grad_y.sizes(), ", ", grad_y.scalar_type(), ") must match x (", x.sizes(), ", ", x.scalar_type(), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto to_acc = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  const Tensor xc = x.contiguous(), gyc = grad_y.contiguous();
  Tensor grad_x = at::empty_like(xc, at::MemoryFormat::Contiguous);
  Tensor grad_weight = at::zeros(weight.sizes(), xc.options().dtype(acc));
  Tensor grad_bias = at::zeros(weight.sizes(), xc.options().dtype(acc));
  if (xc.numel() > 0 && g.C > 0) {
    Tensor partials = at::empty({g.S * g.C, g.chunks, 2}, xc.options().dtype(acc));
    const Tensor w = to_acc(weight), b = to_acc(bias), m = to_acc(mean), v = to_acc(var);
    const dim3 grid(static_cast<unsigned>(g.S * g.C), static_cast<unsigned>(g.chunks));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_batch_norm_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_act(act, [&](auto a) {
        constexpr Act A = decltype(a)::value;
        grad_partials_kernel<scalar_t, acc_t, A><<<grid, kThreads, 0, stream>>>(
            gyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
            b.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
            partials.mutable_data_ptr<acc_t>(), table, g, static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_input_kernel<scalar_t, acc_t, A><<<grid, kThreads, 0, stream>>>(
            gyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
            w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
            partials.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(),
            grad_bias.mutable_data_ptr<acc_t>(), table, g, training, static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {grad_x.contiguous(kernel_format(x)), grad_weight.to(weight.scalar_type()),
          grad_bias.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(paradis, CUDA, m) {
  m.impl("switch_batch_norm", TORCH_FN(switch_batch_norm_forward_cuda));
  m.impl("switch_batch_norm_backward", TORCH_FN(switch_batch_norm_backward_cuda));
}

}  // namespace paradis
