#include "cpu/sliced_conv2d.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <climits>
#include <cstring>

#include "cpu/sliced_conv2d_common.h"

// The NCHW kernels, the shared validation and the op entry points (which pick the NCHW or NHWC
// kernels by the memory format of x).
namespace paradis {
namespace {

using at::IntArrayRef;
using namespace conv;

constexpr int64_t kFields = 5;        // ints per block in the table
constexpr int64_t kMinColumns = 256;  // GEMM columns per tile: enough to run near peak

// GEMM columns: output positions [p0, p0 + np) of samples [b0, b0 + nb); nb > 1 only with whole
// images, so a one-sample tile is a strided sub-matrix of x or y.
struct Tile {
  int64_t b0, nb, p0, np;
  int64_t columns() const { return nb * np; }
  bool operator==(const Tile& o) const { return b0 == o.b0 && nb == o.nb && p0 == o.p0 && np == o.np; }
};

// Tiles of the B samples for a column matrix of `depth` rows: at least kMinColumns columns (small
// images batch several samples), large images split so an im2col tile fits kColumnBuffer.
std::vector<Tile> column_tiles(const Geometry& g, int64_t depth) {
  std::vector<Tile> tiles;
  const int64_t ohw = g.ohw();
  if (ohw >= kMinColumns) {
    const int64_t np = g.pointwise() ? ohw : std::clamp(kColumnBuffer / depth, kMinColumns, ohw);
    for (int64_t b = 0; b < g.B; ++b) {
      for (int64_t p = 0; p < ohw; p += np) tiles.push_back({b, 1, p, std::min(np, ohw - p)});
    }
  } else {
    const int64_t nb = std::min(g.B, ceil_div(kMinColumns, ohw));
    for (int64_t b = 0; b < g.B; b += nb) tiles.push_back({b, std::min(nb, g.B - b), 0, ohw});
  }
  return tiles;
}

// Calls run(q, ih, iw, len) for each run of `len` tile columns from column q (within one sample)
// whose input pixels of tap (ki, kj) are in the image, from (ih, iw) stepping by the stride.
template <typename F>
void for_each_tap_run(const Geometry& g, const Tile& t, int64_t ki, int64_t kj, const F& run) {
  const auto [oh_lo, oh_hi] = valid_outputs(g.H, g.Ho, g.sh, g.ph, ki * g.dh);
  const auto [ow_lo, ow_hi] = valid_outputs(g.W, g.Wo, g.sw, g.pw, kj * g.dw);
  const int64_t p_end = t.p0 + t.np;
  for (int64_t oh = std::max(oh_lo, t.p0 / g.Wo); oh < oh_hi && oh * g.Wo < p_end; ++oh) {
    const int64_t a = std::max(ow_lo, t.p0 - oh * g.Wo);
    const int64_t b = std::min(ow_hi, p_end - oh * g.Wo);
    if (a < b)
      run(oh * g.Wo + a - t.p0, oh * g.sh - g.ph + ki * g.dh, a * g.sw - g.pw + kj * g.dw, b - a);
  }
}

// cols[(c - c0) * taps + tap, n * np + q] = x[b0 + n, c] at tap of output position p0 + q
// (zero in the padding); x is a [*, C_in, H, W] slab.
template <typename T>
void im2col(const T* x, const Geometry& g, const Tile& t, int64_t c0, int64_t c1, T* cols) {
  const int64_t N = t.columns();
  std::fill(cols, cols + (c1 - c0) * g.taps() * N, T(0));
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        T* row = cols + ((c - c0) * g.taps() + ki * g.kw + kj) * N;
        for (int64_t n = 0; n < t.nb; ++n) {
          const T* img = x + ((t.b0 + n) * g.C_in + c) * g.hw();
          T* dst = row + n * t.np;
          for_each_tap_run(g, t, ki, kj, [&](int64_t q, int64_t ih, int64_t iw, int64_t len) {
            const T* src = img + ih * g.W + iw;
            if (g.sw == 1) {
              std::memcpy(dst + q, src, len * sizeof(T));
            } else {
              for (int64_t i = 0; i < len; ++i) dst[q + i] = src[i * g.sw];
            }
          });
        }
      }
    }
  }
}

// The adjoint of im2col: x[b0 + n, c] += cols at the pixels each column read.
template <typename T>
void col2im_add(const T* cols, const Geometry& g, const Tile& t, int64_t c0, int64_t c1, T* x) {
  const int64_t N = t.columns();
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const T* row = cols + ((c - c0) * g.taps() + ki * g.kw + kj) * N;
        for (int64_t n = 0; n < t.nb; ++n) {
          T* img = x + ((t.b0 + n) * g.C_in + c) * g.hw();
          const T* src = row + n * t.np;
          for_each_tap_run(g, t, ki, kj, [&](int64_t q, int64_t ih, int64_t iw, int64_t len) {
            T* dst = img + ih * g.W + iw;
            for (int64_t i = 0; i < len; ++i) dst[i * g.sw] += src[q + i];
          });
        }
      }
    }
  }
}

// buf[c - c0, n * np + q] = y[b0 + n, c, p0 + q] for a [*, channels, Ho, Wo] slab y.
template <typename T>
void gather(const T* y, int64_t channels, const Geometry& g, const Tile& t, int64_t c0, int64_t c1, T* buf) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t n = 0; n < t.nb; ++n) {
      std::memcpy(buf + (c - c0) * t.columns() + n * t.np,
                  y + ((t.b0 + n) * channels + c) * g.ohw() + t.p0, t.np * sizeof(T));
    }
  }
}

// The inverse of gather, plus bias[c] when given.
template <typename T>
void scatter(const T* buf, const T* bias, int64_t channels, const Geometry& g, const Tile& t, int64_t c0,
             int64_t c1, T* y) {
  for (int64_t c = c0; c < c1; ++c) {
    const T add = bias ? bias[c] : T(0);
    for (int64_t n = 0; n < t.nb; ++n) {
      const T* src = buf + (c - c0) * t.columns() + n * t.np;
      T* dst = y + ((t.b0 + n) * channels + c) * g.ohw() + t.p0;
      for (int64_t i = 0; i < t.np; ++i) dst[i] = src[i] + add;
    }
  }
}

// The im2col matrix of a block's input channels over a tile, or the strided view of x itself for
// a one-sample pointwise tile; rebuilt only when the block inputs or the tile change.
template <typename T>
struct Columns {
  Scratch<T> scratch;
  const T* key_x = nullptr;
  int64_t key_i0 = -1, key_i1 = -1;
  Tile key_tile{-1, 0, 0, 0};

  std::pair<const T*, int64_t> of(const T* x, const Geometry& g, const Block& b, const Tile& t) {
    const T* slab = x + b.x0 * g.C_in * g.hw();
    if (g.pointwise() && t.nb == 1) return {slab + (t.b0 * g.C_in + b.i0) * g.hw() + t.p0, g.hw()};
    T* cols = scratch.get(b.depth(g) * t.columns());
    if (key_x != slab || key_i0 != b.i0 || key_i1 != b.i1 || !(key_tile == t)) {
      im2col(slab, g, t, b.i0, b.i1, cols);
      key_x = slab, key_i0 = b.i0, key_i1 = b.i1, key_tile = t;
    }
    return {cols, t.columns()};
  }
};

// Rows [r0, r1) of a [*, channels, Ho, Wo] slab over a tile as a matrix: strided in place for a
// one-sample tile, else gathered into scratch.
template <typename T>
std::pair<const T*, int64_t> rows_of(const T* slab, int64_t channels, const Geometry& g, const Tile& t,
                                     int64_t r0, int64_t r1, Scratch<T>& scratch) {
  if (t.nb == 1) return {slab + (t.b0 * channels + r0) * g.ohw() + t.p0, g.ohw()};
  T* buf = scratch.get((r1 - r0) * t.columns());
  gather(slab, channels, g, t, r0, r1, buf);
  return {buf, t.columns()};
}

struct Task {
  int64_t block; // block (forward) or group of blocks (grad_x)
  Tile tile;
  int64_t r0, r1; // output channels (forward, grad_weight) or input channels (grad_x)
};

// A thread's buffers: im2col columns, gathered rows of y or grad_y, and a GEMM result.
template <typename T>
struct Workspace {
  Columns<T> cols;
  Scratch<T> rows;
  Scratch<T> out;
};

// Runs f(task, workspace) on every task, each thread with its own workspace.
template <typename T, typename F>
void run_tasks(const std::vector<Task>& tasks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws;
    for (int64_t i = begin; i < end; ++i) f(tasks[i], ws);
  });
}

// y slab rows of each block: y[b.y0 + n, r] = conv(x[b.x0 + n, b.i0:b.i1], weight[r]) + bias[r].
template <typename T>
void forward_kernel(const T* x, const T* w, const T* bias, T* y, const Geometry& g,
                    const std::vector<Block>& blocks) {
  std::vector<Task> tasks;
  int64_t total = 0;
  for (const Block& b : blocks) total += (b.o1 - b.o0) * b.depth(g) * g.B * g.ohw();
  const int64_t target = task_target(total);
  for (size_t k = 0; k < blocks.size(); ++k) {
    const Block& b = blocks[k];
    for (const Tile& t : column_tiles(g, b.depth(g))) {
      for (auto [r0, r1] : row_chunks(b.o0, b.o1, b.depth(g) * t.columns(), target))
        tasks.push_back({static_cast<int64_t>(k), t, r0, r1});
    }
  }
  run_tasks<T>(tasks, [&](const Task& task, Workspace<T>& ws) {
    const Block& b = blocks[task.block];
    const Tile& t = task.tile;
    const auto [a, lda] = ws.cols.of(x, g, b, t);
    const int64_t M = task.r1 - task.r0, N = t.columns();
    const T* wp = w + task.r0 * g.w_ld() + b.i0 * g.taps();
    T* slab = y + b.y0 * g.C_out * g.ohw();
    if (t.nb == 1) {
      T* c = slab + (t.b0 * g.C_out + task.r0) * g.ohw() + t.p0;
      gemm<T>(false, false, M, N, b.depth(g), wp, g.w_ld(), a, lda, T(0), c, g.ohw());
      if (bias) {
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t i = 0; i < N; ++i) c[m * g.ohw() + i] += bias[task.r0 + m];
        }
      }
    } else {
      T* c = ws.out.get(M * N);
      gemm<T>(false, false, M, N, b.depth(g), wp, g.w_ld(), a, lda, T(0), c, N);
      scatter(c, bias, g.C_out, g, t, task.r0, task.r1, slab);
    }
  });
}

// grad_x of each group: x rows a group of blocks reads (one block; every block for input_shared).
template <typename T>
void grad_input_kernel(const T* gy, const T* w, T* gx, const Geometry& g,
                       const std::vector<std::vector<Block>>& groups) {
  std::vector<Task> tasks;
  int64_t total = 0;
  for (const auto& group : groups) {
    for (const Block& b : group) total += (b.o1 - b.o0) * b.depth(g) * g.B * g.ohw();
  }
  const int64_t target = task_target(total);
  for (size_t k = 0; k < groups.size(); ++k) {
    const Block& first = groups[k].front();
    int64_t rows = 0;
    for (const Block& b : groups[k]) rows += b.o1 - b.o0;
    for (const Tile& t : column_tiles(g, first.depth(g))) {
      for (auto [c0, c1] : row_chunks(first.i0, first.i1, rows * g.taps() * t.columns(), target))
        tasks.push_back({static_cast<int64_t>(k), t, c0, c1});
    }
  }
  run_tasks<T>(tasks, [&](const Task& task, Workspace<T>& ws) {
    const auto& group = groups[task.block];
    const Tile& t = task.tile;
    T* slab = gx + group.front().x0 * g.C_in * g.hw();
    const int64_t K = (task.r1 - task.r0) * g.taps(), N = t.columns();
    const bool direct = g.pointwise() && t.nb == 1;
    T* c = direct ? slab + (t.b0 * g.C_in + task.r0) * g.hw() + t.p0 : ws.out.get(K * N);
    const int64_t ldc = direct ? g.hw() : N;
    for (size_t k = 0; k < group.size(); ++k) {
      const Block& b = group[k];
      const auto [gyp, ldgy] = rows_of(gy + b.y0 * g.C_out * g.ohw(), g.C_out, g, t, b.o0, b.o1, ws.rows);
      const T* wp = w + b.o0 * g.w_ld() + task.r0 * g.taps();
      gemm<T>(true, false, K, N, b.o1 - b.o0, wp, g.w_ld(), gyp, ldgy, T(k == 0 ? 0 : 1), c, ldc);
    }
    if (direct) return;
    if (g.pointwise()) // the columns are the pixels: assign (grad_x is only zeroed where uncovered)
      scatter<T>(c, nullptr, g.C_in, g, t, task.r0, task.r1, slab);
    else
      col2im_add(c, g, t, task.r0, task.r1, slab);
  });
}

// grad_weight and grad_bias in two passes. First, tasks (block, group of its tiles) each sum their
// tiles, in order, into a private partial [rows, depth + 1] (weight columns, then the bias), so
// every im2col tile is built once. Then each weight row adds its partials in block and group
// order: overlapping blocks of different switches add up with no race and in the same order on
// every run.
template <typename T>
void grad_weight_kernel(const T* gy, const T* x, T* gw, T* gb, const Geometry& g,
                        const std::vector<Block>& blocks) {
  struct Part {
    int64_t block, tile0, tile1, offset; // tiles [tile0, tile1) of the block; offset in `partials`
  };
  std::vector<std::vector<Tile>> tiles;
  int64_t total = 0;
  for (const Block& b : blocks) {
    tiles.push_back(column_tiles(g, b.depth(g)));
    total += (b.o1 - b.o0) * b.depth(g) * g.B * g.ohw();
  }
  const int64_t target = task_target(total);
  const auto weight_columns = [&](const Block& b) { return gw ? b.depth(g) : 0; };
  std::vector<Part> parts;
  int64_t size = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const Block& b = blocks[k];
    const int64_t n = static_cast<int64_t>(tiles[k].size());
    const int64_t groups = std::clamp<int64_t>(ceil_div((b.o1 - b.o0) * b.depth(g) * g.B * g.ohw(), target), 1, n);
    for (int64_t i = 0; i < groups; ++i) {
      parts.push_back({static_cast<int64_t>(k), i * n / groups, (i + 1) * n / groups, size});
      size += (b.o1 - b.o0) * (weight_columns(b) + 1);
    }
  }
  Scratch<T> storage;
  T* partials = storage.get(size);
  at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws;
    for (int64_t p = begin; p < end; ++p) {
      const Part& part = parts[p];
      const Block& b = blocks[part.block];
      const int64_t M = b.o1 - b.o0, depth = weight_columns(b);
      T* pw = partials + part.offset;
      T* pb = pw + M * depth;
      std::fill(pb, pb + M, T(0));
      for (int64_t i = part.tile0; i < part.tile1; ++i) {
        const Tile& t = tiles[part.block][i];
        const auto [gyp, ldgy] = rows_of(gy + b.y0 * g.C_out * g.ohw(), g.C_out, g, t, b.o0, b.o1, ws.rows);
        if (gw) {
          const auto [a, lda] = ws.cols.of(x, g, b, t);
          gemm<T>(false, true, M, depth, t.columns(), gyp, ldgy, a, lda, T(i == part.tile0 ? 0 : 1), pw, depth);
        }
        if (gb) {
          for (int64_t m = 0; m < M; ++m) pb[m] += row_sum(gyp + m * ldgy, t.columns());
        }
      }
    }
  });
  const int64_t grain = std::max<int64_t>(1, 32768 / (static_cast<int64_t>(parts.size()) * g.w_ld()));
  at::parallel_for(0, g.C_out, grain, [&](int64_t begin, int64_t end) {
    for (const Part& part : parts) {
      const Block& b = blocks[part.block];
      const int64_t M = b.o1 - b.o0, depth = weight_columns(b);
      for (int64_t r = std::max(begin, b.o0); r < std::min(end, b.o1); ++r) {
        const T* src = partials + part.offset + (r - b.o0) * depth;
        if (gw) {
          T* dst = gw + r * g.w_ld() + b.i0 * g.taps();
          for (int64_t i = 0; i < depth; ++i) dst[i] += src[i];
        }
        if (gb) gb[r] += partials[part.offset + M * depth + (r - b.o0)];
      }
    }
  });
}

// Zeroes channels [0, channels) of each switch's rows that none of its blocks covers.
void zero_uncovered(const Tensor& t, const Geometry& g, const std::vector<Block>& blocks, bool inputs) {
  const int64_t channels = t.size(1);
  const int64_t switches = inputs && g.shared ? 1 : g.S;
  for (int64_t s = 0; s < switches; ++s) {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (const Block& b : blocks) {
      if (b.s == s || (inputs && g.shared)) ranges.push_back(inputs ? std::pair{b.i0, b.i1} : std::pair{b.o0, b.o1});
    }
    std::sort(ranges.begin(), ranges.end());
    const Tensor rows = t.narrow(0, s * g.B, g.B);
    int64_t done = 0;
    for (auto [a, b] : ranges) {
      if (a > done) rows.narrow(1, done, a - done).zero_();
      done = std::max(done, b);
    }
    if (done < channels) rows.narrow(1, done, channels - done).zero_();
  }
}

// The disjoint output ranges that the blocks of input_shared cover, each computed once.
std::vector<Block> shared_output_blocks(const Geometry& g, const std::vector<Block>& blocks) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (const Block& b : blocks) ranges.push_back({b.o0, b.o1});
  std::sort(ranges.begin(), ranges.end());
  std::vector<Block> merged;
  for (auto [a, b] : ranges) {
    if (!merged.empty() && a <= merged.back().o1)
      merged.back().o1 = std::max(merged.back().o1, b);
    else
      merged.push_back({0, 0, g.C_in, a, b, 0, 0});
  }
  return merged;
}

void check_fits_blas(int64_t value, const char* what) {
  TORCH_CHECK(value <= INT_MAX, "sliced_conv2d: ", what, " is ", value,
              ", above the 2^31 - 1 that a BLAS dimension can hold; use smaller images or channels");
}

struct Problem {
  Geometry g;
  std::vector<Block> blocks;
};

// Validates everything but the data (so a too-large shape fails before anything is allocated)
// and unpacks the block table.
Problem validate(const Tensor& x, const Tensor& weight, IntArrayRef table,
                                                 int64_t num_switches, IntArrayRef stride,
                                                 IntArrayRef padding, IntArrayRef dilation, bool shared) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "sliced_conv2d: cpu kernel got tensors on ", x.device(), " and ", weight.device());
  TORCH_CHECK(x.dim() == 4, "sliced_conv2d: x must be 4-D [S*B, C_in, H, W], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "sliced_conv2d: weight must be 4-D [C_out, C_in, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "sliced_conv2d: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  TORCH_CHECK(x.size(1) == weight.size(1), "sliced_conv2d: x has ", x.size(1),
              " channels but weight expects ", weight.size(1));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "sliced_conv2d: stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "sliced_conv2d: stride ", stride, " and dilation ", dilation, " must be >= 1, padding ",
              padding, " >= 0");
  TORCH_CHECK(num_switches >= 1, "sliced_conv2d: num_switches must be >= 1, got ", num_switches);
  TORCH_CHECK(shared || x.size(0) % num_switches == 0, "sliced_conv2d: x has ", x.size(0),
              " rows, not a multiple of the ", num_switches, " switches");
  Geometry g{num_switches, shared ? x.size(0) : x.size(0) / num_switches, x.size(1), weight.size(0),
             x.size(2), x.size(3), weight.size(2), weight.size(3), 0, 0, stride[0], stride[1],
             padding[0], padding[1], dilation[0], dilation[1], shared};
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "sliced_conv2d: input of spatial size ", x.sizes().slice(2), " is smaller than the kernel");
  check_fits_blas(g.hw(), "the number of pixels of an input image");
  check_fits_blas(g.ohw(), "the number of pixels of an output image");
  check_fits_blas(g.w_ld(), "C_in * kh * kw");
  check_fits_blas(g.C_out, "C_out");

  TORCH_CHECK(!table.empty() && table.size() % kFields == 0, "sliced_conv2d: blocks must hold ", kFields,
              " ints per block (switch, in_start, in_stop, out_start, out_stop), got ", table.size());
  std::vector<Block> blocks;
  for (size_t k = 0; k < table.size(); k += kFields) {
    const int64_t s = table[k], i0 = table[k + 1], i1 = table[k + 2], o0 = table[k + 3], o1 = table[k + 4];
    TORCH_CHECK(s >= 0 && s < num_switches && 0 <= i0 && i0 < i1 && i1 <= g.C_in && 0 <= o0 && o0 < o1 &&
                    o1 <= g.C_out,
                "sliced_conv2d: block ", k / kFields, " (", s, ", ", i0, ", ", i1, ", ", o0, ", ", o1,
                ") is outside ", num_switches, " switches, ", g.C_in, " inputs, ", g.C_out, " outputs");
    TORCH_CHECK(!shared || (i0 == 0 && i1 == g.C_in), "sliced_conv2d: with input_shared every block reads "
                "all ", g.C_in, " input channels, block ", k / kFields, " reads [", i0, ", ", i1, ")");
    for (const Block& other : blocks) {
      const bool outputs_meet = other.o0 < o1 && o0 < other.o1;
      const bool inputs_meet = !shared && other.i0 < i1 && i0 < other.i1;
      TORCH_CHECK(other.s != s || !(outputs_meet || inputs_meet), "sliced_conv2d: blocks of switch ", s,
                  " overlap: sub-networks must own disjoint channels");
    }
    blocks.push_back({s, i0, i1, o0, o1, shared ? 0 : s * g.B, s * g.B});
  }
  return {g, blocks};
}

bool reduced_precision(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// The layout the kernels run in: x's own (channels_last runs the NHWC kernels), no copy of x.
at::MemoryFormat memory_format(const Tensor& x, const Geometry& g) {
  // as paradis_fast/ops/layout.py: dense NHWC that is not also dense NCHW
  if (x.dim() != 4 || !x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.is_contiguous())
    return at::MemoryFormat::Contiguous;
  check_fits_blas(g.B * g.ohw(), "the number of output pixels of one switch (channels_last)");
  return at::MemoryFormat::ChannelsLast;
}

} // namespace

Tensor sliced_conv2d_forward_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 IntArrayRef table, int64_t num_switches, IntArrayRef stride,
                                 IntArrayRef padding, IntArrayRef dilation, bool input_shared) {
  const Problem problem = validate(x, weight, table, num_switches, stride, padding, dilation, input_shared);
  const Geometry& g = problem.g;
  const std::vector<Block>& blocks = problem.blocks;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.C_out, "sliced_conv2d: bias must be [", g.C_out,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "sliced_conv2d: bias is ", bias->scalar_type(),
                " but x is ", x.scalar_type());
  }
  if (reduced_precision(x)) { // BLAS has no half types: compute in float32
    const auto b = has_bias ? std::optional<Tensor>(bias->to(at::kFloat)) : std::nullopt;
    return sliced_conv2d_forward_cpu(x.to(at::kFloat), weight.to(at::kFloat), b, table, num_switches, stride,
                                     padding, dilation, input_shared).to(x.scalar_type());
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "sliced_conv2d: cpu kernel supports floating dtypes, got ", x.scalar_type());
  const at::MemoryFormat format = memory_format(x, g);
  const Tensor xc = x.contiguous(format), wc = weight.contiguous();
  const Tensor bc = has_bias ? bias->contiguous() : Tensor();
  const auto options = xc.options().memory_format(format);
  Tensor y = at::empty({g.S * g.B, g.C_out, g.Ho, g.Wo}, options);
  zero_uncovered(y, g, blocks, false);
  // input_shared: every switch reads the same image, so each output channel is computed once
  // (into a scratch when several switches need it) and copied into the rows of each switch.
  const bool dedupe = input_shared && g.S > 1;
  const Tensor target = dedupe ? at::empty({g.B, g.C_out, g.Ho, g.Wo}, options) : y;
  const std::vector<Block> computed = dedupe ? shared_output_blocks(g, blocks) : blocks;
  if (format == at::MemoryFormat::ChannelsLast) {
    nhwc_forward(xc, wc, bc, target, g, computed);
  } else {
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "sliced_conv2d_forward_cpu", [&] {
      forward_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                               has_bias ? bc.const_data_ptr<scalar_t>() : nullptr,
                               target.mutable_data_ptr<scalar_t>(), g, computed);
    });
  }
  if (dedupe) {
    for (const Block& b : blocks)
      y.narrow(0, b.y0, g.B).narrow(1, b.o0, b.o1 - b.o0).copy_(target.narrow(1, b.o0, b.o1 - b.o0));
  }
  return y;
}

std::tuple<Tensor, Tensor, Tensor> sliced_conv2d_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, IntArrayRef table, int64_t num_switches,
    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, bool input_shared,
    const c10::List<bool>& output_mask) {
  const Problem problem = validate(x, weight, table, num_switches, stride, padding, dilation, input_shared);
  const Geometry& g = problem.g;
  const std::vector<Block>& blocks = problem.blocks;
  TORCH_CHECK(output_mask.size() == 3, "sliced_conv2d: output_mask must have 3 entries, got ",
              output_mask.size());
  const std::vector<int64_t> y_shape{g.S * g.B, g.C_out, g.Ho, g.Wo};
  TORCH_CHECK(grad_y.sizes() == IntArrayRef(y_shape), "sliced_conv2d: grad_y must be ", IntArrayRef(y_shape),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "sliced_conv2d: grad_y is ", grad_y.scalar_type(),
              " but x is ", x.scalar_type());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  if (reduced_precision(x)) { // BLAS has no half types: compute in float32
    auto [gx, gw, gb] = sliced_conv2d_backward_cpu(grad_y.to(at::kFloat), x.to(at::kFloat),
                                                   weight.to(at::kFloat), table, num_switches, stride,
                                                   padding, dilation, input_shared, output_mask);
    const auto back = [&](const Tensor& t) { return t.defined() ? t.to(x.scalar_type()) : t; };
    return {back(gx), back(gw), back(gb)};
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "sliced_conv2d: cpu kernel supports floating dtypes, got ", x.scalar_type());
  const at::MemoryFormat format = memory_format(x, g);
  const Tensor gyc = grad_y.contiguous(format), xc = x.contiguous(format), wc = weight.contiguous();
  Tensor grad_x, grad_w, grad_b;
  if (need_x) {
    grad_x = at::empty(xc.sizes(), xc.options().memory_format(format));
    if (g.pointwise())
      zero_uncovered(grad_x, g, blocks, true); // covered channels are assigned
    else
      grad_x.zero_(); // col2im accumulates
  }
  if (need_w) grad_w = at::zeros(wc.sizes(), wc.options());
  if (need_b) grad_b = at::zeros({g.C_out}, wc.options());
  std::vector<std::vector<Block>> groups; // blocks writing the same grad_x rows and channels
  if (input_shared)
    groups.push_back(blocks);
  else
    for (const Block& b : blocks) groups.push_back({b});
  if (format == at::MemoryFormat::ChannelsLast) {
    nhwc_backward(gyc, xc, wc, grad_x, grad_w, grad_b, g, blocks, groups);
    return {grad_x, grad_w, grad_b};
  }
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "sliced_conv2d_backward_cpu", [&] {
    const scalar_t* gy = gyc.const_data_ptr<scalar_t>();
    if (need_x)
      grad_input_kernel<scalar_t>(gy, wc.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), g,
                                  groups);
    if (need_w || need_b)
      grad_weight_kernel<scalar_t>(gy, xc.const_data_ptr<scalar_t>(),
                                   need_w ? grad_w.mutable_data_ptr<scalar_t>() : nullptr,
                                   need_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr, g, blocks);
  });
  return {grad_x, grad_w, grad_b};
}

TORCH_LIBRARY_IMPL(paradis_C, CPU, m) {
  m.impl("sliced_conv2d_forward", TORCH_FN(sliced_conv2d_forward_cpu));
  m.impl("sliced_conv2d_backward", TORCH_FN(sliced_conv2d_backward_cpu));
}

} // namespace paradis
