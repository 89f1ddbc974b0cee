// The C++ signatures of the paradis ops (csrc/paradis.cpp's schemas) and their typed handles, for
// the kernels that call an op again below their own dispatch key (autograd, autocast).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace paradis {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using SlicedConv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                  at::IntArrayRef, int64_t, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool);
using SlicedConv2dBackwardFn = Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t,
                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, const c10::List<bool>&);
using SwitchBatchNormFn = Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, at::IntArrayRef, at::IntArrayRef, bool, double, c10::string_view,
                                const std::optional<at::Tensor>&);
using SwitchBatchNormBackwardFn = Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, bool,
                                        double, c10::string_view);
using DepthwiseConv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef);
using DepthwiseConv2dBackwardFn = Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                        at::IntArrayRef, at::IntArrayRef, const c10::List<bool>&);

// The typed handle of an op (callers keep it in a static: the lookup is a hash-map search).
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace paradis
