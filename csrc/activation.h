// The activation fused into switch_batch_norm, shared by the CPU and CUDA kernels: its name in the
// op schema, and a dispatch that makes it a compile-time constant so inner loops carry no branch.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <type_traits>

namespace paradis {

enum class Act { None, Relu, Relu6 };

inline Act parse_activation(c10::string_view name) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "relu6") return Act::Relu6;
  TORCH_CHECK(false, "switch_batch_norm: unsupported activation '", name, "' (expected 'none', 'relu' or 'relu6')");
}

template <typename F>
void dispatch_act(Act act, const F& f) {
  switch (act) {
    case Act::None:
      return f(std::integral_constant<Act, Act::None>());
    case Act::Relu:
      return f(std::integral_constant<Act, Act::Relu>());
    case Act::Relu6:
      return f(std::integral_constant<Act, Act::Relu6>());
  }
}

// The activation and its gradient mask, for host and device code alike. NaN passes through
// activate, as through ATen's relu.
template <Act A, typename T>
C10_HOST_DEVICE inline T activate(T z) {
  if constexpr (A == Act::Relu)
    return z < T(0) ? T(0) : z;
  else if constexpr (A == Act::Relu6)
    return z < T(0) ? T(0) : (T(6) < z ? T(6) : z);
  else
    return z;
}

// g * act'(z): the gradient passes where the activation is the identity (strictly inside).
template <Act A, typename T>
C10_HOST_DEVICE inline T mask_grad(T g, T z) {
  if constexpr (A == Act::Relu)
    return z > T(0) ? g : T(0);
  else if constexpr (A == Act::Relu6)
    return ((z > T(0)) & (z < T(6))) ? g : T(0);
  else
    return g;
}

}  // namespace paradis
