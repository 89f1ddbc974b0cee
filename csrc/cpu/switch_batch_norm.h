#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace paradis {

// Per-switch BatchNorm + activation over switch-major stacked activations x = [S*B, C, *].
// Switch s normalises channels [0, covered[s]) of its B samples with parameter row rows[s] of the
// [S_total, C] tables and writes zeros to its other channels. Returns (y, mean, var): the
// statistics used ([S, C], accumulation type), batch ones when training, running ones otherwise.
// With a residual (x's shape and dtype), y = activation(normalised x + residual) in the same pass,
// activation(residual) on the channels a switch does not cover.
std::tuple<at::Tensor, at::Tensor, at::Tensor> switch_batch_norm_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, at::IntArrayRef covered, at::IntArrayRef rows, bool training, double eps,
    c10::string_view activation, const std::optional<at::Tensor>& residual = std::nullopt);

// Gradients of switch_batch_norm_forward given mean/var as it returned them:
// (grad_x like x, grad_weight and grad_bias like weight, zero where no switch reads).
std::tuple<at::Tensor, at::Tensor, at::Tensor> switch_batch_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef covered, at::IntArrayRef rows, bool training,
    double eps, c10::string_view activation);

// paradis::update_running_stats_ (csrc/paradis.cpp) in one pass over the covered entries: mean and
// var [S, C] as the forward returned them, running_mean and running_var [S_total, C] on the CPU.
void update_running_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                              const at::Tensor& var, at::IntArrayRef covered, at::IntArrayRef rows, int64_t count,
                              double momentum, const std::optional<at::Tensor>& momentum_per_switch);

}  // namespace paradis
