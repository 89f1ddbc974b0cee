// Checks the CPU sliced convolution kernels (NCHW and channels_last inputs) against a naive loop of
// at::conv2d per (switch, sub-network) block in double (gradients by autograd), directly and
// through the dispatcher, and that bad block tables are rejected.
#include "cpu/sliced_conv2d.h"
#include "expect.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

using at::Tensor;

namespace {

struct Case {
  std::string name;
  int64_t switches, batch, c_in, c_out, kernel, size, stride, padding, dilation;
  bool shared;
  std::vector<int64_t> blocks;  // (switch, in_start, in_stop, out_start, out_stop) per block
};

struct Result {
  Tensor y, grad_x, grad_w, grad_b;
};

Tensor grad_or_zeros(const Tensor& t) { return t.grad().defined() ? t.grad() : at::zeros_like(t); }

// The op's definition in double: y[s][:, out] = conv2d(x[s][:, in], weight[out, in]) + bias[out].
Result reference(const Case& c, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& grad_y) {
  const Tensor xd = x.to(at::kDouble).requires_grad_();
  const Tensor wd = w.to(at::kDouble).requires_grad_();
  const Tensor bd = b.to(at::kDouble).requires_grad_();
  std::vector<Tensor> rows(c.switches);
  const int64_t out_size = (c.size + 2 * c.padding - c.dilation * (c.kernel - 1) - 1) / c.stride + 1;
  for (int64_t s = 0; s < c.switches; ++s) rows[s] = at::zeros({c.batch, c.c_out, out_size, out_size}, xd.options());
  for (size_t k = 0; k < c.blocks.size(); k += 5) {
    const int64_t s = c.blocks[k], i0 = c.blocks[k + 1], i1 = c.blocks[k + 2], o0 = c.blocks[k + 3],
                  o1 = c.blocks[k + 4];
    const Tensor xs = (c.shared ? xd : xd.narrow(0, s * c.batch, c.batch)).narrow(1, i0, i1 - i0);
    const Tensor part = at::conv2d(xs, wd.narrow(0, o0, o1 - o0).narrow(1, i0, i1 - i0), bd.narrow(0, o0, o1 - o0),
                                   c.stride, c.padding, c.dilation);
    std::vector<Tensor> pieces{rows[s].narrow(1, 0, o0), part, rows[s].narrow(1, o1, c.c_out - o1)};
    rows[s] = at::cat(pieces, 1);
  }
  const Tensor y = at::cat(rows, 0);
  y.backward(grad_y.to(at::kDouble));
  return {y.detach(), grad_or_zeros(xd), grad_or_zeros(wd), grad_or_zeros(bd)};
}

void run(const Case& c, at::ScalarType dtype, at::MemoryFormat format) {
  const bool nhwc = format == at::MemoryFormat::ChannelsLast;
  const std::string tag = c.name + (dtype == at::kFloat ? " f32" : " f64") + (nhwc ? " nhwc" : " nchw");
  const double tol = dtype == at::kFloat ? 1e-3 : 1e-10;
  const auto opts = at::TensorOptions().dtype(dtype);
  const Tensor x =
      at::randn({c.shared ? c.batch : c.switches * c.batch, c.c_in, c.size, c.size}, opts).contiguous(format);
  const Tensor w = at::randn({c.c_out, c.c_in, c.kernel, c.kernel}, opts);
  const Tensor b = at::randn({c.c_out}, opts);
  const std::vector<int64_t> geometry_stride{c.stride, c.stride}, padding{c.padding, c.padding},
      dilation{c.dilation, c.dilation};
  const Tensor y =
      paradis::sliced_conv2d_forward_cpu(x, w, b, c.blocks, c.switches, geometry_stride, padding, dilation, c.shared);
  const Tensor grad_y = at::randn(y.sizes(), opts);
  const auto [gx, gw, gb] =
      paradis::sliced_conv2d_backward_cpu(grad_y, x, w, c.blocks, c.switches, geometry_stride, padding, dilation,
                                          c.shared, c10::List<bool>({true, true, true}));
  const Result want = reference(c, x, w, b, grad_y);
  expect(y.is_contiguous(format) && gx.is_contiguous(format), tag + ": y and grad x not in the layout of x");
  expect_close(y, want.y, tol, tag + ": forward");
  expect_close(gx, want.grad_x, tol, tag + ": grad x");
  expect_close(gw, want.grad_w, tol, tag + ": grad weight");
  expect_close(gb, want.grad_b, tol, tag + ": grad bias");

  static auto forward_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("paradis::sliced_conv2d", "")
          .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef, int64_t,
                        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool)>();
  const Tensor y_dispatched =
      forward_op.call(x, w, b, c.blocks, c.switches, geometry_stride, padding, dilation, c.shared);
  expect(at::equal(y_dispatched, y), tag + ": dispatcher result differs from the direct call");
}

void check_rejects(const std::vector<int64_t>& blocks, const std::string& needle) {
  const Tensor x = at::randn({2, 4, 5, 5}), w = at::randn({6, 4, 1, 1});
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  try {
    paradis::sliced_conv2d_forward_cpu(x, w, std::nullopt, blocks, 1, one, zero, one, false);
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos,
           "message lacks '" + needle + "': " + e.what_without_backtrace());
    return;
  }
  expect(false, "block table accepted, expected '" + needle + "'");
}

// Switch 0 split into one-channel sub-networks: block (0, c, c + 1, c, c + 1) for every channel.
std::vector<int64_t> one_channel_blocks(int64_t channels) {
  std::vector<int64_t> blocks;
  for (int64_t c = 0; c < channels; ++c) blocks.insert(blocks.end(), {0, c, c + 1, c, c + 1});
  return blocks;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      // 1x1.0, 2x0.5, 4x0.25 over 8 -> 12 channels; channels_last runs a GEMM per block (<= 16 pixels)
      {"pointwise small image", 3, 2, 8, 12, 1, 4, 1, 0, 1, false, {0, 0, 8,  0, 12, 1, 0, 4, 0, 6, 1, 4,
                                                                    8, 6, 12, 2, 0,  2, 0, 3, 2, 2, 4, 3,
                                                                    6, 2, 4,  6, 6,  9, 2, 6, 8, 9, 12}},
      // the same on one-pixel images: GEMMs in either layout
      {"pointwise one-pixel image", 3, 2, 8, 12, 1, 1, 1, 0, 1, false, {0, 0, 8,  0, 12, 1, 0, 4, 0, 6, 1, 4,
                                                                        8, 6, 12, 2, 0,  2, 0, 3, 2, 2, 4, 3,
                                                                        6, 2, 4,  6, 6,  9, 2, 6, 8, 9, 12}},
      // 0.3+0.7 and a narrow 1x0.5, images large enough for in-place one-sample tiles
      {"pointwise large image", 2, 2, 10, 7, 1, 17, 1, 0, 1, false, {0, 0, 3, 0, 2, 0, 3, 10, 2, 7, 1, 0, 5, 0, 4}},
      // nhwc f32 on AVX-512: the pointwise GEMM kernels. 150 -> 140 channels (several passes over k,
      // column tiles with a masked tail, single-row leftovers); 8x0.125 of 24 -> 16 (3 -> 2 channel
      // blocks merged into one block-diagonal product)
      {"pointwise wide", 2, 2, 150, 140, 1, 5, 1, 0, 1, false, {0, 0,  150, 0,  140, 1, 0,   75,  0,   70,
                                                                1, 75, 113, 70, 105, 1, 113, 150, 105, 140}},
      {"pointwise narrow blocks", 1, 3, 24, 16, 1, 6, 1, 0, 1, false, {0, 0,  3,  0,  2,  0, 3,  6,  2,  4,
                                                                       0, 6,  9,  4,  6,  0, 9,  12, 6,  8,
                                                                       0, 12, 15, 8,  10, 0, 15, 18, 10, 12,
                                                                       0, 18, 21, 12, 14, 0, 21, 24, 14, 16}},
      {"pointwise 2x2 image, unequal",
       2,
       3,
       10,
       7,
       1,
       2,
       1,
       0,
       1,
       false,
       {0, 0, 3, 0, 2, 0, 3, 10, 2, 7, 1, 0, 5, 0, 4}},
      // the stride grid gathered into a stride-1 layer: 9x9 -> 5x5 (our kernels), 7x7 -> 4x4 (BLAS)
      {"pointwise stride 2", 2, 3, 10, 7, 1, 9, 2, 0, 1, false, {0, 0, 3, 0, 2, 0, 3, 10, 2, 7, 1, 0, 5, 0, 4}},
      {"pointwise stride 2, small image", 2, 3, 10, 7, 1, 7, 2, 0, 1, false, {0, 0, 10, 0, 7, 1, 0, 5, 0, 4}},
      {"3x3 stride 2", 2, 3, 6, 5, 3, 9, 2, 1, 1, false, {0, 0, 3, 0, 3, 0, 3, 6, 3, 5, 1, 0, 6, 0, 5}},
      // 2x0.5 and 4x0.25 over 16 channels: groups of 8 and 4, the narrow-group kernels (nhwc f32, AVX-512)
      {"3x3 narrow groups", 2, 2, 16, 16, 3, 11, 1, 1, 1, false, {0, 0, 8, 0, 8, 0, 8, 16, 8, 16, 1, 0,  4,  0,  4,
                                                                  1, 4, 8, 4, 8, 1, 8, 12, 8, 12, 1, 12, 16, 12, 16}},
      {"3x3 narrow groups, stride 2, no padding", 1, 3, 16, 16, 3, 12, 2, 0, 1, false, {0,  0, 4,  0,  4,  0,  4,
                                                                                        8,  4, 8,  0,  8,  12, 8,
                                                                                        12, 0, 12, 16, 12, 16}},
      // 16x0.0625: sixteen one-channel groups (the kernels' depthwise case)
      {"3x3 one-channel groups", 1, 2, 16, 16, 3, 13, 1, 1, 1, false, one_channel_blocks(16)},
      {"3x3 dilated, split image", 1, 1, 40, 4, 3, 20, 1, 2, 2, false, {0, 0, 40, 0, 4}},
      {"shared stem", 3, 2, 3, 8, 3, 6, 1, 1, 1, true, {0, 0, 3, 0, 8, 1, 0, 3, 0, 4, 1, 0, 3, 4, 8, 2, 0, 3,
                                                        0, 2, 2, 0, 3, 2, 4, 2, 0, 3, 4, 6, 2, 0, 3, 6, 8}},
  };
  for (const Case& c : cases) {
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      for (const auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) run(c, dtype, format);
    }
  }
  check_rejects({0, 0, 4, 0}, "5 ints per block");
  check_rejects({0, 0, 5, 0, 6}, "is outside");
  check_rejects({0, 0, 2, 0, 4, 0, 2, 4, 3, 6}, "overlap");
  return report();
}
