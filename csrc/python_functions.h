// The extension's functions for Python (python_module.cpp), beside its torch.library ops (pfa_ops.h): neither is an
// op a model's graph holds, so they stay out of the dispatcher.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace pfa_kernels {

// pfa_kernels::linear's eager twin for a projected layer that keeps M, 2-D x (eager_linear.cpp). x (P, C_in), weight
// and Z (C_out, C_in), bias (C_out,) or None, M (1, C_out, C_out).
at::Tensor eager_projected_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& M, const at::Tensor& Z, bool sequence, const std::string& strategy,
                                  const std::string& backend);

// out.uniform_(low, high, generator) as torch's CPU kernel draws it in float64, rounded to out's dtype (float64 or
// float32, contiguous), by one of the variants this CPU runs (seeded_uniform.cpp).
void seeded_uniform_(at::Tensor& out, double low, double high, const at::Generator& generator,
                     const std::string& variant);
std::vector<std::string> seeded_uniform_variants();

}  // namespace pfa_kernels
