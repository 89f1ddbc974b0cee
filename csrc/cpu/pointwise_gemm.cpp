#include "cpu/pointwise_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdint>
#include <memory>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"

#if PARADIS_X86_TARGETS
#include <immintrin.h>
#endif

// The register tile of every product here: R rows by V vectors of 16 columns, acc[r][v] +=
// broadcast(a(r, k)) * b(k, v) over k. One tile loop serves both products: the forward (and input
// gradient), where a is a row of the input and b the packed weights, and the weight gradient, where
// a is a row of the output gradient read across, b a row of the input, and k runs over pixels.
namespace paradis {

using at::Tensor;

#if PARADIS_X86_TARGETS
namespace {

constexpr int kLanes = 16;
// Tuned on the Sapphire Rapids host of bench/README.md (2 cores, 48 KiB L1d and 2 MiB L2 per core,
// AVX-512), by paired A/B runs of the op; the figures and what was tried are there.
constexpr int kMaxVectors = 4;  // columns of a tile: up to 64
constexpr int64_t kTile = kMaxVectors * kLanes;
constexpr int64_t kTaskRows = 96;            // rows of the forward per task (a multiple of the tiles' rows)
constexpr int64_t kSubRows = 24;             // ... run by every product of a switch in turn (rows read while in L1)
constexpr int64_t kSoloSubRows = 48;         // ... or by a switch's one product (more reuse of each weight panel)
constexpr int64_t kDepth = 64;               // k per pass over a tile: b's 64 x 64 floats stay in L1
constexpr int64_t kPackRows = kSoloSubRows;  // most rows of a copied side by side per pass
constexpr int64_t kMaxChunks = 32;           // the weight gradient's fixed partition of the rows
constexpr int64_t kChunkRows = 512;          // ... into chunks of at least this many rows
constexpr int64_t kMaxPartials = int64_t{1} << 22;  // ... and at most this many partial sums
constexpr int64_t kBand = 48;                       // output rows of a weight-gradient task
constexpr int kAheadTiles = 2;                      // a's rows asked for this many tiles of rows before they are used
constexpr int64_t kFetchStride = 64;                // ... where they are at least this many floats apart
// Outputs larger than this are written with non-temporal stores: they would not stay cached for
// the next op anyway (half that machine's L3), and a normal store first reads each line it writes.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// Rows of a tile of V vectors: R * V accumulators, V loaded vectors and a broadcast in 32 registers.
template <int V>
constexpr int tile_rows() {
  return V == 4 ? 6 : 8;
}

// A row-major float matrix with unit column stride: element (i, j) at data[i * ld + j].
struct Matrix {
  float* data;
  int64_t ld, rows, cols;
};

Matrix matrix_of(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && (t.stride(1) == 1 || t.size(1) <= 1),
              "pointwise_gemm: ", name, " must be a 2-D float32 matrix with unit column stride, got ", t.sizes(), " (",
              t.scalar_type(), ", strides ", t.strides(), ")");
  return {t.data_ptr<float>(), t.stride(0), t.size(0), t.size(1)};
}

void check_block(const GemmBlock& b, const Matrix& in, const Matrix& out, int64_t K, int64_t N) {
  TORCH_CHECK(b.rows >= 0 && b.in_row0 >= 0 && b.out_row0 >= 0 && b.in_row0 + b.rows <= in.rows &&
                  b.out_row0 + b.rows <= out.rows && 0 <= b.k0 && b.k0 < b.k1 && b.k1 <= K && 0 <= b.n0 &&
                  b.n0 < b.n1 && b.n1 <= N,
              "pointwise_gemm: block (rows ", b.in_row0, " -> ", b.out_row0, " x ", b.rows, ", k [", b.k0, ", ", b.k1,
              "), n [", b.n0, ", ", b.n1, ")) is outside in ", in.rows, " x ", K, ", out ", out.rows, " x ", N);
}

// Whether two blocks run over the same rows (blocks of one switch).
bool same_rows(const GemmBlock& a, const GemmBlock& b) {
  return a.in_row0 == b.in_row0 && a.out_row0 == b.out_row0 && a.rows == b.rows;
}

// Asks for `count` floats of each of `rows` rows, `ld` floats apart, to be brought into L2. The tiles
// read short strided streams (8 rows of 256-1024 bytes, then 8 others) that the hardware prefetchers
// lose, so without this the products of the backward waited on memory (bench/README.md). Always
// inlined: out of line, GCC's IPA pure-const pass takes a function that only prefetches for pure and
// drops its calls.
__attribute__((always_inline)) inline void fetch_rows(const float* first, int64_t ld, int64_t rows, int64_t count) {
  for (int64_t r = 0; r < rows; ++r) {
    const auto begin = reinterpret_cast<std::uintptr_t>(first + r * ld), end = begin + count * sizeof(float);
    for (std::uintptr_t line = begin & ~std::uintptr_t{63}; line < end; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
  }
}

__mmask16 tail_mask(int64_t columns) {  // columns in the last vector of a tile, 1..16
  return static_cast<__mmask16>((1u << columns) - 1u);
}

#pragma GCC push_options
#pragma GCC target("avx512f")

// acc[r][v] = start + sum over k < K of a[r * a_r + k * a_k] * b[k * ldb + 16 v, +16), written to
// c + r * ldc + 16 v; start is c itself (accumulate), else init(v), or zero where init is null. The
// last vector of b, init and c is masked by `last`. stream: whole vectors of c (64-byte aligned) go
// out through non-temporal stores.
template <int R, int V>
__attribute__((always_inline)) inline void tile(const float* a, int64_t a_r, int64_t a_k, const float* b, int64_t ldb,
                                                int64_t K, __mmask16 last, const float* init, bool accumulate, float* c,
                                                int64_t ldc, bool stream = false) {
  const auto load = [last](const float* from, int v) {
    return v == V - 1 ? _mm512_maskz_loadu_ps(last, from + v * kLanes) : _mm512_loadu_ps(from + v * kLanes);
  };
  __m512 acc[R][V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const __m512 start = init ? load(init, v) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][v] = accumulate ? load(c + r * ldc, v) : start;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = load(bk, v);
    const float* ak = a + k * a_k;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r * a_r]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      float* to = c + r * ldc + v * kLanes;
      if (stream && (v < V - 1 || last == 0xFFFF))
        _mm512_stream_ps(to, acc[r][v]);
      else if (v == V - 1)
        _mm512_mask_storeu_ps(to, last, acc[r][v]);
      else
        _mm512_storeu_ps(to, acc[r][v]);
    }
}

// Rows [0, rows) of one column tile (up to 64 columns): full tiles of R rows, then single rows.
// Rows of a up to a_rows (past `rows`: the caller's next ones) are fetched kAheadTiles tiles ahead.
template <int V>
void tile_column(const float* a, int64_t a_r, int64_t a_k, const float* b, int64_t ldb, int64_t K, __mmask16 last,
                 const float* init, bool accumulate, float* c, int64_t ldc, int64_t rows, int64_t a_rows, bool stream) {
  constexpr int R = tile_rows<V>();
  constexpr int64_t ahead = kAheadTiles * R;
  stream = stream && reinterpret_cast<std::uintptr_t>(c) % 64 == 0 && ldc % kLanes == 0;
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    if (r + ahead < a_rows) fetch_rows(a + (r + ahead) * a_r, a_r, std::min<int64_t>(R, a_rows - r - ahead), K);
    tile<R, V>(a + r * a_r, a_r, a_k, b, ldb, K, last, init, accumulate, c + r * ldc, ldc, stream);
  }
  for (; r < rows; ++r) tile<1, V>(a + r * a_r, a_r, a_k, b, ldb, K, last, init, accumulate, c + r * ldc, ldc, stream);
}

#pragma GCC pop_options

// c[r, j] = init[j] + sum_k a(r, k) * b(k, j) for r < rows, j < columns (init null: zero), where
// b(k, j) = b[j / 64 * b_tile + k * ldb + j % 64]: k in passes of kDepth, each over column tiles of
// 64 and then rows. Either a's rows are k-contiguous (a_k == 1: the forward and input gradient),
// a_rows of them exist and are fetched tiles ahead; or a is read across (a_r == 1: the weight
// gradient, k over rows of a and of b, whose k-rows are contiguous), and each pass fetches the next
// pass's rows of both. Only where a's rows are kFetchStride or more floats apart: on narrower
// layers the hardware keeps up and the prefetches only cost.
void product(const float* a, int64_t a_r, int64_t a_k, const float* b, int64_t ldb, int64_t b_tile, int64_t K,
             const float* init, bool accumulate, float* c, int64_t ldc, int64_t rows, int64_t columns, int64_t a_rows,
             bool stream = false) {
  // Where several column tiles read the same rows of a (unit k stride), each pass copies its piece
  // of them side by side: rows of a may be a multiple of 4 KiB apart, all in one L1 set.
  const bool pack_a = columns > kTile && a_k == 1 && rows <= kPackRows;
  alignas(64) float a_pack[kPackRows * kDepth];
  for (int64_t k = 0; k < K; k += kDepth) {
    const int64_t depth = std::min(kDepth, K - k);
    if (a_k >= kFetchStride && k + kDepth < K) {  // the weight gradient of a wide layer
      const int64_t next = std::min(kDepth, K - k - kDepth);
      fetch_rows(a + (k + kDepth) * a_k, a_k, next, rows);
      fetch_rows(b + (k + kDepth) * ldb, ldb, next, columns);
    }
    const float* ak = a + k * a_k;
    int64_t ar = a_r;
    if (pack_a) {
      for (int64_t r = 0; r < rows; ++r) std::copy(ak + r * a_r, ak + r * a_r + depth, a_pack + r * kDepth);
      ak = a_pack;
      ar = kDepth;
    }
    // Packed rows are already in L1.
    const int64_t ahead = pack_a || a_k != 1 || a_r < kFetchStride ? 0 : a_rows;
    for (int64_t j = 0; j < columns; j += kTile) {
      const int64_t left = std::min<int64_t>(columns - j, kTile);
      const int V = static_cast<int>((left + kLanes - 1) / kLanes);
      const __mmask16 last = tail_mask(left - (V - 1) * kLanes);
      const float* bj = b + j / kTile * b_tile + k * ldb;
      const float* ij = init ? init + j : nullptr;
      float* cj = c + j;
      const bool acc = accumulate || k > 0;
      const bool nt = stream && k + kDepth >= K;
      switch (V) {
        case 1:
          tile_column<1>(ak, ar, a_k, bj, ldb, depth, last, ij, acc, cj, ldc, rows, ahead, nt);
          break;
        case 2:
          tile_column<2>(ak, ar, a_k, bj, ldb, depth, last, ij, acc, cj, ldc, rows, ahead, nt);
          break;
        case 3:
          tile_column<3>(ak, ar, a_k, bj, ldb, depth, last, ij, acc, cj, ldc, rows, ahead, nt);
          break;
        default:
          tile_column<4>(ak, ar, a_k, bj, ldb, depth, last, ij, acc, cj, ldc, rows, ahead, nt);
          break;
      }
    }
  }
}

// The products that pointwise_gemm runs: each block alone, except that narrow neighbours (the
// same rows, adjoining inputs and outputs) whose outputs fit one vector together run as one
// block-diagonal product: as many FMAs, but whole vectors and cache lines stored, not masked pieces.
struct Product {
  GemmBlock span;
  size_t first, last;
};

std::vector<Product> products_of(const std::vector<GemmBlock>& blocks) {
  std::vector<Product> out;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const GemmBlock& b = blocks[i];
    if (!out.empty()) {
      GemmBlock& s = out.back().span;
      if (same_rows(s, b) && s.k1 == b.k0 && s.n1 == b.n0 && b.n1 - s.n0 <= kLanes) {
        s.k1 = b.k1;
        s.n1 = b.n1;
        out.back().last = i + 1;
        continue;
      }
    }
    out.push_back({b, i, i + 1});
  }
  return out;
}

// Each product's slice of m as the tiles read it: one [K][64] panel per column tile, zero-padded (rows
// of a panel 256 bytes apart: m's own rows may be a multiple of 4 KiB apart, all in one L1 set),
// each block's entries of m and zeros around them (a product of several blocks is block-diagonal);
// and its bias, zero-padded to whole tiles. Filled in parallel, one panel per task.
struct Packed {
  std::unique_ptr<float[]> m;
  std::vector<float> bias;
};

std::vector<Packed> pack(const Tensor& m, const Tensor& bias, const std::vector<GemmBlock>& blocks,
                         const std::vector<Product>& products) {
  std::vector<Packed> packed(products.size());
  std::vector<std::pair<size_t, int64_t>> panels;  // (product, column tile)
  for (size_t i = 0; i < products.size(); ++i) {
    const GemmBlock& s = products[i].span;
    const int64_t tiles = (s.n1 - s.n0 + kTile - 1) / kTile;
    packed[i].m.reset(new float[tiles * (s.k1 - s.k0) * kTile]);
    for (int64_t t = 0; t < tiles; ++t) panels.push_back({i, t});
    if (bias.defined()) {
      const auto bs = bias.accessor<float, 1>();
      packed[i].bias.assign(tiles * kTile, 0.f);
      for (int64_t n = s.n0; n < s.n1; ++n) packed[i].bias[n - s.n0] = bs[n];
    }
  }
  const float* src = m.data_ptr<float>();
  const int64_t sk = m.stride(0), sn = m.stride(1);
  at::parallel_for(0, static_cast<int64_t>(panels.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const auto [i, t] = panels[q];
      const GemmBlock& s = products[i].span;
      const int64_t K = s.k1 - s.k0, first = s.n0 + t * kTile, stop = std::min(s.n1, first + kTile);
      float* panel = packed[i].m.get() + t * K * kTile;
      std::fill(panel, panel + K * kTile, 0.f);
      for (size_t j = products[i].first; j < products[i].last; ++j) {
        const GemmBlock& b = blocks[j];
        const int64_t n0 = std::max(b.n0, first), n1 = std::min(b.n1, stop);
        const auto put = [&](int64_t k, int64_t n) { panel[(k - s.k0) * kTile + n - first] = src[k * sk + n * sn]; };
        if (sn == 1) {  // along m's rows or columns, whichever are contiguous
          for (int64_t k = b.k0; k < b.k1; ++k)
            for (int64_t n = n0; n < n1; ++n) put(k, n);
        } else {
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t k = b.k0; k < b.k1; ++k) put(k, n);
        }
      }
    }
  });
  return packed;
}

// The chunks of the weight gradient's fixed row partition, a function of the block's shape only:
// chunks of at least kChunkRows rows (a chunk's rows of x and grad_y stay in L2 while every band of
// output rows reads them).
int64_t chunks_of(const GemmBlock& b, int64_t padded_k) {
  const int64_t by_rows = std::max<int64_t>(1, b.rows / kChunkRows);
  const int64_t by_memory = std::max<int64_t>(1, kMaxPartials / ((b.n1 - b.n0) * padded_k));
  return std::min({kMaxChunks, by_rows, by_memory});
}

}  // namespace

bool pointwise_gemm_enabled() { return avx512_enabled(); }

void pointwise_gemm(const Tensor& in, const Tensor& m, const Tensor& bias, const Tensor& out,
                    const std::vector<GemmBlock>& blocks) {
  TORCH_CHECK(pointwise_gemm_enabled(), "pointwise_gemm: needs AVX-512F (and PARADIS_CPU_ISA not baseline)");
  const Matrix x = matrix_of(in, "in"), y = matrix_of(out, "out");
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kFloat && m.size(0) == x.cols && m.size(1) == y.cols,
              "pointwise_gemm: m must be float32 [", x.cols, ", ", y.cols, "], got ", m.sizes(), " (", m.scalar_type(),
              ")");
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == y.cols && bias.scalar_type() == at::kFloat),
              "pointwise_gemm: bias must be float32 [", y.cols, "]");
  for (const GemmBlock& b : blocks) check_block(b, x, y, x.cols, y.cols);
  const std::vector<Product> products = products_of(blocks);
  const std::vector<Packed> packed = pack(m, bias, blocks, products);
  // Tasks of kTaskRows rows of a run of products over the same rows (a switch's sub-networks): a
  // task runs every product of its run on its rows, so each row of out is written while hot. Each
  // thread takes a contiguous range of tasks of about equal work (a product weighs K * N per row).
  std::vector<size_t> task_first, task_last;  // products of each task's run
  std::vector<int64_t> task_row, work{0};     // its first row in the run, and the work up to each task
  for (size_t i = 0; i < products.size();) {
    const GemmBlock& head = products[i].span;
    size_t j = i;
    int64_t weight = 0;
    for (; j < products.size() && same_rows(products[j].span, head); ++j)
      weight += (products[j].span.k1 - products[j].span.k0 + kLanes) * (products[j].span.n1 - products[j].span.n0);
    for (int64_t r = 0; r < head.rows; r += kTaskRows) {
      task_first.push_back(i);
      task_last.push_back(j);
      task_row.push_back(r);
      work.push_back(work.back() + weight * std::min(kTaskRows, head.rows - r));
    }
    i = j;
  }
  int64_t written = 0;
  for (const Product& p : products) written += p.span.rows * (p.span.n1 - p.span.n0) * sizeof(float);
  const bool stream = written > kStreamBytes;
  const int64_t parts = at::get_num_threads();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    const auto task_at = [&](int64_t part) {
      return std::lower_bound(work.begin(), work.end() - 1, work.back() * part / parts) - work.begin();
    };
    for (int64_t t = task_at(begin); t < task_at(end); ++t) {
      const int64_t sub_rows = task_last[t] - task_first[t] > 1 ? kSubRows : kSoloSubRows;
      const int64_t rows = std::min(kTaskRows, products[task_first[t]].span.rows - task_row[t]);
      for (int64_t s = 0; s < rows; s += sub_rows)
        for (size_t i = task_first[t]; i < task_last[t]; ++i) {
          const GemmBlock& b = products[i].span;
          const Packed& p = packed[i];
          const int64_t r0 = task_row[t] + s;
          product(x.data + (b.in_row0 + r0) * x.ld + b.k0, x.ld, 1, p.m.get(), kTile, (b.k1 - b.k0) * kTile,
                  b.k1 - b.k0, p.bias.empty() ? nullptr : p.bias.data(), false,
                  y.data + (b.out_row0 + r0) * y.ld + b.n0, y.ld, std::min(sub_rows, rows - s), b.n1 - b.n0,
                  b.rows - r0, stream);
        }
    }
    _mm_sfence();
  });
}

void pointwise_gemm_grad_weight(const Tensor& in, const Tensor& grad_out, const Tensor& grad_w,
                                const std::vector<GemmBlock>& blocks) {
  TORCH_CHECK(pointwise_gemm_enabled(), "pointwise_gemm: needs AVX-512F (and PARADIS_CPU_ISA not baseline)");
  const Matrix x = matrix_of(in, "in"), gy = matrix_of(grad_out, "grad_out"), gw = matrix_of(grad_w, "grad_w");
  TORCH_CHECK(gw.rows == gy.cols && gw.cols == x.cols, "pointwise_gemm: grad_w must be [", gy.cols, ", ", x.cols,
              "], got ", grad_w.sizes());
  for (const GemmBlock& b : blocks) check_block(b, x, gy, x.cols, gy.cols);
  for (const GemmBlock& b : blocks) {
    if (b.rows == 0) continue;
    const int64_t N = b.n1 - b.n0, K = b.k1 - b.k0, ld = (K + kLanes - 1) / kLanes * kLanes;
    const int64_t bands = (N + kBand - 1) / kBand, chunks = chunks_of(b, ld);
    // Tasks: (chunk, band of output rows), each summing its rows in order; one chunk adds straight
    // into grad_w, several write partial sums, added up in chunk order.
    std::vector<float> partial(chunks > 1 ? chunks * N * ld : 0);
    at::parallel_for(0, chunks * bands, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t / bands, n = t % bands * kBand;
        const int64_t p0 = b.rows * c / chunks, p1 = b.rows * (c + 1) / chunks;
        float* to = chunks > 1 ? partial.data() + (c * N + n) * ld : gw.data + (b.n0 + n) * gw.ld + b.k0;
        product(gy.data + (b.out_row0 + p0) * gy.ld + b.n0 + n, 1, gy.ld, x.data + (b.in_row0 + p0) * x.ld + b.k0, x.ld,
                kTile, p1 - p0, nullptr, chunks == 1, to, chunks > 1 ? ld : gw.ld, std::min(kBand, N - n), K, 0);
      }
    });
    if (chunks == 1) continue;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        float* to = gw.data + (b.n0 + n) * gw.ld + b.k0;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* from = partial.data() + (c * N + n) * ld;
          for (int64_t k = 0; k < K; ++k) to[k] += from[k];
        }
      }
    });
  }
}

#else

bool pointwise_gemm_enabled() { return false; }

void pointwise_gemm(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::vector<GemmBlock>&) {
  TORCH_CHECK(false, "pointwise_gemm: this build has no AVX-512 kernels (x86-64 GCC builds only)");
}

void pointwise_gemm_grad_weight(const Tensor&, const Tensor&, const Tensor&, const std::vector<GemmBlock>&) {
  TORCH_CHECK(false, "pointwise_gemm: this build has no AVX-512 kernels (x86-64 GCC builds only)");
}

#endif  // PARADIS_X86_TARGETS

}  // namespace paradis
