// The grain of the CPU kernels' parallel loops.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace paradis {

// Values of work per parallel task, as ATen's GRAIN_SIZE (TensorIterator.h).
constexpr int64_t kGrainWork = 32768;

// How many of a loop's `tasks` (holding `work` values in all) each parallel task takes: about
// kGrainWork values, so that a loop with less work than that runs in the calling thread
// (at::parallel_for runs a range of at most one grain inline) -- waking the other threads costs
// more than a small loop's work, and far more beside a busy neighbour, which keeps a woken thread
// waiting for its core.
inline int64_t grain_for(int64_t tasks, int64_t work) {
  const int64_t most = std::max<int64_t>(1, tasks);
  return std::clamp<int64_t>(tasks * kGrainWork / std::max<int64_t>(1, work), 1, most);
}

}  // namespace paradis
