"""The literal Product Feedback Alignment algorithm: the ground truth every test compares against.

Written for clarity, never for speed. It follows the authors' released code step by step
(docs/design.md section 1), including what the fast paths remove:

- the forward pass also runs the input through the feedback population, mid = conv(x, R), as the
  authors' code does only to learn the shape of the mid error; the result is kept until backward;
- the error travels back through the feedback path x -> R -> B: g_mid = B^T g (a 1x1 map per
  position), then dL/dx = conv_transpose(g_mid, R) and "dL/dR" = conv_weight(x, g_mid), obtained here
  by autograd through that literal path;
- dL/dW and dL/db are backpropagation's, obtained by autograd through y = conv(x, W) + b.

Shapes (a linear layer is the same with no kernel or spatial dims; x may have any leading dims):

    x  (N, C_in, *spatial)             W  (C_out, C_in / groups, *kernel)    b (C_out,) or None
    B  (C_out, C_mid)  fixed           R  (C_mid, C_in / groups, *kernel)

Grouped feedback (feedback_groups="grouped") is this algorithm with a block-diagonal B (block_diagonal_feedback);
"dense" is it with the layer's dense B, as in the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CONV_BY_SPATIAL_DIMS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _forward_conv(x, weight, bias, stride, padding, dilation, groups):
    spatial_dims = weight.dim() - 2
    if spatial_dims == 0:
        return F.linear(x, weight, bias)
    return _CONV_BY_SPATIAL_DIMS[spatial_dims](x, weight, bias, stride, padding, dilation, groups)


def _apply_B(mid: torch.Tensor, B: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The fixed 1x1 map from the feedback population to the output: out[o] = sum_m B[o, m] mid[m]."""
    mid_last = mid.movedim(channel_dim, -1)
    return torch.matmul(mid_last, B.t()).movedim(-1, channel_dim)


class _LiteralPFA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, B, R, stride, padding, dilation, groups):
        y = _forward_conv(x, weight, bias, stride, padding, dilation, groups)
        # The authors' code runs this extra forward through R only to shape the mid error.
        mid = _forward_conv(x, R, None, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, bias, B, R, mid)
        ctx.conv_args = (stride, padding, dilation, groups)
        # F.linear of a 3-D input returns a view, which a custom Function may not hand out for in-place use.
        return y if y._base is None else y.clone()

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, B, R, mid = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        channel_dim = -1 if weight.dim() == 2 else 1
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            weight_leaf = weight.detach().requires_grad_(True)
            bias_leaf = None if bias is None else bias.detach().requires_grad_(True)
            R_leaf = R.detach().requires_grad_(True)

            # Backpropagation's path, used only for the weight and bias gradients.
            y = _forward_conv(x_leaf, weight_leaf, bias_leaf, stride, padding, dilation, groups)
            bp_inputs = [weight_leaf] + ([] if bias_leaf is None else [bias_leaf])
            bp_grads = torch.autograd.grad(y, bp_inputs, grad_output)
            grad_weight = bp_grads[0]
            grad_bias = None if bias_leaf is None else bp_grads[1]

            # The feedback path x -> R -> B carries the error back to the input and teaches R.
            mid_recomputed = _forward_conv(x_leaf, R_leaf, None, stride, padding, dilation, groups)
            assert mid_recomputed.shape == mid.shape
            if x.numel() == 0:  # no path from x: zero gradients (a conv over C_in = 0 even returns 0 channels)
                grad_x, grad_R = torch.zeros_like(x), torch.zeros_like(R)
            else:
                feedback_out = _apply_B(mid_recomputed, B, channel_dim)
                grad_x, grad_R = torch.autograd.grad(feedback_out, [x_leaf, R_leaf], grad_output)
        return grad_x, grad_weight, grad_bias, None, grad_R, None, None, None, None


def cast_for_autocast(tensors, device_type):
    """Under autocast, cast tensors (None allowed) to the autocast dtype, as nn.Linear/nn.Conv do; gradients
    flow back to each tensor's own dtype through the cast. The fast paths cast the same way."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [None if t is None else t.to(dtype) for t in tensors]


def pfa_conv(x, weight, bias, B, R, stride=1, padding=0, dilation=1, groups=1):
    """Literal PFA convolution (1d/2d/3d by weight.dim()); zero padding only (pad x first otherwise).

    x (N, C_in, *spatial) or unbatched (C_in, *spatial), weight (C_out, C_in/groups, *kernel),
    bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in/groups, *kernel).
    Returns y (N, C_out, *out_spatial), or (C_out, *out_spatial) for an unbatched x.
    """
    unbatched = weight.dim() > 2 and x.dim() == weight.dim() - 1
    if unbatched:
        return pfa_conv(x.unsqueeze(0), weight, bias, B, R, stride, padding, dilation, groups).squeeze(0)
    x, weight, bias, B, R = cast_for_autocast([x, weight, bias, B, R], x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        return _LiteralPFA.apply(x, weight, bias, B, R, stride, padding, dilation, groups)


def pfa_linear(x, weight, bias, B, R):
    """Literal PFA linear layer.

    x (..., C_in), weight (C_out, C_in), bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in).
    Returns y (..., C_out).
    """
    return pfa_conv(x, weight, bias, B, R)


def feedback_weight(B: torch.Tensor, R: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W_fb = B·R, written out one group at a time.

    B (C_out, C_mid), R (C_mid, C_in/groups, *kernel). Returns (C_out, C_in, *kernel): dense over
    input channels, because B mixes every group's mid population into every output channel.
    """
    mid_per_group = R.shape[0] // groups
    blocks = []
    for group in range(groups):
        rows = slice(group * mid_per_group, (group + 1) * mid_per_group)
        blocks.append(torch.tensordot(B[:, rows], R[rows], dims=1))
    return torch.cat(blocks, dim=1)


def block_diagonal_feedback(B: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped feedback's B as one dense matrix: B (C_out, C_mid/G), row block j = B_j (C_out/G, C_mid/G), ->
    (C_out, C_mid) with B_j at (rows of group j, mid channels of group j) and zeros elsewhere. With it the literal
    algorithm above is grouped feedback's: group j's mid population reaches group j's outputs only."""
    out_channels, mid_per_group = B.shape
    rows = out_channels // groups
    dense = B.new_zeros(out_channels, mid_per_group * groups)
    for group in range(groups):
        dense[group * rows:(group + 1) * rows, group * mid_per_group:(group + 1) * mid_per_group] = \
            B[group * rows:(group + 1) * rows]
    return dense


def fixed_feedback_linear(x, weight, bias, feedback_weight):
    """Literal fixed-feedback rule (FA, sign symmetry) for a linear layer: y = x W^T + b in value; autograd
    gives dL/dW, dL/db through W and dL/dx through feedback_weight (W's shape), by construction."""
    y = F.linear(x.detach(), weight, bias)
    through_feedback = F.linear(x, feedback_weight.detach())
    return y + through_feedback - through_feedback.detach()


def fixed_feedback_conv(x, weight, bias, feedback_weight, stride=1, padding=0, dilation=1, groups=1):
    """Literal fixed-feedback rule for a convolution (1d/2d/3d by weight.dim()), zero padding: the value of
    conv(x, W) + b, with dL/dx through conv(x, feedback_weight) and dL/dW through conv(x, W)."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    y = conv(x.detach(), weight, bias, stride, padding, dilation, groups)
    through_feedback = conv(x, feedback_weight.detach(), None, stride, padding, dilation, groups)
    return y + through_feedback - through_feedback.detach()


def dfa_mlp_gradients(x, weights, biases, feedback_matrices, grad_output):
    """Literal DFA for an MLP y = W_L relu(... relu(W_1 x + b_1) ...) + b_L, by hand (no autograd):
    e = grad_output (N, outputs); for hidden layer k's input h: dL/dh := e D_k^T (D_k (numel(h), outputs)),
    through relu' to the layer below. Returns [(dL/dW_l, dL/db_l)] for every layer.

    x (N, C_0); weights[l] (C_l+1, C_l); biases[l] (C_l+1,); feedback_matrices[k] for layers 2..L.
    """
    activations, pre = [x], []
    for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        a = activations[-1] @ weight.t() + bias
        pre.append(a)
        if layer < len(weights) - 1:
            activations.append(torch.relu(a))
    grads = [None] * len(weights)
    delta = grad_output
    grads[-1] = (delta.t() @ activations[-1], delta.sum(0))
    for layer in range(len(weights) - 2, -1, -1):
        grad_h = grad_output @ feedback_matrices[layer].t()    # dL/d(input of layer + 1), by D
        delta = grad_h * (pre[layer] > 0).to(grad_h.dtype)     # through relu
        grads[layer] = (delta.t() @ activations[layer], delta.sum(0))
    return grads
