#include "cpu/sliced_conv2d.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "layout.h"
#include "cpu/isa.h"
#include "cpu/measured_choice.h"
#include "cpu/pointwise_gemm.h"
#include "cpu/sliced_conv2d_paths.h"

#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

// Every (switch, sub-network) block of a layer in one op call, on oneDNN's convolutions through
// ATen: one grouped convolution per run of equal-width blocks of a switch (a whole kx(1/k) switch
// is one call) on the switch's rows, copied into the stacked output; weight gradients of blocks
// that share weights added in a fixed order. NCHW or channels_last, as x comes. Against strided
// BLAS GEMMs (1x1) and im2col + GEMM (k x k) on channel slices, which this file held before, it
// was as fast or faster on every layer of bench/suites.py, in both layouts, most of all on small
// channel counts -- except channels_last 1x1 layers on small images (the deep layers of a
// network), where a block is a GEMM of few rows that BLAS runs faster than oneDNN, straight into
// the stacked tensors with no copy (bench/README.md): those run as one GEMM per block, and NCHW 1x1
// layers, where oneDNN is slower still, as one batched GEMM per block over its images. Our own
// kernels, AVX-512 and float32, in place: channels_last 1x1 layers with many pixel rows on
// pointwise_gemm.h's (faster than oneDNN on narrow blocks, and no unit output copied), 3x3 units of
// 1-, 4- or 8-channel groups, which oneDNN runs at a fraction of its dense rate, on
// narrow_group_conv.h's. Those fixed rules make the "native" path; on a layer shape's first call it
// is timed against the "masked" path (one dense convolution per switch, fastest on small layers)
// and the faster runs from then on (measured_choice.h).
//
// This file holds that choice and the op's entry points; the block model and its validation are in
// sliced_conv2d_plan.h, the paths in sliced_conv2d_paths.h (the units, the GEMMs and the masked
// path, a file each).
namespace paradis {
namespace {

using at::IntArrayRef;
using at::Tensor;

// the block model (sliced_conv2d_plan.h)
using sliced_detail::Block;
using sliced_detail::Geometry;
using sliced_detail::Problem;
using sliced_detail::shared_output_blocks;
using sliced_detail::validate;
using sliced_detail::zero_uncovered;
// the paths (sliced_conv2d_paths.h)
using sliced_detail::backward_gemms;
using sliced_detail::backward_grouped;
using sliced_detail::backward_masked;
using sliced_detail::backward_unfolded;
using sliced_detail::backward_units;
using sliced_detail::forward_gemms;
using sliced_detail::forward_grouped;
using sliced_detail::forward_masked;
using sliced_detail::forward_unfolded;
using sliced_detail::forward_units;
using sliced_detail::gathered_pointwise;
using sliced_detail::on_grid;
using sliced_detail::runs_as_gemms;
using sliced_detail::runs_on_blas;
using sliced_detail::runs_on_pointwise_gemm;
using sliced_detail::shared_backward;
using sliced_detail::unfolds;

// The paths a layer may run on: "native" (the fixed rules above: the package's GEMM and narrow-group
// kernels, BLAS, oneDNN's units), "masked", "grouped" (the masked path as one grouped convolution
// over the switches), "unfolded" (small NCHW images: the product with the unfolded weight, one GEMM
// per block), and "relayout": x and grad_y copied to the other memory format (NCHW <->
// channels_last) and the op called on the copies, choosing again there between the others, the
// results copied back -- most of the fast paths are channels_last, and oneDNN's channels_last
// kernels have slow cases NCHW has not (kernels larger than the image); measured_choice.h picks
// per shape.
enum Path : size_t { kNative = 0, kMasked = 1, kGrouped = 2, kUnfolded = 3, kRelayout = 4 };
const std::vector<std::string> kPathNames{"native", "masked", "grouped", "unfolded", "relayout"};

constexpr size_t kChoiceFields = 22;  // the numbers of choice_key before its block table

MeasuredChoices& choices() {
  static MeasuredChoices instance("PARADIS_CPU_CONV_PATH", kPathNames, kChoiceFields);
  return instance;
}

// Set while the op runs on relayout's copies, which do not relayout again: a layer there has other
// candidates than called directly in that layout, so it is another key (choice_key).
thread_local bool in_relayout = false;

struct RelayoutScope {
  RelayoutScope() { in_relayout = true; }
  ~RelayoutScope() { in_relayout = false; }
};

// x's layout swapped: NCHW <-> channels_last.
at::MemoryFormat other_format(const Tensor& x) {
  return kernel_format(x) == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::Contiguous
                                                            : at::MemoryFormat::ChannelsLast;
}

// The candidates for x (contiguous in its kernel format) of layer g: one-pixel images are the same
// memory in both layouts, one switch is one group, and oneDNN's weight gradient of a hazard layer
// is not to be run.
std::vector<Path> candidates(const Tensor& x, const Geometry& g) {
  std::vector<Path> paths{kNative, kMasked};
  if (g.S > 1 && !sliced_detail::onednn_pointwise_hazard(g, x)) paths.push_back(kGrouped);
  if (unfolds(g, x)) paths.push_back(kUnfolded);
  if (!in_relayout && x.size(2) * x.size(3) > 1) paths.push_back(kRelayout);
  return paths;
}

std::vector<std::string> names(const std::vector<Path>& paths) {
  std::vector<std::string> out;
  for (const Path p : paths) out.push_back(kPathNames[p]);
  return out;
}

// input_shared layers (a network's stem) have one path: each output channel computed once.
constexpr const char* kSharedRule = "input_shared: one oneDNN convolution per distinct output range";

// What the native rules run for a non-input_shared layer.
const char* native_rule(const Geometry& g, const Tensor& x, bool gathered) {
  if (runs_on_pointwise_gemm(g, x))
    return gathered ? "stride grid gathered, pointwise GEMM kernels" : "pointwise GEMM kernels";
  if ((gathered || runs_on_blas(g, x)) && !channels_innermost(x))
    return gathered ? "stride grid gathered, one batched BLAS GEMM per block over its NCHW images"
                    : "one batched BLAS GEMM per block over its NCHW images";
  if (gathered || runs_on_blas(g, x))
    return gathered ? "stride grid gathered, BLAS GEMM per block" : "BLAS GEMM per block";
  return "units (narrow-group kernels or oneDNN grouped convolutions)";
}

// The key a decision is cached under: everything the paths' speed depends on. phase: 0 for the
// forward, 1 + the output_mask bits for a backward. Its first kChoiceFields numbers are the layer
// shape, the block table follows (a family of keys: measured_choice.h).
ChoiceKey choice_key(int64_t phase, const Geometry& g, const std::vector<Block>& blocks, const Tensor& x) {
  ChoiceKey key{phase,
                g.S,
                g.B,
                g.C_in,
                g.C_out,
                g.H,
                g.W,
                g.kh,
                g.kw,
                g.sh,
                g.sw,
                g.ph,
                g.pw,
                g.dh,
                g.dw,
                g.shared,
                static_cast<int64_t>(x.scalar_type()),
                kernel_format(x) == at::MemoryFormat::ChannelsLast,
                at::get_num_threads(),
                avx512_enabled(),
                pointwise_gemm_enabled(),
                in_relayout};
  TORCH_INTERNAL_ASSERT(key.size() == kChoiceFields);
  for (const Block& b : blocks) key.insert(key.end(), {b.s, b.i0, b.i1, b.o0, b.o1});
  return key;
}

int64_t backward_phase(bool need_x, bool need_w, bool need_b) { return 1 + need_x + 2 * need_w + 4 * need_b; }

// The key in words, for explain.
std::string choice_words(int64_t phase, const Geometry& g, const std::vector<Block>& blocks, const Tensor& x,
                         const char* rule) {
  std::ostringstream words;
  if (phase == 0) {
    words << "forward";
  } else {
    const int64_t mask = phase - 1;
    words << "backward (grad x " << (mask & 1 ? "yes" : "no") << ", weight " << (mask & 2 ? "yes" : "no") << ", bias "
          << (mask & 4 ? "yes" : "no") << ")";
  }
  words << " " << g.kh << "x" << g.kw << " stride " << g.sh << "x" << g.sw << " padding " << g.ph << "x" << g.pw
        << " dilation " << g.dh << "x" << g.dw << ", x [" << (g.shared ? g.B : g.S * g.B) << ", " << g.C_in << ", "
        << g.H << ", " << g.W << "] " << x.scalar_type()
        << (kernel_format(x) == at::MemoryFormat::ChannelsLast ? " channels_last" : " NCHW")
        << (in_relayout ? " (relayout's copies)" : "") << " -> " << g.C_out << " channels, " << g.S
        << " switches, blocks";
  for (const Block& b : blocks) words << " " << b.s << ":" << b.i0 << "-" << b.i1 << ">" << b.o0 << "-" << b.o1;
  words << ", " << at::get_num_threads() << " threads; native = " << rule;
  return words.str();
}

// What the native and masked paths run on: a strided 1x1 layer's gathered stride grid
// (gathered_pointwise) with its stride-1 geometry, else the layer itself.
struct RunInput {
  std::optional<Geometry> compact;
  Geometry g;
  Tensor x;
};

RunInput run_input(const Geometry& g, const Tensor& x, at::MemoryFormat format) {
  const std::optional<Geometry> compact = gathered_pointwise(g, x);
  if (!compact) return {compact, g, x};
  return {compact, *compact, on_grid(x, g).contiguous(format)};
}

bool reduced_precision(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// Whether a bfloat16 / float16 call computes in float32 on the float32 kernels (isa.h).
bool upcast(const Tensor& x) { return reduced_precision(x) && !low_precision_native(x.scalar_type() == at::kBFloat16); }

void check_dtype(const Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sliced_conv2d: cpu kernel supports floating dtypes, got ",
              x.scalar_type());
}

// The dtype weight and bias gradients add up in: float32 for bfloat16 / float16 (blocks of several
// switches share weights), else the weight's.
at::ScalarType accumulation(const Tensor& weight) { return at::toOpMathType(weight.scalar_type()); }

}  // namespace

Tensor sliced_conv2d_forward_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 IntArrayRef table, int64_t num_switches, IntArrayRef stride, IntArrayRef padding,
                                 IntArrayRef dilation, bool input_shared) {
  const Problem problem = validate(x, weight, table, num_switches, stride, padding, dilation, input_shared);
  const Geometry& g = problem.g;
  const std::vector<Block>& blocks = problem.blocks;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.C_out, "sliced_conv2d: bias must be [", g.C_out, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "sliced_conv2d: bias is ", bias->scalar_type(), " but x is ",
                x.scalar_type());
  }
  if (upcast(x)) {  // accumulate in float32, as the other backends do
    const auto b = has_bias ? std::optional<Tensor>(bias->to(at::kFloat)) : std::nullopt;
    return sliced_conv2d_forward_cpu(x.to(at::kFloat), weight.to(at::kFloat), b, table, num_switches, stride, padding,
                                     dilation, input_shared)
        .to(x.scalar_type());
  }
  check_dtype(x);
  const at::MemoryFormat format = kernel_format(x);
  const Tensor xc = x.contiguous(format), wc = weight.contiguous();
  const Tensor bc = has_bias ? bias->contiguous() : Tensor();
  const auto options = xc.options().memory_format(format);
  if (input_shared) {
    // every switch reads the same image, so each output channel is computed once (into a scratch
    // when several switches need it) and copied into the rows of each switch
    const auto shared_forward = [&](size_t) {
      Tensor y = at::empty({g.S * g.B, g.C_out, g.Ho, g.Wo}, options);
      zero_uncovered(y, g, blocks, false);
      const bool dedupe = g.S > 1;
      const Tensor target = dedupe ? at::empty({g.B, g.C_out, g.Ho, g.Wo}, options) : y;
      forward_units(xc, wc, bc, target, g, dedupe ? shared_output_blocks(g, blocks) : blocks);
      if (dedupe) {
        for (const Block& b : blocks)
          y.narrow(0, b.y0, g.B).narrow(1, b.o0, b.o1 - b.o0).copy_(target.narrow(1, b.o0, b.o1 - b.o0));
      }
      return y;
    };
    return choices().run<Tensor>(choice_key(0, g, blocks, xc), {"native"}, shared_forward,
                                 [&] { return choice_words(0, g, blocks, xc, kSharedRule); });
  }
  const RunInput in = run_input(g, xc, format);
  const std::optional<Geometry>& compact = in.compact;
  const Geometry& run_g = in.g;
  const Tensor& run_x = in.x;
  const char* rule = native_rule(run_g, run_x, compact.has_value());
  const std::vector<Path> paths = candidates(xc, run_g);
  const auto run = [&](size_t candidate) {
    const Path path = paths[candidate];
    if (path == kRelayout) {
      const RelayoutScope scope;
      return sliced_conv2d_forward_cpu(xc.contiguous(other_format(xc)), weight, bias, table, num_switches, stride,
                                       padding, dilation, input_shared)
          .contiguous(format);
    }
    Tensor y = at::empty({g.S * g.B, g.C_out, g.Ho, g.Wo}, options);
    if (path == kMasked || path == kGrouped) {
      (path == kMasked ? forward_masked : forward_grouped)(run_x, wc, bc, y, run_g, blocks);
      return y;
    }
    zero_uncovered(y, g, blocks, false);
    if (path == kUnfolded)
      forward_unfolded(run_x, wc, bc, y, run_g, blocks);
    else if (compact || runs_as_gemms(run_g, run_x))
      forward_gemms(run_x, wc, bc, y, run_g, blocks);
    else
      forward_units(run_x, wc, bc, y, run_g, blocks);
    return y;
  };
  return choices().run<Tensor>(choice_key(0, g, blocks, xc), names(paths), run,
                               [&] { return choice_words(0, g, blocks, xc, rule); });
}

std::tuple<Tensor, Tensor, Tensor> sliced_conv2d_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                              const Tensor& weight, IntArrayRef table,
                                                              int64_t num_switches, IntArrayRef stride,
                                                              IntArrayRef padding, IntArrayRef dilation,
                                                              bool input_shared, const c10::List<bool>& output_mask) {
  const Problem problem = validate(x, weight, table, num_switches, stride, padding, dilation, input_shared);
  const Geometry& g = problem.g;
  const std::vector<Block>& blocks = problem.blocks;
  TORCH_CHECK(output_mask.size() == 3, "sliced_conv2d: output_mask must have 3 entries, got ", output_mask.size());
  const std::vector<int64_t> y_shape{g.S * g.B, g.C_out, g.Ho, g.Wo};
  TORCH_CHECK(grad_y.sizes() == IntArrayRef(y_shape), "sliced_conv2d: grad_y must be ", IntArrayRef(y_shape), ", got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "sliced_conv2d: grad_y is ", grad_y.scalar_type(), " but x is ",
              x.scalar_type());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  if (upcast(x)) {  // accumulate in float32, as the other backends do
    auto [gx, gw, gb] =
        sliced_conv2d_backward_cpu(grad_y.to(at::kFloat), x.to(at::kFloat), weight.to(at::kFloat), table, num_switches,
                                   stride, padding, dilation, input_shared, output_mask);
    const auto back = [&](const Tensor& t) { return t.defined() ? t.to(x.scalar_type()) : t; };
    return {back(gx), back(gw), back(gb)};
  }
  check_dtype(x);
  const at::MemoryFormat format = kernel_format(x);
  const Tensor gyc = grad_y.contiguous(format), xc = x.contiguous(format), wc = weight.contiguous();
  const int64_t phase = backward_phase(need_x, need_w, need_b);
  if (input_shared) {
    return choices().run<std::tuple<Tensor, Tensor, Tensor>>(
        choice_key(phase, g, blocks, xc), {"native"},
        [&](size_t) { return shared_backward(gyc, xc, wc, g, blocks, output_mask); },
        [&] { return choice_words(phase, g, blocks, xc, kSharedRule); });
  }
  const RunInput in = run_input(g, xc, format);
  const std::optional<Geometry>& compact = in.compact;
  const Geometry& run_g = in.g;
  const Tensor& run_x = in.x;
  const char* rule = native_rule(run_g, run_x, compact.has_value());
  const std::vector<Path> paths = candidates(xc, run_g);
  const auto run = [&](size_t candidate) {
    const Path path = paths[candidate];
    const bool masked = path == kMasked || path == kGrouped;
    if (path == kRelayout) {
      const RelayoutScope scope;
      const at::MemoryFormat other = other_format(xc);
      auto [grad_x, grad_w, grad_b] =
          sliced_conv2d_backward_cpu(gyc.contiguous(other), xc.contiguous(other), weight, table, num_switches, stride,
                                     padding, dilation, input_shared, output_mask);
      return std::tuple<Tensor, Tensor, Tensor>{grad_x.defined() ? grad_x.contiguous(format) : grad_x, grad_w, grad_b};
    }
    Tensor grad_x, grad_w, grad_b;
    // the gradient of run_x: the units write the inputs they cover (the others get zero); a
    // gathered layer's is put back on the stride grid of a zeroed grad_x
    Tensor run_grad_x;
    if (need_x) {
      run_grad_x = at::empty(run_x.sizes(), run_x.options().memory_format(format));
      if (!masked) zero_uncovered(run_grad_x, run_g, blocks, true);
    }
    if (need_w) grad_w = at::zeros(wc.sizes(), wc.options().dtype(accumulation(wc)));
    if (need_b) grad_b = at::zeros({g.C_out}, wc.options().dtype(accumulation(wc)));
    if (masked)
      (path == kMasked ? backward_masked : backward_grouped)(gyc, run_x, wc, run_grad_x, grad_w, grad_b, run_g, blocks);
    else if (path == kUnfolded)
      backward_unfolded(gyc, run_x, wc, run_grad_x, grad_w, grad_b, run_g, blocks);
    else if (compact || runs_as_gemms(run_g, run_x))
      backward_gemms(gyc, run_x, wc, run_grad_x, grad_w, grad_b, run_g, blocks);
    else
      backward_units(gyc, run_x, wc, run_grad_x, grad_w, grad_b, run_g, blocks);
    if (need_x && compact) {
      grad_x = at::empty(xc.sizes(), xc.options().memory_format(format)).zero_();
      on_grid(grad_x, g).copy_(run_grad_x);
    } else {
      grad_x = run_grad_x;
    }
    const auto in_weight_dtype = [&](const Tensor& t) { return t.defined() ? t.to(wc.scalar_type()) : t; };
    return std::tuple<Tensor, Tensor, Tensor>{grad_x, in_weight_dtype(grad_w), in_weight_dtype(grad_b)};
  };
  return choices().run<std::tuple<Tensor, Tensor, Tensor>>(choice_key(phase, g, blocks, xc), names(paths), run,
                                                           [&] { return choice_words(phase, g, blocks, xc, rule); });
}

std::vector<std::string> sliced_conv2d_decisions() { return choices().describe(); }

TORCH_LIBRARY_IMPL(paradis, CPU, m) {
  m.impl("sliced_conv2d", TORCH_FN(sliced_conv2d_forward_cpu));
  m.impl("sliced_conv2d_backward", TORCH_FN(sliced_conv2d_backward_cpu));
}

}  // namespace paradis
