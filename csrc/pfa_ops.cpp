// Schemas of the pfa_kernels C++ ops and their ATen-composite implementations (CPU and CUDA alike: GEMMs
// and convolutions go to MKL/oneDNN or cuBLAS/cuDNN through ATen). The fused linear sequence kernel has a
// CPU implementation (linear_sequence_cpu.cpp) and a CUDA one (cuda/linear_sequence.cu).

#include "pfa_ops.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

namespace pfa_kernels {

void check_device(const char* op, const char* name, const at::Tensor& tensor, const char* anchor_name,
                  const at::Tensor& anchor) {
  TORCH_CHECK(tensor.device() == anchor.device(), "pfa_kernels::", op, ": ", name, " is on ", tensor.device(),
              " but ", anchor_name, " is on ", anchor.device(), "; every tensor argument must be on ", anchor_name,
              "'s device");
}

at::Tensor feedback_product(const at::Tensor& B, const at::Tensor& R, int64_t groups) {
  check_device("cpp_feedback_product", "R", R, "B", B);
  TORCH_CHECK(groups >= 1 && B.size(1) % groups == 0, "groups=", groups, " must divide C_mid=", B.size(1));
  const int64_t out_channels = B.size(0), mid_channels = B.size(1), mid_per_group = mid_channels / groups;
  if (B.numel() == 0 || R.numel() == 0) {
    // A sum over no mid channels is zero, and no output or input channel leaves W_fb empty; the reshapes
    // below cannot infer their -1 from zero elements.
    std::vector<int64_t> shape{out_channels, groups * R.size(1)};
    for (int64_t d = 2; d < R.dim(); ++d) shape.push_back(R.size(d));
    return at::zeros(shape, B.options());
  }
  auto B_by_group = B.reshape({out_channels, groups, mid_per_group}).transpose(0, 1);  // (G, C_out, C_mid/G)
  auto R_by_group = R.reshape({groups, mid_per_group, -1});                             // (G, C_mid/G, K)
  auto dense = at::bmm(B_by_group, R_by_group);                                         // (G, C_out, K)
  std::vector<int64_t> shape{groups, out_channels, R.size(1)};
  for (int64_t d = 2; d < R.dim(); ++d) shape.push_back(R.size(d));
  dense = dense.reshape(shape).transpose(0, 1);
  shape = {out_channels, groups * R.size(1)};
  for (int64_t d = 2; d < R.dim(); ++d) shape.push_back(R.size(d));
  return dense.reshape(shape);
}

void check_linear_sequence_args(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R) {
  check_device("cpp_linear_sequence_input_grad", "B", B, "grad_output", grad_output);
  check_device("cpp_linear_sequence_input_grad", "R", R, "grad_output", grad_output);
  TORCH_CHECK(grad_output.dim() == 2 && B.dim() == 2 && R.dim() == 2, "grad_output, B and R must be matrices");
  TORCH_CHECK(grad_output.size(1) == B.size(0) && B.size(1) == R.size(0), "shapes do not chain: grad_output ",
              grad_output.sizes(), ", B ", B.sizes(), ", R ", R.sizes());
  TORCH_CHECK(grad_output.scalar_type() == B.scalar_type() && B.scalar_type() == R.scalar_type(),
              "grad_output, B and R must share a dtype");
}

bool has_empty_operand(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R) {
  return grad_output.numel() == 0 || B.numel() == 0 || R.numel() == 0;
}

namespace {

// dL/dR = B_j^T C_j per group from the dense correlation C (C_out, C_in, *kernel).
at::Tensor feedback_grad_from_correlation(const at::Tensor& B, const at::Tensor& correlation, int64_t groups) {
  const int64_t out_channels = B.size(0), mid_channels = B.size(1), mid_per_group = mid_channels / groups;
  auto B_by_group = B.reshape({out_channels, groups, mid_per_group}).permute({1, 2, 0});
  auto corr_by_group = correlation.reshape({out_channels, groups, -1}).transpose(0, 1);
  auto grad = at::bmm(B_by_group, corr_by_group);
  std::vector<int64_t> shape{mid_channels, correlation.size(1) / groups};
  for (int64_t d = 2; d < correlation.dim(); ++d) shape.push_back(correlation.size(d));
  return grad.reshape(shape);
}

// dL/dW of a grouped conv: the diagonal blocks of the dense correlation.
at::Tensor weight_grad_from_correlation(const at::Tensor& correlation, int64_t groups) {
  const int64_t out_channels = correlation.size(0), in_channels = correlation.size(1);
  auto blocks = correlation.reshape({groups, out_channels / groups, groups, in_channels / groups, -1});
  auto diagonal = at::diagonal(blocks, 0, 0, 2);  // (C_out/G, C_in/G, K, G)
  std::vector<int64_t> shape{out_channels, in_channels / groups};
  for (int64_t d = 2; d < correlation.dim(); ++d) shape.push_back(correlation.size(d));
  return diagonal.permute({3, 0, 1, 2}).reshape(shape);
}

void check_backward_devices(const char* op, const at::Tensor& grad_output, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& B, const at::Tensor& R) {
  check_device(op, "x", x, "grad_output", grad_output);
  check_device(op, "weight", weight, "grad_output", grad_output);
  check_device(op, "B", B, "grad_output", grad_output);
  check_device(op, "R", R, "grad_output", grad_output);
}

at::Tensor or_empty(const at::Tensor& value, bool wanted, const at::Tensor& like) {
  return wanted ? value.contiguous() : at::empty({0}, like.options());
}

// The gradients when grad_output or x has no elements (N = 0, C_in = 0 or C_out = 0), with no kernel launched:
// dL/dx = g·W_fb and dL/dW, dL/dR (correlations of g with x) are sums of products with g or x, so zero (or
// empty); dL/db sums g over every dim but 1: zero when g is empty, nonzero when only x is (C_in = 0). nn's
// backward gives the same, except that ATen's convolution with C_in = 0 returns no output channels, so there g,
// and with it dL/db, is empty: dL/db is then zero, as nn's is.
Grads zero_size_grads(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& R,
                      std::array<bool, 4> output_mask) {
  auto zeros_or_empty = [](const at::Tensor& like, bool wanted) {
    return wanted ? at::zeros(like.sizes(), like.options()) : at::empty({0}, like.options());
  };
  at::Tensor grad_b = at::empty({0}, weight.options());
  if (output_mask[2]) {
    if (grad_output.numel() == 0 || grad_output.size(1) != weight.size(0)) {
      grad_b = at::zeros({weight.size(0)}, weight.options());
    } else {
      std::vector<int64_t> dims{0};
      for (int64_t d = 2; d < grad_output.dim(); ++d) dims.push_back(d);
      grad_b = grad_output.sum(dims);
    }
  }
  return {zeros_or_empty(x, output_mask[0]), zeros_or_empty(weight, output_mask[1]), grad_b,
          zeros_or_empty(R, output_mask[3])};
}

at::Tensor linear_sequence_input_grad(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R) {
  return grad_output.is_cuda() ? linear_sequence_input_grad_cuda(grad_output, B, R)
                               : linear_sequence_input_grad_cpu(grad_output, B, R);
}

}  // namespace

Grads linear_backward(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& B, const at::Tensor& R, const std::string& input_order,
                      const std::string& feedback_order, std::array<bool, 4> output_mask) {
  check_backward_devices("cpp_linear_backward", grad_output, x, weight, B, R);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2], need_r = output_mask[3];
  // Rows counted, not inferred: reshape(-1, 0) of an empty x (C_in = 0) is ambiguous.
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  auto x_rows = x.reshape({rows, x.size(-1)});
  auto g_rows = grad_output.reshape({rows, grad_output.size(-1)});
  at::Tensor grad_x, grad_w, grad_b, grad_r;
  if (g_rows.numel() == 0 || x_rows.numel() == 0) {
    return zero_size_grads(g_rows, x, weight, R, output_mask);
  }
  if (need_w || (need_r && feedback_order == "product")) grad_w = at::mm(g_rows.t(), x_rows);
  if (need_b) grad_b = g_rows.sum(0);
  if (need_x) {
    // The sequence order runs fused: (g·B)·R with g·B kept in cache / shared memory, never stored whole.
    grad_x = input_order == "product" ? at::mm(g_rows, feedback_product(B, R, 1))
                                      : linear_sequence_input_grad(g_rows.contiguous(), B, R);
    grad_x = grad_x.reshape(x.sizes());
  }
  if (need_r) grad_r = feedback_order == "product" ? feedback_grad_from_correlation(B, grad_w, 1)
                                                   : at::mm(at::mm(g_rows, B).t(), x_rows);
  return {or_empty(grad_x, need_x, x), or_empty(grad_w, need_w, weight), or_empty(grad_b, need_b, weight),
          or_empty(grad_r, need_r, R)};
}

Grads conv_backward(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& B, const at::Tensor& R, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, const std::string& input_order,
                    const std::string& feedback_order, std::array<bool, 4> output_mask) {
  check_backward_devices("cpp_conv_backward", grad_output, x, weight, B, R);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2], need_r = output_mask[3];
  if (grad_output.numel() == 0 || x.numel() == 0) {
    return zero_size_grads(grad_output, x, weight, R, output_mask);
  }
  const int64_t spatial = x.dim() - 2;
  std::vector<int64_t> output_padding(spatial, 0);
  std::vector<int64_t> bias_sizes{weight.size(0)};
  auto conv_grads = [&](const at::Tensor& grad, const at::Tensor& weight_like, int64_t conv_groups,
                        std::array<bool, 3> mask) {
    return at::convolution_backward(grad, x, weight_like, mask[2] ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt,
                                    stride, padding, dilation, false, output_padding, conv_groups, mask);
  };
  at::Tensor grad_x, grad_w, grad_b, grad_r, correlation;
  const bool feedback_by_product = need_r && feedback_order == "product";
  if (need_x && input_order == "product") {
    const bool want_correlation = feedback_by_product || (groups == 1 && need_w);
    std::tie(grad_x, correlation, grad_b) =
        conv_grads(grad_output, feedback_product(B, R, groups), 1, {true, want_correlation, need_b});
    // oneDNN may return a weight gradient that the mask left out: the mask says what was asked for, not the result.
    if (!want_correlation) correlation = at::Tensor();
  } else if (feedback_by_product) {
    std::vector<int64_t> dense_shape(weight.sizes().begin(), weight.sizes().end());
    dense_shape[1] *= groups;
    auto dense_like = groups > 1 ? at::empty(dense_shape, weight.options()) : weight;
    std::tie(std::ignore, correlation, grad_b) = conv_grads(grad_output, dense_like, 1, {false, true, need_b});
  }
  if (need_w && correlation.defined()) grad_w = groups == 1 ? correlation : weight_grad_from_correlation(correlation, groups);
  if ((need_w && !grad_w.defined()) || (need_b && !grad_b.defined())) {
    at::Tensor bp_w, bp_b;
    std::tie(std::ignore, bp_w, bp_b) =
        conv_grads(grad_output, weight, groups, {false, need_w && !grad_w.defined(), need_b && !grad_b.defined()});
    if (!grad_w.defined()) grad_w = bp_w;
    if (!grad_b.defined()) grad_b = bp_b;
  }
  if (feedback_by_product) grad_r = feedback_grad_from_correlation(B, correlation, groups);
  const bool sequence_x = need_x && input_order == "sequence";
  const bool sequence_r = need_r && feedback_order == "sequence";
  if (sequence_x || sequence_r) {
    auto grad_mid = at::matmul(grad_output.movedim(1, -1), B).movedim(-1, 1);
    at::Tensor seq_x, seq_r;
    std::tie(seq_x, seq_r, std::ignore) = conv_grads(grad_mid, R, groups, {sequence_x, sequence_r, false});
    if (sequence_x) grad_x = seq_x;
    if (sequence_r) grad_r = seq_r;
  }
  return {or_empty(grad_x, need_x, x), or_empty(grad_w, need_w, weight), or_empty(grad_b, need_b, weight),
          or_empty(grad_r, need_r, R)};
}

}  // namespace pfa_kernels

TORCH_LIBRARY(pfa_kernels, m) {
  m.def("cpp_feedback_product(Tensor B, Tensor R, int groups) -> Tensor");
  m.def("cpp_linear_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor B, Tensor R, str input_order, "
        "str feedback_order, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpp_conv_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor B, Tensor R, int[] stride, "
        "int[] padding, int[] dilation, int groups, str input_order, str feedback_order, bool[4] output_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("cpp_linear_sequence_input_grad(Tensor grad_output, Tensor B, Tensor R) -> Tensor");
  // No tensors: one kernel for every device. pfa_kernels.backends.cpp reads it to tell which GPUs can run the ops.
  m.def("cpp_cuda_images() -> str", &pfa_kernels::cuda_images);
}

TORCH_LIBRARY_IMPL(pfa_kernels, CPU, m) {
  m.impl("cpp_feedback_product", &pfa_kernels::feedback_product);
  m.impl("cpp_linear_backward", &pfa_kernels::linear_backward);
  m.impl("cpp_conv_backward", &pfa_kernels::conv_backward);
  m.impl("cpp_linear_sequence_input_grad", &pfa_kernels::linear_sequence_input_grad_cpu);
}
