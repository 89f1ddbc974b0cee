// The instruction sets the CPU kernels are built for and chosen among at run time.
#pragma once

#include <cstdlib>
#include <string_view>

// The AVX2 and AVX-512 kernels are compiled through GCC's target pragmas: x86-64 GCC builds only;
// elsewhere every kernel runs its baseline code (or oneDNN / BLAS).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PARADIS_X86_TARGETS 1
#else
#define PARADIS_X86_TARGETS 0
#endif

namespace paradis {

// PARADIS_CPU_ISA=baseline turns the AVX2 and AVX-512 kernels off (tests use it to check the
// fallbacks).
inline bool baseline_forced() {
  const char* forced = std::getenv("PARADIS_CPU_ISA");
  return forced && std::string_view(forced) == "baseline";
}

// Whether the AVX2 + FMA kernels may run.
inline bool avx2_fma_enabled() {
#if PARADIS_X86_TARGETS
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has_avx2 && !baseline_forced();
#else
  return false;
#endif
}

// Whether the AVX-512 kernels may run.
inline bool avx512_enabled() {
#if PARADIS_X86_TARGETS
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  return has_avx512 && !baseline_forced();
#else
  return false;
#endif
}

}  // namespace paradis
