#pragma once

#include <ATen/core/Tensor.h>

namespace paradis {

// The layout a kernel runs in and returns y / grad_x in, as paradis_fast/ops/layout.py decides it: NHWC for a 4-D x
// laid out channels_last (channels_last-contiguous and either not NCHW-contiguous or, where the two coincide, with
// channels_last's own strides), else NCHW. x's own layout, so x is never copied.
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  if (x.dim() != 4 || !x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::Contiguous;
  const bool nhwc = !x.is_contiguous() || (x.stride(1) == 1 && x.stride(3) == x.size(1));
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether a 4-D tensor holds each pixel's channels side by side: channels_last, or one pixel per
// image, where NCHW and NHWC are the same memory.
inline bool channels_innermost(const at::Tensor& t) {
  return kernel_format(t) == at::MemoryFormat::ChannelsLast ||
         (t.dim() == 4 && t.size(2) * t.size(3) == 1 && t.is_contiguous());
}

}  // namespace paradis
