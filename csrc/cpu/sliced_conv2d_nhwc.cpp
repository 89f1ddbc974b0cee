// The sliced convolution on channels_last (NHWC) tensors. A switch's samples are a matrix of
// pixels x channels, so a block is one GEMM on strided sub-matrices: rows are output pixels
// (B * Ho * Wo, large even for tiny images, with no gather or scatter), columns are the block's
// channels. 1x1 convolutions read x in place; k x k ones im2col a tile of rows into a buffer
// whose columns follow the weight's (channel, tap) order, so weight blocks are read in place too.
#include <ATen/Dispatch.h>

#include "cpu/sliced_conv2d_common.h"

namespace paradis {
namespace conv {
namespace {

// Output-pixel rows of one tile: enough to run GEMM near peak, few enough to stay in L2.
int64_t tile_rows(int64_t depth) {
  return std::max<int64_t>(4 * kRowAlign, kColumnBuffer / std::max<int64_t>(1, depth));
}

// Calls f(r, tap, offset) for output rows [r0, r1) of a slab and every tap whose input pixel is in
// the image, offset being that pixel's index in the slab [*, H, W]; f(r, tap, -1) in the padding.
template <typename F>
void for_each_tap(const Geometry& g, int64_t r0, int64_t r1, const F& f) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.ohw(), p = r % g.ohw(), oh = p / g.Wo, ow = p % g.Wo;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t iw = ow * g.sw - g.pw + kj * g.dw;
        const bool inside = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
        f(r, ki * g.kw + kj, inside ? (b * g.H + ih) * g.W + iw : -1);
      }
    }
  }
}

// cols[r - r0, (c - c0) * taps + tap] = x[pixel of row r at tap, c] (zero in the padding).
template <typename T>
void im2col(const T* x, const Geometry& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* cols) {
  const int64_t n = c1 - c0, taps = g.taps(), depth = n * taps;
  for_each_tap(g, r0, r1, [&](int64_t r, int64_t tap, int64_t pixel) {
    T* dst = cols + (r - r0) * depth + tap;
    if (pixel < 0) {
      for (int64_t c = 0; c < n; ++c) dst[c * taps] = T(0);
    } else {
      const T* src = x + pixel * g.C_in + c0;
      for (int64_t c = 0; c < n; ++c) dst[c * taps] = src[c];
    }
  });
}

// The adjoint of im2col: x[pixel of row r at tap, c] += cols[r - r0, (c - c0) * taps + tap].
template <typename T>
void col2im_add(const T* cols, const Geometry& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* x) {
  const int64_t n = c1 - c0, taps = g.taps(), depth = n * taps;
  for_each_tap(g, r0, r1, [&](int64_t r, int64_t tap, int64_t pixel) {
    if (pixel < 0) return;
    const T* src = cols + (r - r0) * depth + tap;
    T* dst = x + pixel * g.C_in + c0;
    for (int64_t c = 0; c < n; ++c) dst[c] += src[c * taps];
  });
}

// Rows [r0, r1) x channels [c0, c1) of a block's input as a matrix in the weight's column order:
// x itself for a pointwise convolution, else an im2col tile in `scratch`.
template <typename T>
std::pair<const T*, int64_t> input_matrix(const T* slab, const Geometry& g, int64_t r0, int64_t r1, int64_t c0,
                                          int64_t c1, Scratch<T>& scratch) {
  if (g.pointwise()) return {slab + r0 * g.C_in + c0, g.C_in};
  T* cols = scratch.get((r1 - r0) * (c1 - c0) * g.taps());
  im2col(slab, g, r0, r1, c0, c1, cols);
  return {cols, (c1 - c0) * g.taps()};
}

int64_t block_work(const Geometry& g, const Block& b) { return (b.o1 - b.o0) * b.depth(g) * g.B * g.ohw(); }

struct Task {
  int64_t group, r0, r1, c0, c1; // output rows [r0, r1); channels [c0, c1) (inputs for grad_x)
};

// y[r, o0:o1] = x_block[r] @ weight[o0:o1, i0:i1]^T + bias, tasks over row chunks of each block.
template <typename T>
void forward_kernel(const T* x, const T* w, const T* bias, T* y, const Geometry& g, const std::vector<Block>& blocks) {
  int64_t total = 0;
  for (const Block& b : blocks) total += block_work(g, b);
  const int64_t target = task_target(total);
  std::vector<Task> tasks;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const Block& b = blocks[k];
    for (auto [r0, r1] : row_chunks(0, g.B * g.ohw(), (b.o1 - b.o0) * b.depth(g), target))
      tasks.push_back({static_cast<int64_t>(k), r0, r1, b.o0, b.o1});
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch;
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = tasks[i];
      const Block& b = blocks[task.group];
      const T* xs = x + b.x0 * g.hw() * g.C_in;
      T* ys = y + b.y0 * g.ohw() * g.C_out;
      const int64_t N = b.o1 - b.o0, step = tile_rows(b.depth(g));
      for (int64_t r = task.r0; r < task.r1; r += step) {
        const int64_t r1 = std::min(task.r1, r + step);
        const auto [a, lda] = input_matrix(xs, g, r, r1, b.i0, b.i1, scratch);
        T* c = ys + r * g.C_out + b.o0;
        gemm<T>(false, true, r1 - r, N, b.depth(g), a, lda, w + b.o0 * g.w_ld() + b.i0 * g.taps(), g.w_ld(), T(0),
                c, g.C_out);
        if (bias) {
          for (int64_t m = 0; m < r1 - r; ++m) {
            for (int64_t o = 0; o < N; ++o) c[m * g.C_out + o] += bias[b.o0 + o];
          }
        }
      }
    }
  });
}

// grad_x of each group of blocks reading the same inputs (one block; every block with
// input_shared), summed over the group in order. Pointwise: row chunks, written in place.
// Otherwise: chunks of whole samples x input-channel chunks, so col2im's overlapping pixels
// never meet across tasks.
template <typename T>
void grad_input_kernel(const T* gy, const T* w, T* gx, const Geometry& g,
                       const std::vector<std::vector<Block>>& groups) {
  int64_t total = 0;
  for (const auto& group : groups) {
    for (const Block& b : group) total += block_work(g, b);
  }
  const int64_t target = task_target(total);
  std::vector<Task> tasks;
  for (size_t k = 0; k < groups.size(); ++k) {
    const Block& first = groups[k].front();
    int64_t outputs = 0;
    for (const Block& b : groups[k]) outputs += b.o1 - b.o0;
    const int64_t per_row = outputs * first.depth(g);
    if (g.pointwise()) {
      for (auto [r0, r1] : row_chunks(0, g.B * g.ohw(), per_row, target))
        tasks.push_back({static_cast<int64_t>(k), r0, r1, first.i0, first.i1});
      continue;
    }
    const int64_t per_sample = per_row * g.ohw();
    const int64_t samples = std::clamp<int64_t>(target / std::max<int64_t>(1, per_sample), 1, g.B);
    for (int64_t s0 = 0; s0 < g.B; s0 += samples) {
      const int64_t s1 = std::min(g.B, s0 + samples);
      const int64_t per_channel = (s1 - s0) * g.ohw() * outputs * g.taps();
      for (auto [c0, c1] : row_chunks(first.i0, first.i1, per_channel, target))
        tasks.push_back({static_cast<int64_t>(k), s0 * g.ohw(), s1 * g.ohw(), c0, c1});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch;
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = tasks[i];
      const auto& group = groups[task.group];
      T* gxs = gx + group.front().x0 * g.hw() * g.C_in;
      const int64_t depth = (task.c1 - task.c0) * g.taps();
      const int64_t step = g.pointwise() ? task.r1 - task.r0 : tile_rows(depth);
      for (int64_t r = task.r0; r < task.r1; r += step) {
        const int64_t r1 = std::min(task.r1, r + step);
        T* c = g.pointwise() ? gxs + r * g.C_in + task.c0 : scratch.get((r1 - r) * depth);
        const int64_t ldc = g.pointwise() ? g.C_in : depth;
        for (size_t k = 0; k < group.size(); ++k) {
          const Block& b = group[k];
          gemm<T>(false, false, r1 - r, depth, b.o1 - b.o0, gy + (b.y0 * g.ohw() + r) * g.C_out + b.o0, g.C_out,
                  w + b.o0 * g.w_ld() + task.c0 * g.taps(), g.w_ld(), T(k == 0 ? 0 : 1), c, ldc);
        }
        if (!g.pointwise()) col2im_add(c, g, r, r1, task.c0, task.c1, gxs);
      }
    }
  });
}

// grad_weight and grad_bias by chunks of weight rows: each task owns rows [o0, o1) of the weight
// and adds every block's share to them in block order, in place. Overlapping blocks of different
// switches meet in one task, in the same order on every run: no race, no partial buffers.
template <typename T>
void grad_weight_kernel(const T* gy, const T* x, T* gw, T* gb, const Geometry& g, const std::vector<Block>& blocks) {
  int64_t total = 0, depth_sum = 0;
  for (const Block& b : blocks) total += block_work(g, b), depth_sum += b.depth(g);
  const int64_t target = task_target(total);
  std::vector<Task> tasks;
  for (auto [o0, o1] : row_chunks(0, g.C_out, depth_sum * g.B * g.ohw(), target)) tasks.push_back({0, 0, 0, o0, o1});
  const int64_t rows = g.B * g.ohw();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch;
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = tasks[i];
      for (const Block& b : blocks) {
        const int64_t o0 = std::max(task.c0, b.o0), o1 = std::min(task.c1, b.o1);
        if (o0 >= o1) continue;
        const T* xs = x + b.x0 * g.hw() * g.C_in;
        const T* gys = gy + b.y0 * g.ohw() * g.C_out;
        const int64_t step = g.pointwise() ? rows : tile_rows(b.depth(g));
        for (int64_t r = 0; r < rows; r += step) {
          const int64_t r1 = std::min(rows, r + step);
          if (gw) {
            const auto [a, lda] = input_matrix(xs, g, r, r1, b.i0, b.i1, scratch);
            gemm<T>(true, false, o1 - o0, b.depth(g), r1 - r, gys + r * g.C_out + o0, g.C_out, a, lda, T(1),
                    gw + o0 * g.w_ld() + b.i0 * g.taps(), g.w_ld());
          }
          if (gb) {
            for (int64_t m = r; m < r1; ++m) {
              const T* src = gys + m * g.C_out;
              for (int64_t o = o0; o < o1; ++o) gb[o] += src[o];
            }
          }
        }
      }
    }
  });
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

} // namespace

void nhwc_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y, const Geometry& g,
                  const std::vector<Block>& blocks) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sliced_conv2d_forward_nhwc", [&] {
    forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                             data_or_null<scalar_t>(bias), y.mutable_data_ptr<scalar_t>(), g, blocks);
  });
}

void nhwc_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& grad_x,
                   const Tensor& grad_weight, const Tensor& grad_bias, const Geometry& g,
                   const std::vector<Block>& blocks, const std::vector<std::vector<Block>>& groups) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sliced_conv2d_backward_nhwc", [&] {
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
    if (grad_x.defined())
      grad_input_kernel<scalar_t>(gy, weight.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), g,
                                  groups);
    if (grad_weight.defined() || grad_bias.defined())
      grad_weight_kernel<scalar_t>(gy, x.const_data_ptr<scalar_t>(), mutable_or_null<scalar_t>(grad_weight),
                                   mutable_or_null<scalar_t>(grad_bias), g, blocks);
  });
}

} // namespace conv
} // namespace paradis
