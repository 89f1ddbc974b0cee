// Op schemas of the paradis_C library; each backend registers its kernels with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(paradis_C, m) {
  m.def(
      "switch_batch_norm_forward(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, "
      "Tensor running_var, int[] covered, int[] rows, bool training, float eps, str activation) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "switch_batch_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, "
      "Tensor mean, Tensor var, int[] covered, int[] rows, bool training, float eps, "
      "str activation) -> (Tensor, Tensor, Tensor)");
}
