"""How a layer with grouped feedback (feedback_groups="grouped", docs/design.md §2.5) reaches the PFA op.

Its W_fb has W's shape (C_out, C_in/G, *kernel), so its backward is backpropagation's with W_fb in dL/dx: the op's
"direct" parametrization, whose cost is BP's on every backend. What the direct op does not do is teach the
feedback. The feedback's gradient is a function of dL/dW alone (docs/design.md §2.3-2.4):

    explicit   dL/dR_j = B_j^T dL/dW_j     (B_j (C_out/G, C_mid/G), dL/dW_j (C_out/G, C_in/G * prod(kernel)))
    projected  dL/dZ = dL/dW

so the layer hands the op W through `teach_feedback`, an identity on W whose backward also passes dL/dW on to the
feedback tensor. Costs: forming W_fb and B^T dL/dW are C_out * C_mid * C_in * prod(kernel) / G^2 multiply-adds
each, independent of the positions (1.4 M for EfficientNet-B0's widest depthwise 5x5 at r = 10).
"""

from __future__ import annotations

import torch


class _TeachFeedback(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, feedback, B_by_group):
        ctx.save_for_backward(B_by_group)
        ctx.projected = B_by_group is None
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        (B_by_group,) = ctx.saved_tensors
        need_weight, need_feedback = ctx.needs_input_grad[:2]
        grad_feedback = None
        if need_feedback and grad_weight is not None:
            if ctx.projected:
                # dL/dZ is dL/dW, but a distinct tensor: one .grad tensor for two leaves would alias them.
                grad_feedback = grad_weight.clone() if need_weight else grad_weight
            else:
                groups, rows, mid_per_group = B_by_group.shape
                columns = grad_weight.reshape(groups, rows, -1)                        # (G, C_out/G, K)
                grad_R = torch.bmm(B_by_group.transpose(1, 2), columns)               # (G, C_mid/G, K)
                grad_feedback = grad_R.reshape(groups * mid_per_group, *grad_weight.shape[1:])
        return grad_weight if need_weight else None, grad_feedback, None


def teach_feedback(weight: torch.Tensor, feedback: torch.Tensor, B_by_group: torch.Tensor | None) -> torch.Tensor:
    """W itself (a view), whose gradient dL/dW also reaches `feedback`: R (C_mid, C_in/G, *kernel) as
    B_j^T dL/dW_j with B_by_group (G, C_out/G, C_mid/G), or Z (W's shape) as dL/dW when B_by_group is None.
    weight (C_out, C_in/G, *kernel)."""
    if B_by_group is not None and B_by_group.dtype != weight.dtype:
        B_by_group = B_by_group.to(weight.dtype)
    return _TeachFeedback.apply(weight, feedback, B_by_group)
