#include "cpu/depthwise_conv2d.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "layout.h"
#include "cpu/isa.h"
#include "cpu/parallel_grain.h"
#include "cpu/narrow_group_conv.h"

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;

// Channels a kernel call sums at once (a few vector registers of float32).
constexpr int64_t kBlock = 64;

// Output images of at most this many pixels take the own low-precision forward (see below).
constexpr int64_t kOwnForwardPixels = 4;

// A channels-innermost [images, C, height, width] tensor: the address of a pixel's channel 0.
template <typename T>
struct Image {
  const T* data;
  int64_t images, height, width, image_stride, row_stride, pixel_stride;
  explicit Image(const Tensor& t)
      : data(t.const_data_ptr<T>()),
        images(t.size(0)),
        height(t.size(2)),
        width(t.size(3)),
        image_stride(t.stride(0)),
        row_stride(t.stride(2)),
        pixel_stride(t.stride(3)) {}
  const T* at(int64_t b, int64_t h, int64_t w) const {
    return data + b * image_stride + h * row_stride + w * pixel_stride;
  }
};

// The kernel window: kh x kw taps, stride, padding, dilation.
struct Taps {
  int64_t h, w, sh, sw, ph, pw, dh, dw;
};

// Multiversioning as in switch_batch_norm.cpp: the kernels compiled for baseline x86-64 and again
// for AVX2 + FMA; on_isa(kernel(...)) calls the copy the CPU takes.
namespace baseline {
#include "cpu/depthwise_kernels.inc"
}  // namespace baseline

#if PARADIS_X86_TARGETS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/depthwise_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#define on_isa(...) (avx2_fma_enabled() ? avx2::__VA_ARGS__ : baseline::__VA_ARGS__)
#else
#define on_isa(...) baseline::__VA_ARGS__
#endif

bool is_low_precision(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// Whether ATen's CPU convolutions of this dtype run on oneDNN. Where they do not (oneDNN off or
// absent, float64, bfloat16 / float16 without the CPU's units for them) a depthwise convolution
// runs one small convolution per channel (about 30x slower than these kernels: bench/README.md),
// and bfloat16 / float16 ones also round their partial sums to the dtype.
bool onednn_computes(at::ScalarType dtype) {
  if (!at::globalContext().userEnabledMkldnn() || !at::hasMKLDNN()) return false;
  if (dtype == at::kFloat) return true;
  return is_low_precision(dtype) && low_precision_native(dtype == at::kBFloat16);
}

// Where the (dilated) kernel is larger than the image, in either dimension, oneDNN's weight
// gradient falls to a path 20-230x slower than depthwise_grad_weight (MobileNet's deep layers on
// small inputs: 2x2 and 1x1 maps under 3x3 kernels); on larger images it is as fast or faster
// (bench/README.md).
bool image_smaller_than_kernel(const Tensor& x, const Taps& k) {
  return x.size(2) < (k.h - 1) * k.dh + 1 || x.size(3) < (k.w - 1) * k.dw + 1;
}

// The weight gradient [C, 1, kh, kw] of channels-innermost grad_y and x, each (tap, block of
// channels) summed by one thread in a fixed order: the same result on every run and thread count.
Tensor depthwise_grad_weight(const Tensor& grad_y, const Tensor& x, IntArrayRef weight_sizes, const Taps& k) {
  const int64_t C = x.size(1), taps = k.h * k.w, blocks = (C + kBlock - 1) / kBlock;
  Tensor out = at::empty(weight_sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "depthwise_conv2d_grad_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Image<scalar_t> gy_image(grad_y), x_image(x);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t work = taps * grad_y.numel();  // multiply-adds
    at::parallel_for(0, taps * blocks, grain_for(taps * blocks, work), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t tap = item % taps, c0 = item / taps * kBlock, width = std::min(kBlock, C - c0);
        on_isa(grad_weight_tap<scalar_t, acc_t>(gy_image, x_image, k, tap, c0, width, o));
      }
    });
  });
  return out;
}

// weight [C, 1, kh, kw] in Acc, per block of kBlock channels, tap-major: the layout the row
// kernels read (channels past C zero).
template <typename T, typename Acc>
std::vector<Acc> packed_taps(const Tensor& weight, int64_t blocks) {
  const int64_t C = weight.size(0), taps = weight.size(2) * weight.size(3);
  std::vector<Acc> w(blocks * taps * kBlock, Acc(0));
  const Tensor wc = weight.contiguous();
  const T* wd = wc.const_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t tap = 0; tap < taps; ++tap)
      w[(c / kBlock * taps + tap) * kBlock + c % kBlock] = static_cast<Acc>(wd[c * taps + tap]);
  return w;
}

// The input gradient, channels_last, of channels-innermost grad_y: each (input row, block of
// channels) by one thread, every input pixel summing its taps in a fixed order.
Tensor depthwise_grad_input(const Tensor& grad_y, const Tensor& weight, IntArrayRef x_sizes, const Taps& k) {
  const int64_t B = x_sizes[0], C = x_sizes[1], H = x_sizes[2], W = x_sizes[3];
  const int64_t taps = k.h * k.w, blocks = (C + kBlock - 1) / kBlock;
  Tensor out = at::empty(x_sizes, grad_y.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "depthwise_conv2d_grad_input", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> w = packed_taps<scalar_t, acc_t>(weight, blocks);
    const Image<scalar_t> gy_image(grad_y);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t work = taps * out.numel();
    at::parallel_for(0, B * H * blocks, grain_for(B * H * blocks, work), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item % blocks, row = item / blocks, c0 = block * kBlock;
        on_isa(grad_input_row<scalar_t, acc_t>(gy_image, k, w.data() + block * taps * kBlock, row / H, row % H, c0,
                                               std::min(kBlock, C - c0), o + row * W * C, C, W));
      }
    });
  });
  return out;
}

// The forward, channels_last, of channels-innermost x: each (output row, block of channels) by
// one thread, sums in float32 for bfloat16 / float16, taps in a fixed order.
Tensor depthwise_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Taps& k,
                         int64_t Ho, int64_t Wo) {
  const int64_t B = x.size(0), C = x.size(1), taps = k.h * k.w, blocks = (C + kBlock - 1) / kBlock;
  Tensor out = at::empty({B, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "depthwise_conv2d_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> w = packed_taps<scalar_t, acc_t>(weight, blocks);
    std::vector<acc_t> b(blocks * kBlock, acc_t(0));
    if (bias.has_value() && bias->defined()) {
      const Tensor bc = bias->contiguous();
      const scalar_t* bd = bc.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) b[c] = static_cast<acc_t>(bd[c]);
    }
    const Image<scalar_t> x_image(x);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t work = taps * out.numel();
    at::parallel_for(0, B * Ho * blocks, grain_for(B * Ho * blocks, work), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item % blocks, row = item / blocks, c0 = block * kBlock;
        on_isa(forward_row<scalar_t, acc_t>(x_image, k, w.data() + block * taps * kBlock, b.data() + c0, row / Ho,
                                            row % Ho, c0, std::min(kBlock, C - c0), o + row * Wo * C, C, Wo));
      }
    });
  });
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> depthwise_conv2d_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                                 const Tensor& weight, IntArrayRef stride,
                                                                 IntArrayRef padding, IntArrayRef dilation,
                                                                 const c10::List<bool>& output_mask) {
  TORCH_CHECK(x.dim() == 4 && grad_y.dim() == 4, "depthwise_conv2d: x and grad_y must be 4-D [B, C, H, W], got ",
              x.sizes(), " and ", grad_y.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
              "depthwise_conv2d: weight must be [C, 1, kh, kw] with C = ", C, " (x's channels), got ", weight.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "depthwise_conv2d: x, grad_y and weight must share a dtype, got ", x.scalar_type(), ", ",
              grad_y.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && output_mask.size() == 3,
              "depthwise_conv2d: stride, padding and dilation need 2 entries, output_mask 3");
  TORCH_CHECK(grad_y.size(0) == x.size(0) && grad_y.size(1) == C, "depthwise_conv2d: grad_y ", grad_y.sizes(),
              " does not match x ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  const Taps k{weight.size(2), weight.size(3), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  const bool low_precision = is_low_precision(dtype);
  // Without oneDNN computing the dtype all three gradients come from here (see onednn_computes).
  const bool all_own = !onednn_computes(dtype);
  const bool narrow = output_mask[1] && dtype == at::kFloat && channels_innermost(x) && channels_innermost(grad_y) &&
                      k.h == 3 && k.w == 3 && k.dh == 1 && k.dw == 1 && narrow_groups_fit(C, C, C);
  const bool own_grad_w = output_mask[1] && !narrow && (all_own || image_smaller_than_kernel(x, k));
  const bool own_grad_x = output_mask[0] && (all_own || (low_precision && (k.sh > 1 || k.sw > 1)));
  const bool own_grad_b = output_mask[2] && all_own;
  const std::array<bool, 3> aten_mask{output_mask[0] && !own_grad_x, output_mask[1] && !narrow && !own_grad_w,
                                      output_mask[2] && !own_grad_b};
  Tensor grad_x, grad_w, grad_b;
  if (aten_mask[0] || aten_mask[1] || aten_mask[2])
    std::tie(grad_x, grad_w, grad_b) = at::convolution_backward(grad_y, x, weight, IntArrayRef{C}, stride, padding,
                                                                dilation, false, {0, 0}, C, aten_mask);
  if (narrow) grad_w = narrow_group_conv_grad_weight(grad_y, x, C, {k.sh, k.sw, k.ph, k.pw}).to(weight.options());
  // channels innermost, the layout the kernels read (a copy of small images costs little)
  const Tensor grad_y_cl = own_grad_w || own_grad_x ? grad_y.contiguous(at::MemoryFormat::ChannelsLast) : Tensor();
  if (own_grad_w)
    grad_w = depthwise_grad_weight(grad_y_cl, x.contiguous(at::MemoryFormat::ChannelsLast), weight.sizes(), k);
  if (own_grad_x) grad_x = depthwise_grad_input(grad_y_cl, weight, x.sizes(), k).contiguous(x.suggest_memory_format());
  if (own_grad_b) grad_b = grad_y.sum({0, 2, 3}, false, at::toOpMathType(dtype)).to(dtype);
  return {grad_x, grad_w, grad_b};
}

Tensor depthwise_conv2d_forward_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "depthwise_conv2d: x must be 4-D [B, C, H, W] and weight [C, 1, kh, kw], got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "depthwise_conv2d: stride, padding and dilation need 2 entries");
  const at::ScalarType dtype = x.scalar_type();
  const bool same_dtypes =
      weight.scalar_type() == dtype && (!bias.has_value() || !bias->defined() || bias->scalar_type() == dtype);
  const Taps k{weight.size(2), weight.size(3), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  const int64_t Ho = (x.size(2) + 2 * k.ph - k.dh * (k.h - 1) - 1) / k.sh + 1;
  const int64_t Wo = (x.size(3) + 2 * k.pw - k.dw * (k.w - 1) - 1) / k.sw + 1;
  // Where oneDNN does not compute the dtype (see onednn_computes), and bfloat16 / float16 outputs
  // of at most kOwnForwardPixels, where oneDNN's fixed costs outweigh the arithmetic (1.8-4.4x
  // slower than this kernel; on larger images oneDNN's is faster: bench/README.md)
  const bool own = same_dtypes && Ho >= 1 && Wo >= 1 &&
                   (!onednn_computes(dtype) || (is_low_precision(dtype) && Ho * Wo <= kOwnForwardPixels));
  if (!own)  // ATen's, which also reports mismatched dtypes and images smaller than the kernel
    return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, x.size(1));
  return depthwise_forward(x.contiguous(at::MemoryFormat::ChannelsLast), weight, bias, k, Ho, Wo)
      .contiguous(x.suggest_memory_format());
}

TORCH_LIBRARY_IMPL(paradis, CPU, m) {
  m.impl("depthwise_conv2d", TORCH_FN(depthwise_conv2d_forward_cpu));
  m.impl("depthwise_conv2d_backward", TORCH_FN(depthwise_conv2d_backward_cpu));
}

}  // namespace paradis
