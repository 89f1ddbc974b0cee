// Op schemas of the paradis_C library; each backend registers its kernels with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(paradis_C, m) {
  m.def(
      "switch_batch_norm_forward(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, "
      "Tensor running_var, int[] covered, int[] rows, bool training, float eps, str activation, "
      "Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "switch_batch_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, "
      "Tensor mean, Tensor var, int[] covered, int[] rows, bool training, float eps, "
      "str activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sliced_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, int[] blocks, int num_switches, "
      "int[] stride, int[] padding, int[] dilation, bool input_shared) -> Tensor");
  m.def(
      "sliced_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[] blocks, int num_switches, "
      "int[] stride, int[] padding, int[] dilation, bool input_shared, bool[] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // switch_batch_norm_forward, sliced_conv2d_forward and the depthwise convolution with their
  // autograd (csrc/autograd.cpp)
  m.def(
      "switch_batch_norm(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "int[] covered, int[] rows, bool training, float eps, str activation, Tensor? residual=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "sliced_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] blocks, int num_switches, int[] stride, "
      "int[] padding, int[] dilation, bool input_shared) -> Tensor");
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def(
      "depthwise_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[] stride, int[] padding, "
      "int[] dilation, bool[] output_mask) -> (Tensor, Tensor, Tensor)");
}
