// Shared declarations of the pfa_kernels C++ ops (schemas in pfa_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace pfa_kernels {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Raises unless `tensor` is on `anchor`'s device (grad_output's; B's for cpp_feedback_product), naming both. The
// dispatcher runs one device's kernel for every argument: a stray tensor would otherwise fail deep in ATen with
// a message naming none of the op's arguments, or (a meta tensor among CPU ones) go through unnoticed.
void check_device(const char* op, const char* name, const at::Tensor& tensor, const char* anchor_name,
                  const at::Tensor& anchor);

// W_fb = B·R contracted over C_mid, dense over groups: (C_out, C_in, *kernel). B (C_out, C_mid),
// R (C_mid, C_in/groups, *kernel).
at::Tensor feedback_product(const at::Tensor& B, const at::Tensor& R, int64_t groups);

// The PFA backward composed from ATen (GEMMs, convolutions): any device. Orders "product" | "sequence"
// ("" when that gradient is not wanted), chosen by the Python planner. Returns (dL/dx, dL/dW, dL/db,
// dL/dR), empty tensors where output_mask is false.
Grads linear_backward(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& B, const at::Tensor& R, const std::string& input_order,
                      const std::string& feedback_order, std::array<bool, 4> output_mask);
Grads conv_backward(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& B, const at::Tensor& R, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, const std::string& input_order,
                    const std::string& feedback_order, std::array<bool, 4> output_mask);

// Fused sequence-order input gradient of a linear layer, dL/dx = (g·B)·R, g·B never written to memory.
// grad_output (P, C_out), B (C_out, C_mid), R (C_mid, C_in) -> (P, C_in). Device-specific kernels; both start
// with check_linear_sequence_args and return at::zeros({P, C_in}) without a launch when any operand is empty
// (P, C_out, C_mid or C_in = 0: the result is empty or an empty sum).
void check_linear_sequence_args(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R);
bool has_empty_operand(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R);
at::Tensor linear_sequence_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R);
at::Tensor linear_sequence_input_grad_cuda(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R);

// The device code in the library, "/"-separated as nvcc names it: "sm_XY" (SASS: runs on X.y for y >= Y) and
// "compute_XY" (PTX: the driver compiles it for X.Y and every newer GPU); "" when built without CUDA.
std::string cuda_images();

}  // namespace pfa_kernels
