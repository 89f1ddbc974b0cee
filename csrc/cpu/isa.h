#pragma once

#include <cstdlib>
#include <string_view>

namespace paradis {

// Whether the AVX-512 kernels of this library may run: the CPU has AVX-512F and
// PARADIS_CPU_ISA=baseline does not turn them off (tests use it to check the fallbacks).
inline bool avx512_enabled() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const char* forced = std::getenv("PARADIS_CPU_ISA");
  return has_avx512 && !(forced && std::string_view(forced) == "baseline");
#else
  return false;
#endif
}

} // namespace paradis
