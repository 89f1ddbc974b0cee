// The activation fused into switch_batch_norm, shared by the CPU and CUDA kernels: its name in the
// op schema, and a dispatch that makes it a compile-time constant so inner loops carry no branch.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <type_traits>

namespace paradis {

enum class Act { None, Relu, Relu6 };

inline Act parse_activation(c10::string_view name) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "relu6") return Act::Relu6;
  TORCH_CHECK(false, "switch_batch_norm: unsupported activation '", name,
              "' (expected 'none', 'relu' or 'relu6')");
}

template <typename F>
void dispatch_act(Act act, const F& f) {
  switch (act) {
    case Act::None: return f(std::integral_constant<Act, Act::None>());
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>());
    case Act::Relu6: return f(std::integral_constant<Act, Act::Relu6>());
  }
}

}  // namespace paradis
