// The argument checks of every switch_batch_norm kernel (CPU and CUDA): a call that bypasses
// paradis_fast/ops, which checks the same first, still gets a clear error, never a bad read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace paradis {

// t is a floating tensor on x's device.
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "switch_batch_norm: ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_floating_point(), "switch_batch_norm: ", name, " must be floating point, got ", t.scalar_type());
}

// A table of parameters or statistics: [rows, C] on x's device.
inline void check_table(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t rows) {
  check_like_x(t, name, x);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == x.size(1), "switch_batch_norm: ", name,
              " must have shape [", rows, ", ", x.size(1), "], got ", t.sizes());
}

// x [S*B, C, *] on a `device` tensor, weight [S_total, C]; covered and rows list one entry per
// switch, covered[s] in [0, C], rows distinct (so per-row gradient writes never race) and in
// [0, S_total). Returns S.
inline int64_t check_switches(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef covered,
                              at::IntArrayRef rows, c10::DeviceType device) {
  TORCH_CHECK(x.dim() >= 2, "switch_batch_norm: x must be [N, C, *], got ", x.dim(), " dims");
  TORCH_CHECK(x.device().type() == device, "switch_batch_norm: x must be a ", c10::DeviceTypeName(device),
              " tensor here, got ", x.device());
  check_like_x(x, "x", x);
  TORCH_CHECK(weight.dim() == 2, "switch_batch_norm: weight must be [S_total, C], got ", weight.sizes());
  const int64_t S = static_cast<int64_t>(covered.size()), C = x.size(1), s_total = weight.size(0);
  TORCH_CHECK(S > 0, "switch_batch_norm: covered must list at least one switch");
  TORCH_CHECK(x.size(0) % S == 0, "switch_batch_norm: batch ", x.size(0),
              " is not divisible by the number of switches ", S);
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == S, "switch_batch_norm: rows has ", rows.size(),
              " entries but covered has ", S);
  std::vector<bool> used(s_total, false);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(covered[s] >= 0 && covered[s] <= C, "switch_batch_norm: covered[", s, "] = ", covered[s],
                " is outside [0, ", C, "]");
    TORCH_CHECK(rows[s] >= 0 && rows[s] < s_total, "switch_batch_norm: rows[", s, "] = ", rows[s], " is outside [0, ",
                s_total, ")");
    TORCH_CHECK(!used[rows[s]], "switch_batch_norm: rows must be distinct, ", rows[s], " repeats");
    used[rows[s]] = true;
  }
  return S;
}

}  // namespace paradis
