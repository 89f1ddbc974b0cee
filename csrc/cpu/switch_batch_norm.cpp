#include "cpu/switch_batch_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "activation.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;

// The inner loops are plain loops over contiguous spans of the accumulation type, written so the
// compiler vectorizes them for the ISA it targets: an extension is built without ATen's per-ISA
// flags, where at::vec::Vectorized is a slow generic fallback.

// Values staged per step: a few piece buffers of the accumulation type stay in L1.
constexpr int64_t kPiece = 1024;
// Values of work per parallel task, as ATen's GRAIN_SIZE.
constexpr int64_t kGrainWork = 32768;
// Independent partial sums per reduction: without -ffast-math the compiler cannot reorder one
// running sum, but it vectorizes independent lanes.
constexpr int kLanes = 16;

template <Act A, typename T>
T activate(T z) {
  if constexpr (A == Act::Relu)
    return std::max(z, T(0));
  else if constexpr (A == Act::Relu6)
    return std::min(std::max(z, T(0)), T(6));
  else
    return z;
}

// g * act'(z): the gradient passes where the activation is the identity (strictly inside).
template <Act A, typename T>
T mask_grad(T g, T z) {
  if constexpr (A == Act::Relu)
    return z > T(0) ? g : T(0);
  else if constexpr (A == Act::Relu6)
    return ((z > T(0)) & (z < T(6))) ? g : T(0);
  else
    return g;
}

// Sum of f(i) over i in [0, n), accumulated in kLanes independent partial sums.
template <typename T, typename F>
T lane_sum(int64_t n, const F& f) {
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += f(i + j);
  }
  for (; i < n; ++i) lanes[0] += f(i);
  T total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// src[0, n) in the accumulation type: src itself when the types match, else converted into buf.
template <typename acc_t, typename scalar_t>
const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// Where to compute dst[0, n) in the accumulation type; commit() then moves it to dst.
template <typename acc_t, typename scalar_t>
acc_t* acc_target(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>)
    return dst;
  else
    return buf;
}

template <typename acc_t, typename scalar_t>
void commit(const acc_t* buf, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) at::vec::convert(buf, dst, n);
}

// x = [S*B, C, HW] contiguous: switch s, sample b, channel c is the HW-long row at row(s, b, c).
struct Geometry {
  int64_t S, B, C, HW;
  int64_t row(int64_t s, int64_t b, int64_t c) const { return ((s * B + b) * C + c) * HW; }
};

// Calls f(offset, n) on the pieces (at most kPiece values) of the B rows owned by (s, c).
template <typename F>
void for_each_piece(const Geometry& g, int64_t s, int64_t c, const F& f) {
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t row = g.row(s, b, c);
    for (int64_t i = 0; i < g.HW; i += kPiece) f(row + i, std::min(kPiece, g.HW - i));
  }
}

// Runs f(s, c) for every covered (switch, channel) pair. The covered pairs form one flat range so
// parallel_for balances switches of unequal width; work_per_pair sets the grain.
template <typename F>
void parallel_for_covered(IntArrayRef covered, int64_t work_per_pair, const F& f) {
  std::vector<int64_t> start(covered.size() + 1, 0);
  for (size_t s = 0; s < covered.size(); ++s) start[s + 1] = start[s] + covered[s];
  const int64_t grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_pair));
  at::parallel_for(0, start.back(), grain, [&](int64_t begin, int64_t end) {
    int64_t s = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t p = begin; p < end; ++p) {
      while (p >= start[s + 1]) ++s;
      f(s, p - start[s]);
    }
  });
}

// Folds the mean and M2 of a[0, n) into running (count, mean, m2) with Chan's formula. The piece
// itself takes two sweeps, but it is L1-resident, so x is read from memory once.
template <typename T>
void merge_moments(const T* a, int64_t n, int64_t& count, T& mean, T& m2) {
  const T piece_mean = lane_sum<T>(n, [&](int64_t i) { return a[i]; }) / T(n);
  const T piece_m2 = lane_sum<T>(n, [&](int64_t i) {
    const T d = a[i] - piece_mean;
    return d * d;
  });
  const int64_t total = count + n;
  const T delta = piece_mean - mean;
  mean += delta * (T(n) / T(total));
  m2 += piece_m2 + delta * delta * (T(count) * T(n) / T(total));
  count = total;
}

Geometry check_geometry(const Tensor& x, const Tensor& weight, IntArrayRef covered,
                        IntArrayRef rows) {
  TORCH_CHECK(x.dim() >= 2, "switch_batch_norm: x must be [N, C, *], got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), "switch_batch_norm: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.is_floating_point(), "switch_batch_norm: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "switch_batch_norm: weight must be [S_total, C], got ",
              weight.sizes());
  const int64_t S = static_cast<int64_t>(covered.size());
  const int64_t C = x.size(1);
  const int64_t s_total = weight.size(0);
  TORCH_CHECK(S > 0, "switch_batch_norm: covered must list at least one switch");
  TORCH_CHECK(x.size(0) % S == 0, "switch_batch_norm: batch ", x.size(0),
              " is not divisible by the number of switches ", S);
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == S, "switch_batch_norm: rows has ", rows.size(),
              " entries but covered has ", S);
  std::vector<bool> used(s_total, false);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(covered[s] >= 0 && covered[s] <= C, "switch_batch_norm: covered[", s,
                "] = ", covered[s], " is outside [0, ", C, "]");
    TORCH_CHECK(rows[s] >= 0 && rows[s] < s_total, "switch_batch_norm: rows[", s, "] = ", rows[s],
                " is outside [0, ", s_total, ")");
    // Distinct rows keep the per-row gradient writes race-free.
    TORCH_CHECK(!used[rows[s]], "switch_batch_norm: rows must be distinct, ", rows[s], " repeats");
    used[rows[s]] = true;
  }
  int64_t HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) HW *= x.size(d);
  return {S, x.size(0) / S, C, HW};
}

void check_table(const Tensor& t, const char* name, IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "switch_batch_norm: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.is_floating_point(), "switch_batch_norm: ", name, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "switch_batch_norm: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// Zeroes the channels [covered[s], C) of every switch's samples.
void zero_uncovered(const Tensor& out, const Geometry& g, IntArrayRef covered) {
  for (int64_t s = 0; s < g.S; ++s) {
    if (covered[s] < g.C) out.slice(0, s * g.B, (s + 1) * g.B).slice(1, covered[s]).zero_();
  }
}

template <typename scalar_t, Act A>
void forward_kernel(const Tensor& x, const Tensor& y, const Tensor& mean, const Tensor& var,
                    const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                    const Tensor& running_var, const Geometry& g, IntArrayRef covered,
                    IntArrayRef rows, bool training, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
  acc_t* var_p = var.mutable_data_ptr<acc_t>();
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  const acc_t* b_p = bias.const_data_ptr<acc_t>();
  const acc_t* rm_p = running_mean.const_data_ptr<acc_t>();
  const acc_t* rv_p = running_var.const_data_ptr<acc_t>();

  parallel_for_covered(covered, g.B * g.HW, [&](int64_t s, int64_t c) {
    acc_t buf[kPiece];
    const int64_t p = rows[s] * g.C + c;
    acc_t mu = rm_p[p];
    acc_t sigma2 = rv_p[p];
    if (training) {
      int64_t count = 0;
      acc_t m2 = 0;
      mu = 0;
      for_each_piece(g, s, c, [&](int64_t off, int64_t n) {
        merge_moments(as_acc(xp + off, n, buf), n, count, mu, m2);
      });
      sigma2 = count > 0 ? m2 / acc_t(count) : acc_t(0);
    }
    mean_p[s * g.C + c] = mu;
    var_p[s * g.C + c] = sigma2;

    // y = act(x * scale + shift), the affine normalisation folded into one multiply-add.
    const acc_t scale = w_p[p] / std::sqrt(sigma2 + acc_t(eps));
    const acc_t shift = b_p[p] - mu * scale;
    for_each_piece(g, s, c, [&](int64_t off, int64_t n) {
      const acc_t* in = as_acc(xp + off, n, buf);
      acc_t* out = acc_target(yp + off, buf);
      for (int64_t i = 0; i < n; ++i) out[i] = activate<A>(in[i] * scale + shift);
      commit(out, yp + off, n);
    });
  });
}

template <typename scalar_t, Act A>
void backward_kernel(const Tensor& grad_y, const Tensor& x, const Tensor& grad_x,
                     const Tensor& grad_weight, const Tensor& grad_bias, const Tensor& weight,
                     const Tensor& bias, const Tensor& mean, const Tensor& var, const Geometry& g,
                     IntArrayRef covered, IntArrayRef rows, bool training, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gyp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
  acc_t* gw_p = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gb_p = grad_bias.mutable_data_ptr<acc_t>();
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  const acc_t* b_p = bias.const_data_ptr<acc_t>();
  const acc_t* mean_p = mean.const_data_ptr<acc_t>();
  const acc_t* var_p = var.const_data_ptr<acc_t>();
  const acc_t M = acc_t(g.B * g.HW);

  parallel_for_covered(covered, 2 * g.B * g.HW, [&](int64_t s, int64_t c) {
    acc_t xbuf[kPiece];
    acc_t gbuf[kPiece];
    acc_t gm[kPiece];
    const int64_t p = rows[s] * g.C + c;
    const acc_t mu = mean_p[s * g.C + c];
    const acc_t invstd = acc_t(1) / std::sqrt(var_p[s * g.C + c] + acc_t(eps));
    const acc_t scale = w_p[p] * invstd;
    const acc_t shift = b_p[p] - mu * scale;

    // Pass 1: sum g and sum g * xhat, with g the gradient masked by the activation (z as in the
    // forward). The piece is L1-resident, so its several sweeps read memory once.
    acc_t sum_g = 0;
    acc_t sum_gxhat = 0;
    for_each_piece(g, s, c, [&](int64_t off, int64_t n) {
      const acc_t* xa = as_acc(xp + off, n, xbuf);
      const acc_t* ga = as_acc(gyp + off, n, gbuf);
      for (int64_t i = 0; i < n; ++i) gm[i] = mask_grad<A>(ga[i], xa[i] * scale + shift);
      sum_g += lane_sum<acc_t>(n, [&](int64_t i) { return gm[i]; });
      sum_gxhat += lane_sum<acc_t>(n, [&](int64_t i) { return gm[i] * ((xa[i] - mu) * invstd); });
    });
    gw_p[p] = sum_gxhat;
    gb_p[p] = sum_g;

    // Pass 2: grad_x = scale * (g - sum_g / M - xhat * sum_gxhat / M) in training (batch
    // statistics depend on x), scale * g in eval.
    const acc_t proj = training ? scale * sum_gxhat / M : acc_t(0);
    const acc_t offset = training ? scale * sum_g / M : acc_t(0);
    for_each_piece(g, s, c, [&](int64_t off, int64_t n) {
      const acc_t* xa = as_acc(xp + off, n, xbuf);
      const acc_t* ga = as_acc(gyp + off, n, gbuf);
      acc_t* out = acc_target(gxp + off, gbuf);
      for (int64_t i = 0; i < n; ++i) {
        const acc_t gi = mask_grad<A>(ga[i], xa[i] * scale + shift);
        out[i] = gi * scale - (xa[i] - mu) * invstd * proj - offset;
      }
      commit(out, gxp + off, n);
    });
  });
}

} // namespace

std::tuple<Tensor, Tensor, Tensor> switch_batch_norm_forward_cpu(
    const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
    const Tensor& running_var, IntArrayRef covered, IntArrayRef rows, bool training, double eps,
    c10::string_view activation) {
  const Act act = parse_activation(activation);
  const Geometry g = check_geometry(x, weight, covered, rows);
  const std::vector<int64_t> table_shape{weight.size(0), g.C};
  check_table(weight, "weight", table_shape);
  check_table(bias, "bias", table_shape);
  check_table(running_mean, "running_mean", table_shape);
  check_table(running_var, "running_var", table_shape);

  // Parameter tables are tiny: convert them to the accumulation type once.
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto to_acc = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  const Tensor xc = x.contiguous();
  Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  Tensor mean = at::zeros({g.S, g.C}, xc.options().dtype(acc));
  Tensor var = at::zeros({g.S, g.C}, xc.options().dtype(acc));
  const Tensor w = to_acc(weight), b = to_acc(bias), rm = to_acc(running_mean),
               rv = to_acc(running_var);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_batch_norm_forward_cpu", [&] {
        dispatch_act(act, [&](auto a) {
          forward_kernel<scalar_t, decltype(a)::value>(xc, y, mean, var, w, b, rm, rv, g, covered,
                                                       rows, training, eps);
        });
      });
  zero_uncovered(y, g, covered);
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> switch_batch_norm_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& bias,
    const Tensor& mean, const Tensor& var, IntArrayRef covered, IntArrayRef rows, bool training,
    double eps, c10::string_view activation) {
  const Act act = parse_activation(activation);
  const Geometry g = check_geometry(x, weight, covered, rows);
  TORCH_CHECK(grad_y.device().is_cpu(), "switch_batch_norm: grad_y must be a CPU tensor, got ",
              grad_y.device());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "switch_batch_norm: grad_y has shape ", grad_y.sizes(),
              " but x has ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "switch_batch_norm: grad_y has dtype ",
              grad_y.scalar_type(), " but x has ", x.scalar_type());
  const std::vector<int64_t> table_shape{weight.size(0), g.C};
  const std::vector<int64_t> stats_shape{g.S, g.C};
  check_table(weight, "weight", table_shape);
  check_table(bias, "bias", table_shape);
  check_table(mean, "mean", stats_shape);
  check_table(var, "var", stats_shape);

  const auto acc = at::toOpMathType(x.scalar_type());
  const auto to_acc = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  const Tensor xc = x.contiguous();
  const Tensor gyc = grad_y.contiguous();
  Tensor grad_x = at::empty_like(xc, at::MemoryFormat::Contiguous);
  Tensor grad_weight = at::zeros(table_shape, xc.options().dtype(acc));
  Tensor grad_bias = at::zeros(table_shape, xc.options().dtype(acc));
  const Tensor w = to_acc(weight), b = to_acc(bias), m = to_acc(mean), v = to_acc(var);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_batch_norm_backward_cpu", [&] {
        dispatch_act(act, [&](auto a) {
          backward_kernel<scalar_t, decltype(a)::value>(gyc, xc, grad_x, grad_weight, grad_bias, w,
                                                        b, m, v, g, covered, rows, training, eps);
        });
      });
  zero_uncovered(grad_x, g, covered);
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

TORCH_LIBRARY_IMPL(paradis_C, CPU, m) {
  m.impl("switch_batch_norm_forward", TORCH_FN(switch_batch_norm_forward_cpu));
  m.impl("switch_batch_norm_backward", TORCH_FN(switch_batch_norm_backward_cpu));
}

} // namespace paradis
