#include "cpu/switch_batch_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "activation.h"
#include "cpu/isa.h"
#include "cpu/parallel_grain.h"
#include "switch_batch_norm_checks.h"
#include "layout.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;

// The inner loops are plain loops over contiguous spans of the accumulation type, written so the
// compiler vectorizes them for the ISA it targets: an extension is built without ATen's per-ISA
// flags, where at::vec::Vectorized is a slow generic fallback.
//
// Two layouts of x = [S*B, C, H, W]:
// - NCHW: each (switch, channel) pair owns B rows of HW contiguous values; parallel over pairs, or
//   for rows shorter than kImageOrderBelow (small images) in memory order, parallel over chunks
//   of images whose partial results merge in a fixed order.
// - NHWC (channels_last): switch s is a [B*HW, C] matrix with contiguous channels; the loops run
//   across channels, parallel over chunks of rows whose partial results merge in a fixed order.

// Sizes tuned on the Sapphire Rapids host of bench/README.md (2 cores, 48 KiB L1d per core,
// AVX-512) on the BatchNorm layers of bench/suites.py.
// Values staged per step: a few piece buffers of the accumulation type stay in L1.
constexpr int64_t kPiece = 1024;
// Independent partial sums per reduction: without -ffast-math the compiler cannot reorder one
// running sum, but it vectorizes independent lanes.
constexpr int kLanes = 16;
// Fewest rows in an NHWC chunk, so that wide layers still amortise a chunk's partial results.
constexpr int64_t kMinChunkRows = 16;
// NCHW rows (one channel of one image) shorter than this run on the image-order kernels.
constexpr int64_t kImageOrderBelow = kPiece / 4;

struct Geometry {
  int64_t S, B, C, HW;
  // NCHW: switch s, sample b, channel c is the HW-long row at row(s, b, c).
  int64_t row(int64_t s, int64_t b, int64_t c) const { return ((s * B + b) * C + c) * HW; }
  // NHWC: switch s is the [B*HW, C] matrix at switch_offset(s), its rows with stride C.
  int64_t rows() const { return B * HW; }
  int64_t switch_offset(int64_t s) const { return s * B * HW * C; }
};

// The rows of every switch cut into chunks, switch-major: NHWC pixel rows (covered[s] values each),
// or NCHW images for the image-order kernels (covered[s] rows of HW values each). Chunk sizes
// depend only on the shape and the switch's covered channels, and partial results merge in chunk
// order, so results do not depend on the thread count.
struct RowChunks {
  std::vector<int64_t> switch_of, begin, end;  // per chunk: its switch and rows [begin, end)
  std::vector<int64_t> first;                  // switch s has chunks [first[s], first[s + 1])
  int64_t work = 0;                            // values in all chunks
  int64_t count() const { return first.back(); }
};

RowChunks row_chunks(const Geometry& g, IntArrayRef covered, bool images = false) {
  RowChunks ch;
  ch.first.push_back(0);
  const int64_t rows = images ? g.B : g.rows(), fewest = images ? 1 : kMinChunkRows;
  for (int64_t s = 0; s < g.S; ++s) {
    const int64_t width = covered[s] * (images ? g.HW : 1);  // values per row
    const int64_t size = std::max(fewest, kGrainWork / std::max<int64_t>(1, width));
    for (int64_t r = 0; r < rows && covered[s] > 0; r += size) {
      ch.switch_of.push_back(s);
      ch.begin.push_back(r);
      ch.end.push_back(std::min(rows, r + size));
      ch.work += (ch.end.back() - r) * width;
    }
    ch.first.push_back(static_cast<int64_t>(ch.begin.size()));
  }
  return ch;
}

Geometry check_geometry(const Tensor& x, const Tensor& weight, IntArrayRef covered, IntArrayRef rows) {
  const int64_t S = check_switches(x, weight, covered, rows, c10::DeviceType::CPU);
  int64_t HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) HW *= x.size(d);
  return {S, x.size(0) / S, x.size(1), HW};
}

// Whether the kernels take x as NHWC: channels_last, or one value per sample and channel ([N, C] or
// [N, C, 1, 1]), where the NCHW and NHWC layouts are the same memory and the NHWC loops are the fast
// ones (the NCHW path's parallel tasks would own one value per sample each).
bool channels_innermost(at::MemoryFormat format, const Geometry& g) {
  return format == at::MemoryFormat::ChannelsLast || g.HW == 1;
}

// Zeroes the channels [covered[s], C) of every switch's samples that the kernels leave: the NHWC
// kernels zero them row by row in their output pass (a strided fill of a few channels per row
// cost as much as that pass), except for a switch covering no channel, which has no rows to pass.
void zero_uncovered(const Tensor& out, const Geometry& g, IntArrayRef covered, bool nhwc) {
  for (int64_t s = 0; s < g.S; ++s) {
    if (covered[s] < g.C && (!nhwc || covered[s] == 0))
      out.slice(0, s * g.B, (s + 1) * g.B).slice(1, covered[s]).zero_();
  }
}

// With a residual, the channels [covered[s], C) of every switch's samples are activation(residual):
// the normalised x is zero there.
void activate_uncovered(const Tensor& out, const Tensor& residual, const Geometry& g, IntArrayRef covered, Act act) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // out= into views of the op's output
  for (int64_t s = 0; s < g.S; ++s) {
    if (covered[s] == g.C) continue;
    const Tensor r = residual.slice(0, s * g.B, (s + 1) * g.B).slice(1, covered[s]);
    Tensor o = out.slice(0, s * g.B, (s + 1) * g.B).slice(1, covered[s]);
    if (act == Act::Relu)
      at::clamp_min_out(o, r, 0);
    else if (act == Act::Relu6)
      at::clamp_out(o, r, 0, 6);
    else
      o.copy_(r);
  }
}

// Everything a forward kernel reads and writes: x, y and the residual (or nullptr) in their layout,
// the [S_total, C] parameter tables and the [S, C] statistics it returns, all in the accumulation
// type.
template <typename scalar_t>
struct ForwardData {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* residual;
  scalar_t* y;
  acc_t* mean;
  acc_t* var;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* running_mean;
  const acc_t* running_var;
};

// Same for the backward: grad_y and x in, grad_x out; grad_weight / grad_bias start zero.
template <typename scalar_t>
struct BackwardData {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_y;
  const scalar_t* x;
  scalar_t* grad_x;
  acc_t* grad_weight;
  acc_t* grad_bias;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* mean;
  const acc_t* var;
};

// Multiversioning: the extension is built for baseline x86-64 (SSE2), so the kernels are compiled
// a second time for AVX2 + FMA and chosen at run time where the CPU has them.

namespace baseline {
#include "cpu/switch_batch_norm_kernels.inc"
}  // namespace baseline

#if PARADIS_X86_TARGETS
// Everything defined from here to pop_options is compiled for AVX2 + FMA; templates of the
// headers above keep their baseline code, so nothing outside namespace avx2 needs the ISA.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/switch_batch_norm_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// Calls f(kernels) with the Kernels of the best instruction set this CPU runs; the environment
// variable PARADIS_CPU_ISA=baseline forces the baseline ones (to test or measure them).
template <typename F>
void with_kernels(const F& f) {
#if PARADIS_X86_TARGETS
  if (avx2_fma_enabled()) return f(avx2::Kernels());
#endif
  f(baseline::Kernels());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> switch_batch_norm_forward_cpu(const Tensor& x, const Tensor& weight,
                                                                 const Tensor& bias, const Tensor& running_mean,
                                                                 const Tensor& running_var, IntArrayRef covered,
                                                                 IntArrayRef rows, bool training, double eps,
                                                                 c10::string_view activation,
                                                                 const std::optional<Tensor>& residual) {
  const Act act = parse_activation(activation);
  const Geometry g = check_geometry(x, weight, covered, rows);
  check_table(weight, "weight", x, weight.size(0));
  check_table(bias, "bias", x, weight.size(0));
  check_table(running_mean, "running_mean", x, weight.size(0));
  check_table(running_var, "running_var", x, weight.size(0));
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    TORCH_CHECK(residual->device() == x.device() && residual->sizes() == x.sizes() &&
                    residual->scalar_type() == x.scalar_type(),
                "switch_batch_norm: residual must be like x (", x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
                "), got ", residual->sizes(), ", ", residual->scalar_type(), ", ", residual->device());
  }

  // Parameter tables are tiny: convert them to the accumulation type once.
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto to_acc = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  const at::MemoryFormat format = kernel_format(x);
  const Tensor xc = x.contiguous(format);
  const Tensor rc = has_residual ? residual->contiguous(format) : Tensor();
  Tensor y = at::empty_like(xc, format);
  Tensor mean = at::zeros({g.S, g.C}, xc.options().dtype(acc));
  Tensor var = at::zeros({g.S, g.C}, xc.options().dtype(acc));
  const Tensor w = to_acc(weight), b = to_acc(bias), rm = to_acc(running_mean), rv = to_acc(running_var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_batch_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardData<scalar_t> d{
        xc.const_data_ptr<scalar_t>(),  has_residual ? rc.const_data_ptr<scalar_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>(),  w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(),      rm.const_data_ptr<acc_t>(),
        rv.const_data_ptr<acc_t>()};
    dispatch_act(act, [&](auto a) {
      with_kernels([&](auto k) {
        decltype(k)::template forward<scalar_t, decltype(a)::value>(d, g, covered, rows, training, eps,
                                                                    channels_innermost(format, g));
      });
    });
  });
  if (has_residual)
    activate_uncovered(y, rc, g, covered, act);
  else
    zero_uncovered(y, g, covered, channels_innermost(format, g));
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> switch_batch_norm_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                                  const Tensor& weight, const Tensor& bias,
                                                                  const Tensor& mean, const Tensor& var,
                                                                  IntArrayRef covered, IntArrayRef rows, bool training,
                                                                  double eps, c10::string_view activation) {
  const Act act = parse_activation(activation);
  const Geometry g = check_geometry(x, weight, covered, rows);
  TORCH_CHECK(grad_y.device().is_cpu(), "switch_batch_norm: grad_y must be a CPU tensor, got ", grad_y.device());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "switch_batch_norm: grad_y has shape ", grad_y.sizes(), " but x has ",
              x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "switch_batch_norm: grad_y has dtype ", grad_y.scalar_type(),
              " but x has ", x.scalar_type());
  const std::vector<int64_t> table_shape{weight.size(0), g.C};
  check_table(weight, "weight", x, weight.size(0));
  check_table(bias, "bias", x, weight.size(0));
  check_table(mean, "mean", x, g.S);
  check_table(var, "var", x, g.S);

  const auto acc = at::toOpMathType(x.scalar_type());
  const auto to_acc = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  // grad_x and grad_y follow x's layout.
  const at::MemoryFormat format = kernel_format(x);
  const Tensor xc = x.contiguous(format);
  const Tensor gyc = grad_y.contiguous(format);
  Tensor grad_x = at::empty_like(xc, format);
  Tensor grad_weight = at::zeros(table_shape, xc.options().dtype(acc));
  Tensor grad_bias = at::zeros(table_shape, xc.options().dtype(acc));
  const Tensor w = to_acc(weight), b = to_acc(bias), m = to_acc(mean), v = to_acc(var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardData<scalar_t> d{gyc.const_data_ptr<scalar_t>(),
                                   xc.const_data_ptr<scalar_t>(),
                                   grad_x.mutable_data_ptr<scalar_t>(),
                                   grad_weight.mutable_data_ptr<acc_t>(),
                                   grad_bias.mutable_data_ptr<acc_t>(),
                                   w.const_data_ptr<acc_t>(),
                                   b.const_data_ptr<acc_t>(),
                                   m.const_data_ptr<acc_t>(),
                                   v.const_data_ptr<acc_t>()};
    dispatch_act(act, [&](auto a) {
      with_kernels([&](auto k) {
        decltype(k)::template backward<scalar_t, decltype(a)::value>(d, g, covered, rows, training, eps,
                                                                     channels_innermost(format, g));
      });
    });
  });
  zero_uncovered(grad_x, g, covered, channels_innermost(format, g));
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

void update_running_stats_cpu(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                              const Tensor& var, IntArrayRef covered, IntArrayRef rows, int64_t count, double momentum,
                              const std::optional<Tensor>& momentum_per_switch) {
  const int64_t S = static_cast<int64_t>(covered.size());
  TORCH_CHECK(S > 0 && static_cast<int64_t>(rows.size()) == S, "update_running_stats_: covered and rows must list ",
              "the same switches, got ", covered.size(), " and ", rows.size());
  TORCH_CHECK(running_mean.dim() == 2 && running_var.scalar_type() == running_mean.scalar_type(),
              "update_running_stats_: running_mean and running_var must be [S_total, C] tables of one dtype, got ",
              running_mean.sizes(), " ", running_mean.scalar_type(), " and ", running_var.sizes(), " ",
              running_var.scalar_type());
  check_table(running_var, "running_var", running_mean, running_mean.size(0));
  check_table(mean, "mean", running_mean, S);
  check_table(var, "var", running_mean, S);
  TORCH_CHECK(running_mean.device().is_cpu(), "update_running_stats_: tensors must be on the CPU, got ",
              running_mean.device());
  TORCH_CHECK(count >= 1, "update_running_stats_: count must be positive, got ", count);
  std::vector<double> weights(S, momentum);
  if (momentum_per_switch.has_value() && momentum_per_switch->defined()) {
    TORCH_CHECK(momentum_per_switch->numel() == S, "update_running_stats_: momentum_per_switch must hold ", S,
                " values (one per switch), got ", momentum_per_switch->numel());
    const Tensor w = momentum_per_switch->to(at::kCPU, at::kDouble).contiguous();
    std::copy_n(w.const_data_ptr<double>(), S, weights.begin());
  }
  const int64_t C = running_mean.size(1);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(covered[s] >= 0 && covered[s] <= C && rows[s] >= 0 && rows[s] < running_mean.size(0),
                "update_running_stats_: switch ", s, " covers ", covered[s], " channels of row ", rows[s],
                ", outside the [", running_mean.size(0), ", ", C, "] tables");
  }
  const double bessel = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  const Tensor m = mean.to(running_mean.scalar_type()).contiguous();
  const Tensor v = var.to(running_mean.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "update_running_stats_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* const rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* const rv = running_var.mutable_data_ptr<scalar_t>();
    const int64_t rm_row = running_mean.stride(0), rm_col = running_mean.stride(1);
    const int64_t rv_row = running_var.stride(0), rv_col = running_var.stride(1);
    for (int64_t s = 0; s < S; ++s) {
      const acc_t w = static_cast<acc_t>(weights[s]);
      const scalar_t* const batch_mean = m.const_data_ptr<scalar_t>() + s * C;
      const scalar_t* const batch_var = v.const_data_ptr<scalar_t>() + s * C;
      for (int64_t c = 0; c < covered[s]; ++c) {
        scalar_t& mean_entry = rm[rows[s] * rm_row + c * rm_col];
        scalar_t& var_entry = rv[rows[s] * rv_row + c * rv_col];
        const acc_t old_mean = mean_entry, old_var = var_entry;
        mean_entry = old_mean + w * (static_cast<acc_t>(batch_mean[c]) - old_mean);
        var_entry = old_var + w * (static_cast<acc_t>(batch_var[c]) * static_cast<acc_t>(bessel) - old_var);
      }
    }
  });
}

TORCH_LIBRARY_IMPL(paradis, CPU, m) {
  m.impl("update_running_stats_", TORCH_FN(update_running_stats_cpu));
  m.impl("switch_batch_norm", TORCH_FN(switch_batch_norm_forward_cpu));
  m.impl("switch_batch_norm_backward", TORCH_FN(switch_batch_norm_backward_cpu));
}

}  // namespace paradis
