// The instruction sets the CPU kernels are built for and chosen among at run time.
#pragma once

#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

// The AVX2 and AVX-512 kernels are compiled through GCC's target pragmas: x86-64 GCC builds only;
// elsewhere every kernel runs its baseline code (or oneDNN / BLAS).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PARADIS_X86_TARGETS 1
#else
#define PARADIS_X86_TARGETS 0
#endif

// Before a loop across the channels of a row: its arrays never overlap. Without it GCC guards the
// vector loop with a run-time alias check that sent the switch BatchNorm backward's first pass to
// its scalar fallback; __restrict__ on locals inside lambdas does not help.
#define PARADIS_NO_ALIAS _Pragma("GCC ivdep")

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

// Whether bfloat16 / float16 convolutions run in that dtype (oneDNN's and BLAS's kernels, float32
// accumulation) instead of computing in float32 on the float32 kernels: where the CPU has units for
// it (AVX512-BF16 or AMX-BF16; AMX-FP16 for float16). Elsewhere oneDNN emulates the dtype, slower
// than float32. PARADIS_CPU_LOW_PRECISION=native or =float32 forces either way (the tests check the
// native path on any CPU).
inline bool low_precision_native(bool bfloat16) {
  const char* forced = std::getenv("PARADIS_CPU_LOW_PRECISION");
  if (forced && *forced) {
    const std::string_view mode(forced);
    TORCH_CHECK(mode == "native" || mode == "float32", "PARADIS_CPU_LOW_PRECISION must be native or float32, got ",
                mode);
    return mode == "native";
  }
  if (baseline_forced()) return false;
  static const auto has = [](const char* unit) {
    const auto capabilities = at::cpu::get_cpu_capabilities();
    const auto found = capabilities.find(unit);
    return found != capabilities.end() && found->second.isBool() && found->second.toBool();
  };
  static const bool bf16_units = has("avx512_bf16") || has("amx_bf16");
  static const bool fp16_units = has("amx_fp16");
  return bfloat16 ? bf16_units : fp16_units;
}

}  // namespace paradis
