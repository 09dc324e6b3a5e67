"""The PFA backward in pure PyTorch: runs on any device, and is the baseline the other backends beat.

No forward pass through R is ever run: the mid error's shape follows from the output's. Both
orders of docs/design.md section 2.2 are here; the planner (planner.py) says which one a call takes.

Shapes (groups G; a linear layer has no kernel or spatial dims and any leading dims in x):

    grad_output (N, C_out, *out_spatial)     x (N, C_in, *spatial)
    weight (C_out, C_in/G, *kernel)          B (C_out, C_mid)        R (C_mid, C_in/G, *kernel)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..planner import Plan


def feedback_product(B: torch.Tensor, R: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W_fb = B·R contracted over C_mid: (C_out, C_in, *kernel), dense over groups (docs/design.md §2.3).

    B (C_out, C_mid), R (C_mid, C_in/groups, *kernel). For groups = 1 this is one GEMM of
    C_out x C_mid x |R|/C_mid; for groups > 1, one batched GEMM per group.
    """
    out_channels, mid_channels = B.shape
    R_by_group = R.reshape(groups, mid_channels // groups, math.prod(R.shape[1:]))  # (G, C_mid/G, K)
    dense = torch.bmm(grouped_B(B, groups), R_by_group)                              # (G, C_out, K)
    in_per_group = R.shape[1]
    dense = dense.reshape(groups, out_channels, in_per_group, *R.shape[2:]).transpose(0, 1)
    return dense.reshape(out_channels, groups * in_per_group, *R.shape[2:])


def feedback_grad_from_correlation(B: torch.Tensor, correlation: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """dL/dR = B^T contracted with the dense output/input correlation (docs/design.md §2.3).

    B (C_out, C_mid); correlation (C_out, C_in, *kernel) = conv_weight(x, g) with groups = 1, which
    for groups = 1 is dL/dW itself. Returns (C_mid, C_in/groups, *kernel).
    """
    in_per_group = correlation.shape[1] // groups
    B_transposed = grouped_B(B, groups).transpose(1, 2)                                  # (G, C_mid/G, C_out)
    grad = torch.bmm(B_transposed, grouped_columns(correlation, groups))                 # (G, C_mid/G, K)
    return grad.reshape(B.shape[1], in_per_group, *correlation.shape[2:])


def weight_grad_from_correlation(correlation: torch.Tensor, groups: int) -> torch.Tensor:
    """dL/dW of a grouped conv: the diagonal (group j, group j) blocks of the dense correlation.

    correlation (C_out, C_in, *kernel). Returns (C_out, C_in/groups, *kernel).
    """
    out_channels, in_channels = correlation.shape[:2]
    blocks = correlation.reshape(groups, out_channels // groups, groups, in_channels // groups,
                                 math.prod(correlation.shape[2:]))
    diagonal = torch.diagonal(blocks, dim1=0, dim2=2)  # (C_out/G, C_in/G, K, G)
    return diagonal.permute(3, 0, 1, 2).reshape(out_channels, in_channels // groups, *correlation.shape[2:])


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (prod(...), C) with explicit sizes: reshape(-1, C) is ambiguous for zero-element tensors
    (an empty batch, or C_in / C_out = 0), which must give empty or zero gradients as nn's layers do."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


def mid_error(grad_output: torch.Tensor, B: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """g_mid = B^T g at every position: grad_output with C_out channels at channel_dim -> C_mid."""
    return torch.matmul(grad_output.movedim(channel_dim, -1), B).movedim(-1, channel_dim)


def _conv_grads_for(x, weight, stride, padding, dilation, need_bias):
    """convolution_backward on input x with these conv arguments, as conv_grads(grad, weight_like, groups, mask)
    -> (dL/dx, dL/dweight_like, dL/db); only weight_like's shape matters for the weight gradient."""
    bias_sizes = [weight.shape[0]] if need_bias else None
    output_padding = [0] * (x.dim() - 2)

    def conv_grads(grad, weight_like, conv_groups, mask):
        return torch.ops.aten.convolution_backward(grad, x, weight_like, bias_sizes if mask[2] else None, stride,
                                                   padding, dilation, False, output_padding, conv_groups, mask)
    return conv_grads


def _fill_weight_and_bias(conv_grads, grad_output, weight, groups, grad_weight, grad_bias, need_weight, need_bias):
    """BP's own dL/dW and dL/db for whichever of them a cheaper path did not already give (None there)."""
    missing_weight, missing_bias = need_weight and grad_weight is None, need_bias and grad_bias is None
    if missing_weight or missing_bias:
        _, bp_weight, bp_bias = conv_grads(grad_output, weight, groups, [False, missing_weight, missing_bias])
        grad_weight = bp_weight if missing_weight else grad_weight
        grad_bias = bp_bias if missing_bias else grad_bias
    return grad_weight, grad_bias


def linear_backward(grad_output, x, weight, B, R, plan: Plan, need_input, need_weight, need_bias, need_feedback,
                    pieces: Pieces | None = None):
    """Gradients of a PFA linear layer: (dL/dx, dL/dW, dL/db, dL/dR), None where not needed.

    grad_output (..., C_out), x (..., C_in), weight (C_out, C_in), B (C_out, C_mid), R (C_mid, C_in).
    pieces: the feedback-product kernels to use (another backend's; default: these PyTorch ones).
    """
    pieces = pieces or TORCH_PIECES
    x_rows = x if x.dim() == 2 else _rows(x)
    # One copy of an expanded or strided g for the GEMMs below (see projected_linear_backward).
    grad_rows = (grad_output if grad_output.dim() == 2 else _rows(grad_output)).contiguous()
    grad_x = grad_weight = grad_bias = grad_R = None

    correlation_needed = need_feedback and plan.feedback_grad_order == "product"
    if need_weight or correlation_needed:
        grad_weight = grad_rows.t().mm(x_rows)
    if need_bias:
        grad_bias = grad_rows.sum(0)

    fused_sequence = need_input and plan.input_order == "sequence" and pieces.sequence_input_grad is not None
    uses_mid_error = (plan.input_order == "sequence" and not fused_sequence) or plan.feedback_grad_order == "sequence"
    grad_mid = grad_rows.mm(B) if uses_mid_error else None
    if need_input:
        if plan.input_order == "product":
            grad_x = grad_rows.mm(pieces.feedback_product(B, R))
        elif fused_sequence:
            grad_x = pieces.sequence_input_grad(grad_rows, B, R, list(x_rows.shape), [], [], [])
        else:
            grad_x = grad_mid.mm(R)
        if grad_x.dim() != x.dim():
            grad_x = grad_x.reshape(x.shape)
    if need_feedback:
        if plan.feedback_grad_order == "product":
            grad_R = pieces.feedback_grad_from_correlation(B, grad_weight)
        else:
            grad_R = grad_mid.t().mm(x_rows)
    return grad_x, (grad_weight if need_weight else None), grad_bias, grad_R


def conv_backward(grad_output, x, weight, B, R, stride, padding, dilation, groups, plan: Plan,
                  need_input, need_weight, need_bias, need_feedback, pieces: Pieces | None = None):
    """Gradients of a PFA convolution (1d/2d/3d): (dL/dx, dL/dW, dL/db, dL/dR), None where not needed.

    grad_output (N, C_out, *out_spatial), x (N, C_in, *spatial), weight (C_out, C_in/G, *kernel),
    B (C_out, C_mid), R (C_mid, C_in/G, *kernel). Zero padding (other modes pad x before the op).
    pieces: the feedback-product kernels to use (another backend's; default: these PyTorch ones).
    """
    pieces = pieces or TORCH_PIECES
    conv_grads = _conv_grads_for(x, weight, stride, padding, dilation, need_bias)

    grad_x = grad_weight = grad_bias = grad_R = None
    correlation = None  # conv_weight(x, g) with groups = 1: dL/dW itself when groups = 1
    feedback_by_product = need_feedback and plan.feedback_grad_order == "product"

    if plan.input_order == "product":
        feedback_weight = pieces.feedback_product(B, R, groups)
        # One call gives dL/dx, dL/db and, when wanted, the correlation (for groups = 1, dL/dW itself).
        want_correlation = feedback_by_product or (groups == 1 and need_weight)
        grad_x, correlation, grad_bias = conv_grads(
            grad_output, feedback_weight, 1, [True, want_correlation, need_bias])
        correlation = correlation if want_correlation else None  # oneDNN may return it though masked out
    elif feedback_by_product:
        dense_shape = (weight.shape[0], weight.shape[1] * groups, *weight.shape[2:])
        # Only the shape of the weight matters for a weight gradient.
        dense_weight_like = weight.new_empty(dense_shape) if groups > 1 else weight
        _, correlation, grad_bias = conv_grads(grad_output, dense_weight_like, 1, [False, True, need_bias])

    if need_weight:
        if correlation is not None:
            grad_weight = correlation if groups == 1 else weight_grad_from_correlation(correlation, groups)
    grad_weight, grad_bias = _fill_weight_and_bias(conv_grads, grad_output, weight, groups, grad_weight, grad_bias,
                                                   need_weight, need_bias)

    if feedback_by_product:
        grad_R = pieces.feedback_grad_from_correlation(B, correlation, groups)

    sequence_input = need_input and plan.input_order == "sequence"
    if sequence_input and pieces.sequence_input_grad is not None:  # fused: g_mid never in memory
        grad_x = pieces.sequence_input_grad(grad_output, B, R, list(x.shape), stride, padding, dilation)
        sequence_input = False
    sequence_feedback = need_feedback and plan.feedback_grad_order == "sequence"
    if sequence_input or sequence_feedback:
        grad_mid = mid_error(grad_output, B, channel_dim=1)
        seq_x, seq_R, _ = conv_grads(grad_mid, R, groups, [sequence_input, sequence_feedback, False])
        grad_x = seq_x if sequence_input else grad_x
        grad_R = seq_R if sequence_feedback else grad_R

    return (grad_x if need_input else None), (grad_weight if need_weight else None), grad_bias, grad_R


# ----------------------------------------------------------------------------- projected (docs/design.md §2.4)
#
# A projected layer holds Z (C_out, C_in, *kernel), dense over groups, and, per group j, the fixed
# M_j = B_j B_j^T (G, C_out, C_out), where B_j (C_out, C_mid/G) are B's columns of group j. M is None
# when it is cheaper to apply it as B_j (B_j^T ·) (feedback.py decides): nothing here has C_mid in its
# shape unless M is None.


def grouped_B(B: torch.Tensor, groups: int) -> torch.Tensor:
    """B (C_out, C_mid) -> (G, C_out, C_mid/G): group j's columns B_j, a strided view of B."""
    return B.reshape(B.shape[0], groups, B.shape[1] // groups).transpose(0, 1)


def grouped_columns(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in, *kernel) -> (G, C_out, C_in/G * prod(kernel)): the input columns of each group (a view when
    dense is contiguous). Explicit sizes: reshape cannot infer one from zero elements."""
    return dense.reshape(dense.shape[0], groups, math.prod(dense.shape[1:]) // groups).transpose(0, 1)


def apply_projection(B: torch.Tensor, M: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
    """M_j · columns_j for every group j: columns (G, C_out, n) -> (G, C_out, n).

    M (G, C_out, C_out), or None to apply B_j (B_j^T ·) with B (C_out, C_mid).
    """
    if M is not None:
        return torch.bmm(M, columns)
    B_by_group = grouped_B(B, columns.shape[0])  # (G, C_out, C_mid/G)
    return torch.bmm(B_by_group, torch.bmm(B_by_group.transpose(1, 2), columns))


def projected_feedback_product(B: torch.Tensor, M: torch.Tensor | None, Z: torch.Tensor, groups: int = 1):
    """W_fb = M·Z per group: (C_out, C_in, *kernel), dense over groups, like feedback_product(B, R).

    B (C_out, C_mid), M (G, C_out, C_out) or None, Z (C_out, C_in, *kernel).
    """
    product = apply_projection(B, M, grouped_columns(Z, groups))  # (G, C_out, K)
    return product.transpose(0, 1).reshape(Z.shape)


def projected_error(grad_output: torch.Tensor, B: torch.Tensor, M: torch.Tensor | None, groups: int,
                    channel_dim: int) -> torch.Tensor:
    """g'_j = M_j g at every position, stacked over groups: C_out channels -> G * C_out channels."""
    rows = grad_output.movedim(channel_dim, -1)
    flat = _rows(rows)
    positions, out_channels = flat.shape
    flat = flat.t().unsqueeze(0).expand(groups, out_channels, positions)  # (G, C_out, positions)
    projected = apply_projection(B, M, flat)  # M is symmetric: M_j g = (g^T M_j)^T
    projected = projected.reshape(groups * out_channels, positions).t()  # (positions, G * C_out)
    return projected.reshape(*rows.shape[:-1], groups * out_channels).movedim(-1, channel_dim)


def _distinct(grad_feedback, grad_weight):
    """dL/dZ of an ungrouped layer is dL/dW: return a copy when both are handed out, so that the
    two .grad fields never share memory (an in-place clip of one must not touch the other)."""
    return grad_feedback.clone() if grad_feedback is grad_weight else grad_feedback


def projected_linear_backward(grad_output, x, weight, B, M, Z, plan: Plan, need_input, need_weight, need_bias,
                              need_feedback, pieces: Pieces | None = None):
    """Gradients of a projected PFA linear layer: (dL/dx, dL/dW, dL/db, dL/dZ), None where not needed.

    grad_output (..., C_out), x (..., C_in), weight and Z (C_out, C_in), B (C_out, C_mid),
    M (1, C_out, C_out) or None. pieces: the kernels to use (default: these PyTorch ones).
    """
    pieces = pieces or TORCH_PIECES
    # 2-D inputs as they are: each reshape is a few us of dispatch, a visible share of a small layer's backward.
    x_rows = x if x.dim() == 2 else _rows(x)
    # One copy of an expanded or strided g (loss.sum()'s is all stride 0) for the GEMMs below, each of which would
    # otherwise copy it again or take a slow path: 71 -> 31 us for a 64x64 layer.
    grad_rows = (grad_output if grad_output.dim() == 2 else _rows(grad_output)).contiguous()
    grad_x = grad_weight = grad_bias = grad_Z = None
    if need_weight or need_feedback:
        grad_weight = grad_rows.t().mm(x_rows)
    if need_bias:
        grad_bias = grad_rows.sum(0)
    if need_input:
        if plan.input_order == "product":
            if M is not None and pieces is TORCH_PIECES:  # W_fb = M Z as one GEMM (the linear layer's one group)
                grad_x = grad_rows.mm(M[0].mm(Z))
            else:
                grad_x = grad_rows.mm(pieces.projected_feedback_product(B, M, Z))
        elif pieces.sequence_input_grad is not None and M is not None:  # fused: (g M) Z, M symmetric
            grad_x = pieces.sequence_input_grad(grad_rows, M[0], Z, list(x_rows.shape), [], [], [])
        elif M is not None:  # (g M) Z: M is symmetric, so g M = (M g^T)^T, each row's projected error
            grad_x = grad_rows.mm(M[0]).mm(Z)
        else:
            grad_x = projected_error(grad_rows, B, M, 1, channel_dim=1).mm(Z)
        if grad_x.dim() != x.dim():
            grad_x = grad_x.reshape(x.shape)
    if need_feedback:
        grad_Z = grad_weight.clone() if need_weight else grad_weight  # separate memory for the two .grad fields
    return grad_x, (grad_weight if need_weight else None), grad_bias, grad_Z


def projected_conv_backward(grad_output, x, weight, B, M, Z, stride, padding, dilation, groups, plan: Plan,
                            need_input, need_weight, need_bias, need_feedback, pieces: Pieces | None = None):
    """Gradients of a projected PFA convolution (1d/2d/3d): (dL/dx, dL/dW, dL/db, dL/dZ), None where not needed.

    grad_output (N, C_out, *out_spatial), x (N, C_in, *spatial), weight (C_out, C_in/G, *kernel),
    B (C_out, C_mid), M (G, C_out, C_out) or None, Z (C_out, C_in, *kernel). Zero padding.
    pieces: the kernels to use (default: these PyTorch ones).
    """
    pieces = pieces or TORCH_PIECES
    conv_grads = _conv_grads_for(x, weight, stride, padding, dilation, need_bias)

    grad_x = grad_weight = grad_bias = None
    correlation = None  # conv_weight(x, g) with groups = 1: dL/dZ, and dL/dW itself when groups = 1
    want_correlation = need_feedback or (groups == 1 and need_weight)
    if need_input and plan.input_order == "product":
        grad_x, correlation, grad_bias = conv_grads(
            grad_output, pieces.projected_feedback_product(B, M, Z, groups), 1, [True, want_correlation, need_bias])
        correlation = correlation if want_correlation else None  # oneDNN may return it though masked out
    elif need_feedback:
        _, correlation, grad_bias = conv_grads(grad_output, Z, 1, [False, True, need_bias])

    if need_weight and correlation is not None:
        grad_weight = correlation if groups == 1 else weight_grad_from_correlation(correlation, groups)
    grad_weight, grad_bias = _fill_weight_and_bias(conv_grads, grad_output, weight, groups, grad_weight, grad_bias,
                                                   need_weight, need_bias)

    fused = pieces.sequence_input_grad is not None and groups == 1 and M is not None
    if need_input and plan.input_order == "sequence" and fused:  # conv_transpose(M g, Z), M g never in memory
        grad_x = pieces.sequence_input_grad(grad_output, M[0], Z, list(x.shape), stride, padding, dilation)
    elif need_input and plan.input_order == "sequence":
        # conv_transpose(M g, Z): the groups' projected errors against Z's columns of each group.
        out_channels = Z.shape[0]
        in_per_group = Z.shape[1] // groups
        Z_grouped = Z.reshape(out_channels, groups, in_per_group, *Z.shape[2:]).transpose(0, 1).reshape(
            groups * out_channels, in_per_group, *Z.shape[2:])
        grad_x, _, _ = conv_grads(projected_error(grad_output, B, M, groups, channel_dim=1), Z_grouped, groups,
                                  [True, False, False])
    grad_Z = None
    if need_feedback:
        grad_Z = _distinct(correlation, grad_weight) if need_weight else correlation
    return grad_x, (grad_weight if need_weight else None), grad_bias, grad_Z


# ----------------------------------------------------------------------------- direct (fixed-feedback rules)


def direct_linear_backward(grad_output, x, weight, feedback_weight, need_input, need_weight, need_bias):
    """Backpropagation with W_fb in dL/dx: (dL/dx, dL/dW, dL/db, None). feedback_weight has W's shape (C_out, C_in)."""
    x_rows, grad_rows = _rows(x), _rows(grad_output)
    grad_x = grad_rows.mm(feedback_weight).reshape(x.shape) if need_input else None
    grad_weight = grad_rows.t().mm(x_rows) if need_weight else None
    grad_bias = grad_rows.sum(0) if need_bias else None
    return grad_x, grad_weight, grad_bias, None


def direct_conv_backward(grad_output, x, weight, feedback_weight, stride, padding, dilation, groups, need_input,
                         need_weight, need_bias):
    """Backpropagation with W_fb in dL/dx for a convolution; feedback_weight has W's (grouped) shape."""
    conv_grads = _conv_grads_for(x, weight, stride, padding, dilation, need_bias)
    grad_x = conv_grads(grad_output, feedback_weight, groups, [True, False, False])[0] if need_input else None
    grad_weight, grad_bias = _fill_weight_and_bias(conv_grads, grad_output, weight, groups, None, None, need_weight,
                                                   need_bias)
    return grad_x, grad_weight, grad_bias, None


@dataclass(frozen=True)
class Pieces:
    """The feedback-product kernels a backward uses; other backends (backends/triton) supply their own.

    sequence_input_grad(grad_output, B, R, input_size, stride, padding, dilation) -> dL/dx is a fused
    sequence-order input gradient (B^T g never in memory), or None to run it as two PyTorch ops.
    """

    feedback_product: Callable = feedback_product
    feedback_grad_from_correlation: Callable = feedback_grad_from_correlation
    projected_feedback_product: Callable = projected_feedback_product
    sequence_input_grad: Callable | None = None


TORCH_PIECES = Pieces()
