// The eager twin of pfa_kernels::linear for a projected layer that keeps M, with its backward in C++: a tiny layer's
// forward and backward spent about 50 us in Python (autograd.Function, the backward's dispatch and packaging), half
// again nn's whole call. Python takes this path only for plain 2-D tensors on the PyTorch backend's measured plan
// (ops._cpp_eager_order; a layer's ticket, eager_ticket.py, remembers that it did), so its results are that
// backend's (backends/torch_ops.py projected_linear_backward), op for op.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/extension.h>

#include "python_functions.h"

namespace pfa_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class EagerProjectedLinear : public torch::autograd::Function<EagerProjectedLinear> {
 public:
  // x (P, C_in), weight and Z (C_out, C_in), bias (C_out,) or undefined, M (1, C_out, C_out). sequence: dL/dx as
  // (g M) Z, else g (M Z). strategy and backend are what the layer was given: the backward op takes them under
  // create_graph.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& M, const at::Tensor& Z,
                            bool sequence, const std::string& strategy, const std::string& backend) {
    ctx->save_for_backward({x, weight, M, Z});
    ctx->saved_data["sequence"] = sequence;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["strategy"] = strategy;
    ctx->saved_data["backend"] = backend;
    // The gradients the Python twin's backward is asked for (its ctx.needs_input_grad, fixed here), which the
    // backward op's dispatch key holds: the create_graph branch passes them as that twin does.
    ctx->saved_data["mask"] = c10::List<bool>({x.requires_grad(), weight.requires_grad(),
                                               bias.has_value() && bias->defined() && bias->requires_grad(),
                                               Z.requires_grad()});
    return at::linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &M = saved[2], &Z = saved[3];
    // needs_input_grad counts the tensor inputs that were given: bias only where there is one.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_z = ctx->needs_input_grad(has_bias ? 4 : 3);
    at::Tensor grad_x, grad_w, grad_b, grad_z;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the backward op, as the Python twin runs it, whose autograd refuses a second derivative.
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pfa_kernels::linear_backward", "");
      std::vector<c10::IValue> stack{grad_outputs[0], x, weight, c10::IValue(), M, Z, std::string("projected"),
                                     ctx->saved_data["strategy"], ctx->saved_data["backend"],
                                     ctx->saved_data["mask"]};
      op.callBoxed(&stack);  // leaves its four outputs on the stack
      grad_x = stack[0].toTensor(), grad_w = stack[1].toTensor(), grad_b = stack[2].toTensor();
      grad_z = stack[3].toTensor();
    } else {
      // One copy of an expanded or strided g (loss.sum()'s is all stride 0) for the GEMMs, as the Python backend.
      const auto grad_rows = grad_outputs[0].contiguous();
      if (need_w || need_z) grad_w = grad_rows.t().mm(x);
      if (need_b) grad_b = grad_rows.sum(0);
      if (need_x) {
        grad_x = ctx->saved_data["sequence"].toBool() ? grad_rows.mm(M[0]).mm(Z) : grad_rows.mm(M[0].mm(Z));
      }
      if (need_z) grad_z = need_w ? grad_w.clone() : grad_w;  // separate memory for the two .grad fields
    }
    auto wanted = [](const at::Tensor& grad, bool need) { return need ? grad.contiguous() : at::Tensor(); };
    return {wanted(grad_x, need_x), wanted(grad_w, need_w), wanted(grad_b, need_b), at::Tensor(),
            wanted(grad_z, need_z), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor eager_projected_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& M, const at::Tensor& Z, bool sequence, const std::string& strategy,
                                  const std::string& backend) {
  return EagerProjectedLinear::apply(x, weight, bias, M, Z, sequence, strategy, backend);
}

}  // namespace pfa_kernels
