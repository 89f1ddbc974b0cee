#include "cpu/narrow_group_conv.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"

#if PARADIS_X86_TARGETS
#include <immintrin.h>
#endif

// Why a kernel of our own: oneDNN runs a grouped 3x3 convolution with 4 or 8 channels per group at
// 30-100 GFLOP/s here, against 150-200 for the dense one of the same width, so the 2x0.5 and
// 4x0.25 switches of a 16-channel layer cost as much as the full one (bench/README.md).
//
// The kernels read the unit's channels 16 at a time: one AVX-512 register holds a pixel's channels
// [16v, 16v + 16), that is G = 16 / S whole groups of S channels. Forward is a dot product over the
// lanes: acc[m] += x * w[m], where lane l of w[m] is W[(group of l) * S + m, l % S, tap]; after the
// 9 taps, the sum of each group's S lanes of acc[m] is output m of that group. Broadcasting x
// instead (the usual direct convolution) is bound by this CPU's one broadcast load per cycle and
// wastes the lanes of other groups. The weight gradient is the same product turned around:
// acc[tap][m] += x[tap] * (grad_y of output m of each lane's group), over all pixels.
namespace paradis {

using at::Tensor;

#if PARADIS_X86_TARGETS
namespace {

constexpr int kLanes = 16;
constexpr int kTaps = 9;
alignas(64) constexpr float kZeroPixel[kLanes] = {};

// A [B, C, H, W] view whose channels are innermost; strides in floats.
struct Image {
  float* data;
  int64_t image, row, pixel, H, W;
};

Image image_of(const Tensor& t) {
  TORCH_CHECK(t.stride(1) == 1, "narrow_group_conv: channels must be innermost (channels_last), got strides ",
              t.strides());
  return {t.data_ptr<float>(), t.stride(0), t.stride(2), t.stride(3), t.size(2), t.size(3)};
}

// Turns S accumulators (lanes: G segments of S partial sums) into one register of the 16 sums:
// each fold halves the segments of two registers and packs both into one,
// permutex2var(a, lo, b) + permutex2var(a, hi, b); `order` then puts output channel c at lane c.
template <int S>
struct FoldPlan {
  static constexpr int kFolds = __builtin_ctz(S);
  alignas(64) int lo[kFolds][kLanes];
  alignas(64) int hi[kFolds][kLanes];
  alignas(64) int order[kLanes];

  FoldPlan() {
    // label = m * kLanes + group: which (output, group) a lane's partial sum belongs to.
    std::vector<std::array<int, kLanes>> label(S);
    for (int m = 0; m < S; ++m)
      for (int l = 0; l < kLanes; ++l) label[m][l] = m * kLanes + l / S;
    for (int f = 0, s = S; f < kFolds; ++f, s /= 2) {
      const int h = s / 2;
      std::vector<std::array<int, kLanes>> next(label.size() / 2);
      for (int l = 0; l < kLanes; ++l) {
        const int from_b = l / 8, e = l % 8, src = (e / h) * s + e % h;
        lo[f][l] = from_b * kLanes + src;
        hi[f][l] = lo[f][l] + h;
        for (size_t q = 0; q < next.size(); ++q) next[q][l] = label[2 * q + from_b][src];
      }
      label = next;
    }
    for (int c = 0; c < kLanes; ++c) {
      const int group = c / S, m = c % S;
      for (int l = 0; l < kLanes; ++l)
        if (label[0][l] == m * kLanes + group) order[c] = l;
    }
  }
};

template <int S>
const FoldPlan<S>& fold_plan() {
  static const FoldPlan<S> plan;
  return plan;
}

#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12 flags _mm512_undefined_ps inside _mm512_permutexvar_ps as uninitialized (it is by design).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int N, int Folds>
__attribute__((always_inline)) inline __m512 fold(const __m512 (&a)[N], const int (*lo)[kLanes],
                                                  const int (*hi)[kLanes]) {
  if constexpr (Folds == 0) {
    return a[0];
  } else {
    const __m512i l = _mm512_load_si512(lo[0]), h = _mm512_load_si512(hi[0]);
    __m512 b[N / 2];
#pragma GCC unroll 16
    for (int q = 0; q < N / 2; ++q)
      b[q] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * q], l, a[2 * q + 1]),
                           _mm512_permutex2var_ps(a[2 * q], h, a[2 * q + 1]));
    return fold<N / 2, Folds - 1>(b, lo + 1, hi + 1);
  }
}

// Outputs [wo0, wo0 + P) of row ho, channels [16v, 16v + 16): x points at image n, channel 16v;
// zero_row stands in for rows outside the image. Interior: no tap of the tile leaves the image
// sideways, so no pixel needs a check.
template <int S, int P, bool Interior>
void forward_tile(const Image& x, const float* img, const float* zero_row, int64_t ho, int64_t wo0,
                  const ConvWindow& win, const float* w, const float* bias, float* out, int64_t out_pixel) {
  __m512 acc[P][S];
#pragma GCC unroll 64
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 64
    for (int m = 0; m < S; ++m) acc[p][m] = _mm512_setzero_ps();
#pragma GCC unroll 3
  for (int i = 0; i < 3; ++i) {
    const int64_t hi = ho * win.sh - win.ph + i;
    const float* row = hi >= 0 && hi < x.H ? img + hi * x.row : zero_row;
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j) {
      __m512 xv[P];
#pragma GCC unroll 64
      for (int p = 0; p < P; ++p) {
        const int64_t wi = (wo0 + p) * win.sw - win.pw + j;
        xv[p] = _mm512_loadu_ps(Interior || (wi >= 0 && wi < x.W) ? row + wi * x.pixel : kZeroPixel);
      }
      const float* wt = w + (i * 3 + j) * S * kLanes;
#pragma GCC unroll 64
      for (int m = 0; m < S; ++m) {
        const __m512 wm = _mm512_loadu_ps(wt + m * kLanes);
#pragma GCC unroll 64
        for (int p = 0; p < P; ++p) acc[p][m] = _mm512_fmadd_ps(xv[p], wm, acc[p][m]);
      }
    }
  }
  const FoldPlan<S>& plan = fold_plan<S>();
  const __m512i order = _mm512_load_si512(plan.order);
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
#pragma GCC unroll 64
  for (int p = 0; p < P; ++p) {
    const __m512 sums = fold<S, FoldPlan<S>::kFolds>(acc[p], plan.lo, plan.hi);
    _mm512_storeu_ps(out + p * out_pixel, _mm512_add_ps(_mm512_permutexvar_ps(order, sums), b));
  }
}

// Adds the products of output row r (r = n * Ho + ho) of grad_y and x, all V channel vectors, to
// part ([V][9][S][16], one chunk's sums): row by row, so both tensors are read in memory order.
// M outputs of each group at a time (M * 9 accumulators).
template <int S>
void grad_weight_row(const Image& x, const Image& gy, const float* zero_row, int64_t r, int64_t V,
                     const ConvWindow& win, float* part) {
  constexpr int M = S == 1 ? 1 : 2;
  alignas(64) int pick[S][kLanes];  // lane l of output m's gradient: output m of l's group
  for (int m = 0; m < S; ++m)
    for (int l = 0; l < kLanes; ++l) pick[m][l] = (l / S) * S + m;
  const int64_t n = r / gy.H, ho = r % gy.H;
  const float* rows[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t hi = ho * win.sh - win.ph + i;
    rows[i] = hi >= 0 && hi < x.H ? x.data + n * x.image + hi * x.row : zero_row;
  }
  const float* gy_row = gy.data + n * gy.image + ho * gy.row;
  for (int64_t v = 0; v < V; ++v) {
    const int64_t c0 = v * kLanes;
    float* pv = part + v * kTaps * S * kLanes;
    for (int mb = 0; mb < S; mb += M) {
      __m512i picks[M];
      __m512 acc[M][kTaps];
#pragma GCC unroll 2
      for (int q = 0; q < M; ++q) {
        picks[q] = _mm512_load_si512(pick[mb + q]);
#pragma GCC unroll 9
        for (int t = 0; t < kTaps; ++t) acc[q][t] = _mm512_loadu_ps(pv + (t * S + mb + q) * kLanes);
      }
      for (int64_t wo = 0; wo < gy.W; ++wo) {
        const __m512 g = _mm512_loadu_ps(gy_row + wo * gy.pixel + c0);
        __m512 gm[M];  // one group channel per group: identity for S == 1
#pragma GCC unroll 2
        for (int q = 0; q < M; ++q) gm[q] = S == 1 ? g : _mm512_permutexvar_ps(picks[q], g);
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) {
          const int64_t wi = wo * win.sw - win.pw + j;
          const bool inside = wi >= 0 && wi < x.W;
#pragma GCC unroll 3
          for (int i = 0; i < 3; ++i) {
            const __m512 xv = _mm512_loadu_ps(inside ? rows[i] + wi * x.pixel + c0 : kZeroPixel);
#pragma GCC unroll 2
            for (int q = 0; q < M; ++q) acc[q][i * 3 + j] = _mm512_fmadd_ps(gm[q], xv, acc[q][i * 3 + j]);
          }
        }
      }
#pragma GCC unroll 2
      for (int q = 0; q < M; ++q)
#pragma GCC unroll 9
        for (int t = 0; t < kTaps; ++t) _mm512_storeu_ps(pv + (t * S + mb + q) * kLanes, acc[q][t]);
    }
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

// The weights as the kernels read them, [V][9][S][16]: lane l of (v, tap, m) is
// W[g * S + m, l % S, tap] with g = v * G + l / S. transpose_flip packs the weights of the
// gradient with respect to the input instead: W'[g * S + a, b, tap] = W[g * S + b, a, 8 - tap].
std::vector<float> pack(const Tensor& weight, int S, bool transpose_flip) {
  const Tensor w = weight.contiguous();
  const float* src = w.data_ptr<float>();
  const int64_t C = w.size(0), V = C / kLanes;
  std::vector<float> packed(V * kTaps * S * kLanes);
  for (int64_t v = 0; v < V; ++v)
    for (int t = 0; t < kTaps; ++t)
      for (int m = 0; m < S; ++m)
        for (int l = 0; l < kLanes; ++l) {
          const int64_t g = v * (kLanes / S) + l / S, c = l % S;
          const int64_t at =
              transpose_flip ? ((g * S + c) * S + m) * kTaps + (kTaps - 1 - t) : ((g * S + m) * S + c) * kTaps + t;
          packed[((v * kTaps + t) * S + m) * kLanes + l] = src[at];
        }
  return packed;
}

// Zeros for the rows above and below an image: a row of x's pixels, `channels` wide each (the
// pixel stride of a one-pixel image can be anything smaller).
std::vector<float> zero_row(const Image& x, int64_t channels) {
  return std::vector<float>((x.W - 1) * x.pixel + channels, 0.f);
}

template <int S>
void forward_impl(const Image& x, const std::vector<float>& w, const float* bias, const Image& y, int64_t B,
                  const ConvWindow& win) {
  // Pixels per tile: P * S accumulators and P loaded pixels within AVX-512's 32 registers (chosen
  // on the Sapphire Rapids host of bench/README.md).
  constexpr int P = S == 1 ? 12 : 24 / S;
  const int64_t V = static_cast<int64_t>(w.size()) / (kTaps * S * kLanes);
  const std::vector<float> zeros = zero_row(x, V * kLanes);
  at::parallel_for(0, B * y.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / y.H, ho = r % y.H;
      for (int64_t v = 0; v < V; ++v) {
        const float* img = x.data + n * x.image + v * kLanes;
        const float* zr = zeros.data() + v * kLanes;
        const float* wv = w.data() + v * kTaps * S * kLanes;
        const float* bv = bias ? bias + v * kLanes : nullptr;
        float* out = y.data + n * y.image + ho * y.row + v * kLanes;
        int64_t wo = 0;
        for (; wo < y.W && wo * win.sw - win.pw < 0; ++wo)
          forward_tile<S, 1, false>(x, img, zr, ho, wo, win, wv, bv, out + wo * y.pixel, y.pixel);
        for (; wo + P <= y.W && (wo + P - 1) * win.sw - win.pw + 2 < x.W; wo += P)
          forward_tile<S, P, true>(x, img, zr, ho, wo, win, wv, bv, out + wo * y.pixel, y.pixel);
        for (; wo < y.W; ++wo) forward_tile<S, 1, false>(x, img, zr, ho, wo, win, wv, bv, out + wo * y.pixel, y.pixel);
      }
    }
  });
}

template <int S>
Tensor grad_weight_impl(const Image& gy, const Image& x, int64_t B, int64_t C, const ConvWindow& win) {
  // A fixed partition of the rows into chunks, summed in order: the same result for any number of
  // threads.
  const int64_t V = C / kLanes, rows = B * gy.H, chunks = std::min<int64_t>(rows, 32);
  const int64_t span = V * kTaps * S * kLanes;
  std::vector<float> parts(chunks * span, 0.f);
  const std::vector<float> zeros = zero_row(x, C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; ++r)
        grad_weight_row<S>(x, gy, zeros.data(), r, V, win, parts.data() + c * span);
  });
  for (int64_t c = 1; c < chunks; ++c)  // into chunk 0, chunk by chunk
    for (int64_t i = 0; i < span; ++i) parts[i] += parts[c * span + i];
  Tensor grad = at::empty({C, S, 3, 3}, at::TensorOptions().dtype(at::kFloat));
  float* out = grad.data_ptr<float>();
  for (int64_t v = 0; v < V; ++v)
    for (int t = 0; t < kTaps; ++t)
      for (int m = 0; m < S; ++m)
        for (int l = 0; l < kLanes; ++l) {
          const int64_t g = v * (kLanes / S) + l / S;
          out[((g * S + m) * S + l % S) * kTaps + t] = parts[((v * kTaps + t) * S + m) * kLanes + l];
        }
  return grad;
}

int64_t group_width(const Tensor& weight, int64_t groups) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(0) == groups * weight.size(1) &&
                  narrow_groups_fit(groups, weight.size(0), weight.size(0)),
              "narrow_group_conv: weight ", weight.sizes(), " (", weight.scalar_type(), ") is not ", groups,
              " groups of 1, 4 or 8 channels, 3x3, float32");
  return weight.size(1);
}

// Calls f with the group width S (1, 4 or 8) as a compile-time constant.
template <typename F>
decltype(auto) with_width(int64_t S, F&& f) {
  if (S == 1) return f(std::integral_constant<int, 1>{});
  if (S == 4) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 8>{});
}

}  // namespace

bool narrow_groups_fit(int64_t groups, int64_t in_width, int64_t out_width) {
  if (groups < 1 || in_width != out_width || in_width % groups != 0 || in_width % kLanes != 0) return false;
  const int64_t width = in_width / groups;
  return (width == 1 || width == 4 || width == 8) && avx512_enabled();
}

bool narrow_groups_fit_grad_input(int64_t groups, int64_t in_width, int64_t out_width, const ConvWindow& win) {
  return narrow_groups_fit(groups, in_width, out_width) && win.sh == 1 && win.sw == 1 && win.ph <= 2 && win.pw <= 2;
}

void narrow_group_conv_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y,
                               int64_t groups, const ConvWindow& win) {
  const int64_t S = group_width(weight, groups);
  const std::vector<float> w = pack(weight, S, false);
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  with_width(S, [&](auto width) { forward_impl<width>(image_of(x), w, bp, image_of(y), x.size(0), win); });
}

void narrow_group_conv_grad_input(const Tensor& grad_y, const Tensor& weight, const Tensor& grad_x, int64_t groups,
                                  const ConvWindow& win) {
  const int64_t S = group_width(weight, groups);
  TORCH_CHECK(narrow_groups_fit_grad_input(groups, weight.size(0), weight.size(0), win),
              "narrow_group_conv: the input gradient needs stride 1 and padding <= 2");
  // The input gradient of a stride-1 convolution is the convolution of grad_y with the
  // transposed, flipped weights and padding 2 - padding.
  const std::vector<float> w = pack(weight, S, true);
  const ConvWindow transposed{1, 1, 2 - win.ph, 2 - win.pw};
  with_width(S, [&](auto width) {
    forward_impl<width>(image_of(grad_y), w, nullptr, image_of(grad_x), grad_y.size(0), transposed);
  });
}

Tensor narrow_group_conv_grad_weight(const Tensor& grad_y, const Tensor& x, int64_t groups, const ConvWindow& win) {
  const int64_t C = x.size(1), S = C / groups;
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad_y.scalar_type() == at::kFloat && narrow_groups_fit(groups, C, C),
              "narrow_group_conv: ", groups, " groups of ", C, " channels (", x.scalar_type(), ") do not fit");
  return with_width(
      S, [&](auto width) { return grad_weight_impl<width>(image_of(grad_y), image_of(x), x.size(0), C, win); });
}

#else

bool narrow_groups_fit(int64_t, int64_t, int64_t) { return false; }

bool narrow_groups_fit_grad_input(int64_t, int64_t, int64_t, const ConvWindow&) { return false; }

void narrow_group_conv_forward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, const ConvWindow&) {
  TORCH_CHECK(false, "narrow_group_conv: this build has no AVX-512 kernels (x86-64 GCC builds only)");
}

void narrow_group_conv_grad_input(const Tensor&, const Tensor&, const Tensor&, int64_t, const ConvWindow&) {
  TORCH_CHECK(false, "narrow_group_conv: this build has no AVX-512 kernels (x86-64 GCC builds only)");
}

Tensor narrow_group_conv_grad_weight(const Tensor&, const Tensor&, int64_t, const ConvWindow&) {
  TORCH_CHECK(false, "narrow_group_conv: this build has no AVX-512 kernels (x86-64 GCC builds only)");
}

#endif  // PARADIS_X86_TARGETS

}  // namespace paradis
