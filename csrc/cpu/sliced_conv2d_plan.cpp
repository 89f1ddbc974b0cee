#include "cpu/sliced_conv2d_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace paradis {
namespace sliced_detail {

using at::IntArrayRef;
using at::Tensor;

namespace {

constexpr int64_t kFields = 5;  // ints per block in the table

}  // namespace

Problem validate(const Tensor& x, const Tensor& weight, IntArrayRef table, int64_t num_switches, IntArrayRef stride,
                 IntArrayRef padding, IntArrayRef dilation, bool shared) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "sliced_conv2d: cpu kernel got tensors on ", x.device(),
              " and ", weight.device());
  TORCH_CHECK(x.dim() == 4, "sliced_conv2d: x must be 4-D [S*B, C_in, H, W], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "sliced_conv2d: weight must be 4-D [C_out, C_in, kh, kw], got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "sliced_conv2d: x is ", x.scalar_type(), " but weight is ",
              weight.scalar_type());
  TORCH_CHECK(x.size(1) == weight.size(1), "sliced_conv2d: x has ", x.size(1), " channels but weight expects ",
              weight.size(1));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "sliced_conv2d: stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(
      stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
      "sliced_conv2d: stride ", stride, " and dilation ", dilation, " must be >= 1, padding ", padding, " >= 0");
  TORCH_CHECK(num_switches >= 1, "sliced_conv2d: num_switches must be >= 1, got ", num_switches);
  TORCH_CHECK(shared || x.size(0) % num_switches == 0, "sliced_conv2d: x has ", x.size(0),
              " rows, not a multiple of the ", num_switches, " switches");
  Geometry g{num_switches,
             shared ? x.size(0) : x.size(0) / num_switches,
             x.size(1),
             weight.size(0),
             x.size(2),
             x.size(3),
             weight.size(2),
             weight.size(3),
             0,
             0,
             stride[0],
             stride[1],
             padding[0],
             padding[1],
             dilation[0],
             dilation[1],
             shared};
  // a one-tap dimension's dilation changes nothing; as 1 the layer has one choice key, and oneDNN's
  // AVX2 convolution crashed on channels_last layers with a dilated one-wide kernel (bench/README.md)
  if (g.kh == 1) g.dh = 1;
  if (g.kw == 1) g.dw = 1;
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "sliced_conv2d: input of spatial size ", x.sizes().slice(2), " is smaller than the kernel");

  TORCH_CHECK(!table.empty() && table.size() % kFields == 0, "sliced_conv2d: blocks must hold ", kFields,
              " ints per block (switch, in_start, in_stop, out_start, out_stop), got ", table.size());
  std::vector<Block> blocks;
  for (size_t k = 0; k < table.size(); k += kFields) {
    const int64_t s = table[k], i0 = table[k + 1], i1 = table[k + 2], o0 = table[k + 3], o1 = table[k + 4];
    TORCH_CHECK(s >= 0 && s < num_switches && 0 <= i0 && i0 < i1 && i1 <= g.C_in && 0 <= o0 && o0 < o1 && o1 <= g.C_out,
                "sliced_conv2d: block ", k / kFields, " (", s, ", ", i0, ", ", i1, ", ", o0, ", ", o1, ") is outside ",
                num_switches, " switches, ", g.C_in, " inputs, ", g.C_out, " outputs");
    TORCH_CHECK(!shared || (i0 == 0 && i1 == g.C_in),
                "sliced_conv2d: with input_shared every block reads "
                "all ",
                g.C_in, " input channels, block ", k / kFields, " reads [", i0, ", ", i1, ")");
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

void zero_uncovered(const Tensor& t, const Geometry& g, const std::vector<Block>& blocks, bool inputs) {
  const int64_t channels = t.size(1);
  for (int64_t s = 0; s < g.S; ++s) {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (const Block& b : blocks) {
      if (b.s == s) ranges.push_back(inputs ? std::pair{b.i0, b.i1} : std::pair{b.o0, b.o1});
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

}  // namespace sliced_detail
}  // namespace paradis
