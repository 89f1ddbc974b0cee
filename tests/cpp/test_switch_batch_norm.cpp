// Checks the CPU switch BatchNorm kernels against a naive per-switch, per-channel ATen reference in
// double (gradients by autograd), directly and through the dispatcher, plus input validation.
#include "cpu/switch_batch_norm.h"
#include "expect.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <functional>
#include <sstream>
#include <string>
#include <vector>

using at::Tensor;
using Result = std::tuple<Tensor, Tensor, Tensor>;

namespace {

void expect_throws(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
  } catch (const c10::Error& e) {
    const bool found = std::string(e.what()).find(needle) != std::string::npos;
    expect(found, what + ": message lacks '" + needle + "': " + e.what_without_backtrace());
    return;
  }
  expect(false, what + ": did not throw");
}

struct Case {
  std::string name;
  std::vector<int64_t> shape;  // [S*B, C, *]
  std::vector<int64_t> covered;
  std::vector<int64_t> rows;
  int64_t s_total;
};

struct Reference {
  Tensor y, mean, var, grad_x, grad_weight, grad_bias;
};

Tensor activate(const Tensor& z, const std::string& act) {
  if (act == "relu") return at::relu(z);
  if (act == "relu6") return at::hardtanh(z, 0, 6);
  return z;
}

Tensor grad_or_zeros(const Tensor& t) { return t.grad().defined() ? t.grad() : at::zeros_like(t); }

// The op's definition, spelled out per switch and channel in double; autograd supplies gradients.
Reference reference(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                    const Tensor& running_var, const Tensor& grad_y, const Case& cs, bool training, double eps,
                    const std::string& act) {
  const int64_t S = cs.covered.size();
  const int64_t B = x.size(0) / S;
  const int64_t C = x.size(1);
  Tensor xd = x.to(at::kDouble).detach().requires_grad_();
  Tensor wd = weight.to(at::kDouble).detach().requires_grad_();
  Tensor bd = bias.to(at::kDouble).detach().requires_grad_();
  const Tensor rm = running_mean.to(at::kDouble);
  const Tensor rv = running_var.to(at::kDouble);
  const Tensor gyd = grad_y.to(at::kDouble);
  Reference r;
  r.y = at::zeros(x.sizes(), at::kDouble);
  r.mean = at::zeros({S, C}, at::kDouble);
  r.var = at::zeros({S, C}, at::kDouble);
  Tensor loss = at::zeros({}, at::kDouble);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row = cs.rows[s];
    for (int64_t c = 0; c < cs.covered[s]; ++c) {
      const Tensor xs = xd.slice(0, s * B, (s + 1) * B).select(1, c);
      const Tensor m = training ? xs.mean() : rm[row][c];
      const Tensor v = training ? (xs - m).pow(2).mean() : rv[row][c];
      const Tensor ys = activate((xs - m) / at::sqrt(v + eps) * wd[row][c] + bd[row][c], act);
      r.y.slice(0, s * B, (s + 1) * B).select(1, c).copy_(ys.detach());
      r.mean[s][c].copy_(m.detach());
      r.var[s][c].copy_(v.detach());
      loss = loss + (ys * gyd.slice(0, s * B, (s + 1) * B).select(1, c)).sum();
    }
  }
  if (loss.requires_grad()) loss.backward();
  r.grad_x = grad_or_zeros(xd);
  r.grad_weight = grad_or_zeros(wd);
  r.grad_bias = grad_or_zeros(bd);
  return r;
}

Result call_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rm, const Tensor& rv,
                    const Case& cs, bool training, double eps, const std::string& act) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("paradis::switch_batch_norm", "")
          .typed<Result(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                        at::IntArrayRef, bool, double, c10::string_view, const std::optional<Tensor>&)>();
  return op.call(x, w, b, rm, rv, cs.covered, cs.rows, training, eps, act, std::nullopt);
}

Result call_backward(const Tensor& gy, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& m,
                     const Tensor& v, const Case& cs, bool training, double eps, const std::string& act) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("paradis::switch_batch_norm_backward", "")
          .typed<Result(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        at::IntArrayRef, at::IntArrayRef, bool, double, c10::string_view)>();
  return op.call(gy, x, w, b, m, v, cs.covered, cs.rows, training, eps, act);
}

bool all_zero(const Tensor& t) { return t.numel() == 0 || t.eq(0).all().item<bool>(); }

// Tolerance for comparing against the double reference, by the dtype of x.
double tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return 1e-10;
    case at::kFloat:
      return 2e-4;
    default:
      return 5e-2;
  }
}

void run(const Case& cs, at::ScalarType dtype, at::ScalarType param_dtype, bool training, const std::string& act) {
  std::ostringstream tag;
  tag << cs.name << " " << dtype << " params=" << param_dtype << (training ? " train " : " eval ") << act;
  const double eps = 1e-5;
  const double tol = tolerance(dtype);
  const int64_t S = cs.covered.size();
  const int64_t B = cs.shape[0] / S;
  const int64_t C = cs.shape[1];
  const auto popts = at::TensorOptions().dtype(param_dtype);
  const Tensor x = (at::randn(cs.shape, at::kDouble) * 2 + 0.5).to(dtype);
  const Tensor grad_y = at::randn(cs.shape, at::kDouble).to(dtype);
  const Tensor weight = at::randn({cs.s_total, C}, popts);
  const Tensor bias = at::randn({cs.s_total, C}, popts) * 0.5;
  const Tensor running_mean = at::randn({cs.s_total, C}, popts) * 0.5;
  const Tensor running_var = at::rand({cs.s_total, C}, popts) * 3 + 0.5;
  const Reference ref = reference(x, weight, bias, running_mean, running_var, grad_y, cs, training, eps, act);

  const auto [y, mean, var] = paradis::switch_batch_norm_forward_cpu(x, weight, bias, running_mean, running_var,
                                                                     cs.covered, cs.rows, training, eps, act);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  expect(y.scalar_type() == dtype && y.sizes() == x.sizes() && y.is_contiguous(), tag.str() + ": y layout");
  expect(mean.scalar_type() == acc && var.scalar_type() == acc, tag.str() + ": stats dtype");
  expect_close(y, ref.y, tol, tag.str() + ": y");
  expect_close(mean, ref.mean, tol, tag.str() + ": mean");
  expect_close(var, ref.var, tol, tag.str() + ": var");

  const auto [grad_x, grad_weight, grad_bias] = paradis::switch_batch_norm_backward_cpu(
      grad_y, x, weight, bias, mean, var, cs.covered, cs.rows, training, eps, act);
  expect(grad_weight.scalar_type() == param_dtype && grad_bias.scalar_type() == param_dtype,
         tag.str() + ": grad dtypes");
  expect_close(grad_x, ref.grad_x, tol, tag.str() + ": grad_x");
  expect_close(grad_weight, ref.grad_weight, tol, tag.str() + ": grad_weight");
  expect_close(grad_bias, ref.grad_bias, tol, tag.str() + ": grad_bias");

  std::vector<bool> used(cs.s_total, false);
  for (int64_t s = 0; s < S; ++s) {
    const Tensor ys = y.slice(0, s * B, (s + 1) * B).slice(1, cs.covered[s]);
    const Tensor gxs = grad_x.slice(0, s * B, (s + 1) * B).slice(1, cs.covered[s]);
    expect(all_zero(ys) && all_zero(gxs), tag.str() + ": uncovered y/grad_x exactly zero");
    expect(all_zero(mean[s].slice(0, cs.covered[s])) && all_zero(var[s].slice(0, cs.covered[s])),
           tag.str() + ": uncovered stats zero");
    expect(all_zero(grad_weight[cs.rows[s]].slice(0, cs.covered[s])) &&
               all_zero(grad_bias[cs.rows[s]].slice(0, cs.covered[s])),
           tag.str() + ": uncovered parameter grads zero");
    used[cs.rows[s]] = true;
  }
  for (int64_t r = 0; r < cs.s_total; ++r) {
    if (!used[r]) expect(all_zero(grad_weight[r]) && all_zero(grad_bias[r]), tag.str() + ": unused row grads zero");
  }

  const auto [dy, dmean, dvar] = call_forward(x, weight, bias, running_mean, running_var, cs, training, eps, act);
  expect(at::equal(dy, y) && at::equal(dmean, mean) && at::equal(dvar, var), tag.str() + ": dispatcher forward");
  const auto [dgx, dgw, dgb] = call_backward(grad_y, x, weight, bias, mean, var, cs, training, eps, act);
  expect(at::equal(dgx, grad_x) && at::equal(dgw, grad_weight) && at::equal(dgb, grad_bias),
         tag.str() + ": dispatcher backward");

  // A residual added before the activation in the same pass: y = act(normalised x + residual),
  // act(residual) on uncovered channels; against the op without activation plus residual.
  const Tensor residual = at::randn(cs.shape, at::kDouble).to(dtype);
  const Tensor plain = std::get<0>(paradis::switch_batch_norm_forward_cpu(x, weight, bias, running_mean, running_var,
                                                                          cs.covered, cs.rows, training, eps, "none"));
  const Tensor want = activate(plain.to(at::kDouble) + residual.to(at::kDouble), act);
  const Tensor fused = std::get<0>(paradis::switch_batch_norm_forward_cpu(
      x, weight, bias, running_mean, running_var, cs.covered, cs.rows, training, eps, act, residual));
  expect_close(fused, want, tol, tag.str() + ": y with residual");
  if (x.dim() == 4) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const Tensor fused_cl = std::get<0>(
        paradis::switch_batch_norm_forward_cpu(x.contiguous(cl), weight, bias, running_mean, running_var, cs.covered,
                                               cs.rows, training, eps, act, residual.contiguous(cl)));
    expect(fused_cl.is_contiguous(cl), tag.str() + ": channels_last y with residual layout");
    expect_close(fused_cl, want, tol, tag.str() + ": channels_last y with residual");
  }

  if (x.dim() == 4) {  // the NHWC kernels: y and grad_x keep x's channels_last layout
    const auto cl = at::MemoryFormat::ChannelsLast;
    const Tensor x_cl = x.contiguous(cl);
    const auto [y_cl, mean_cl, var_cl] = paradis::switch_batch_norm_forward_cpu(
        x_cl, weight, bias, running_mean, running_var, cs.covered, cs.rows, training, eps, act);
    expect(y_cl.is_contiguous(cl) && !y_cl.is_contiguous(), tag.str() + ": channels_last y layout");
    expect_close(y_cl, ref.y, tol, tag.str() + ": channels_last y");
    expect_close(mean_cl, ref.mean, tol, tag.str() + ": channels_last mean");
    expect_close(var_cl, ref.var, tol, tag.str() + ": channels_last var");
    // grad_y in NCHW: the kernel converts it to x's layout
    const auto [gx_cl, gw_cl, gb_cl] = paradis::switch_batch_norm_backward_cpu(
        grad_y, x_cl, weight, bias, mean_cl, var_cl, cs.covered, cs.rows, training, eps, act);
    expect(gx_cl.is_contiguous(cl) && !gx_cl.is_contiguous(), tag.str() + ": channels_last grad_x layout");
    expect_close(gx_cl, ref.grad_x, tol, tag.str() + ": channels_last grad_x");
    expect_close(gw_cl, ref.grad_weight, tol, tag.str() + ": channels_last grad_weight");
    expect_close(gb_cl, ref.grad_bias, tol, tag.str() + ": channels_last grad_bias");
    for (int64_t s = 0; s < S; ++s) {
      expect(all_zero(y_cl.slice(0, s * B, (s + 1) * B).slice(1, cs.covered[s])) &&
                 all_zero(gx_cl.slice(0, s * B, (s + 1) * B).slice(1, cs.covered[s])),
             tag.str() + ": channels_last uncovered y/grad_x exactly zero");
    }
  }
}

void check_validation() {
  const Case cs{"validation", {4, 3, 2, 2}, {3, 2}, {0, 1}, 2};
  const Tensor x = at::randn(cs.shape);
  const Tensor t = at::ones({2, 3});
  const auto fwd = [&](const Tensor& xx, const Tensor& w, std::vector<int64_t> covered, std::vector<int64_t> rows,
                       const std::string& act) {
    return [=] { paradis::switch_batch_norm_forward_cpu(xx, w, t, t, t, covered, rows, true, 1e-5, act); };
  };
  expect_throws(fwd(x, t, {4, 2}, {0, 1}, "relu"), "covered[0] = 4", "covered > C");
  expect_throws(fwd(x, t, {3, -1}, {0, 1}, "relu"), "covered[1] = -1", "negative covered");
  expect_throws(fwd(x, t, {3, 2}, {0, 2}, "relu"), "rows[1] = 2", "row out of range");
  expect_throws(fwd(x, t, {3, 2}, {1, 1}, "relu"), "distinct", "repeated row");
  expect_throws(fwd(x, t, {3, 2, 1}, {0, 1, 2}, "relu"), "divisible", "N not divisible by S");
  expect_throws(fwd(x, t, {3, 2}, {0}, "relu"), "rows has 1", "len(rows) != S");
  expect_throws(fwd(x, t, {}, {}, "relu"), "at least one switch", "no switches");
  expect_throws(fwd(x, t, {3, 2}, {0, 1}, "gelu"), "gelu", "unknown activation");
  expect_throws(fwd(x, at::ones({2, 4}), {3, 2}, {0, 1}, "relu"), "weight must have shape", "weight shape");
  expect_throws(fwd(at::randn({4}), t, {1}, {0}, "relu"), "[N, C, *]", "x rank 1");
  expect_throws(
      [&] {
        paradis::switch_batch_norm_forward_cpu(x, t, at::ones({3, 3}), t, t, cs.covered, cs.rows, true, 1e-5, "relu");
      },
      "bias must have shape", "bias shape");
  expect_throws(
      [&] {
        paradis::switch_batch_norm_backward_cpu(at::randn({4, 3, 2}), x, t, t, t, t, cs.covered, cs.rows, true, 1e-5,
                                                "relu");
      },
      "grad_y has shape", "grad_y shape");
  expect_throws(
      [&] {
        paradis::switch_batch_norm_backward_cpu(x, x, t, t, at::ones({3, 3}), t, cs.covered, cs.rows, true, 1e-5,
                                                "relu");
      },
      "mean must have shape", "backward mean shape");
  expect_throws(
      [&] {
        paradis::switch_batch_norm_forward_cpu(x, t, t, t, t, cs.covered, cs.rows, true, 1e-5, "relu",
                                               at::randn({4, 3, 2}));
      },
      "residual must be like x", "residual shape");
  expect_throws(
      [&] {
        paradis::switch_batch_norm_forward_cpu(x, t, t, t, t, cs.covered, cs.rows, true, 1e-5, "relu",
                                               at::randn(cs.shape, at::kDouble));
      },
      "residual must be like x", "residual dtype");
  expect_throws([&] { call_forward(x, t, t, t, t, Case{"", {}, {5, 2}, {0, 1}, 2}, true, 1e-5, "relu"); },
                "covered[0] = 5", "dispatcher covered > C");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      {"unequal", {12, 8, 5, 5}, {8, 5, 2}, {0, 1, 2}, 3},
      {"permuted rows", {6, 6, 3, 7}, {6, 3}, {3, 1}, 4},
      {"rank2 with empty switch", {8, 5}, {5, 0, 3, 1}, {2, 0, 3, 1}, 5},
      {"long rows", {4, 3, 37, 41}, {3, 2}, {1, 0}, 2},
      {"rank5", {4, 4, 2, 3, 5}, {2, 4}, {0, 1}, 2},
      {"enough work to split across threads", {16, 24, 16, 16}, {24, 9}, {1, 0}, 2},
  };
  for (const Case& cs : cases) {
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      for (const bool training : {true, false}) {
        for (const std::string act : {"none", "relu", "relu6"}) run(cs, dtype, dtype, training, act);
      }
    }
  }
  // Reduced-precision x with float32 parameters: the staged (converting) path.
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    for (const bool training : {true, false}) run(cases[0], dtype, at::kFloat, training, "relu6");
  }
  run(cases[3], at::kFloat, at::kDouble, true, "relu");  // parameters in another dtype than x
  check_validation();

  return report();
}
