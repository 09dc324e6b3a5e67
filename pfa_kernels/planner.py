"""Cost model for the PFA backward: which order computes dL/dx and dL/dR, and on which backend.

Both orders are exact (docs/design.md section 2); they differ in multiply-adds (MACs). With
P = N * prod(out_spatial) output positions, K = (C_in / groups) * prod(kernel) inputs per output
and G = groups:

    mid error        g_mid = B^T g                          P * C_out * C_mid
    dL/dx sequence   conv_transpose(g_mid, R), grouped       P * C_mid * K
    dL/dx product    W_fb = B·R (dense over groups)          C_out * C_mid * K
                     + conv_transpose(g, W_fb), dense        P * C_out * K * G
    dL/dR sequence   conv_weight(x, g_mid), grouped          P * C_mid * K
    dL/dR product    B^T · dL/dW                             C_out * C_mid * K
                     (+ for G > 1, the dense correlation conv_weight(x, g) with groups=1, of which
                     dL/dW is the diagonal blocks: P * C_out * K * (G - 1) more than BP's dL/dW)

The mid error is paid once if either gradient takes the sequence order.

Projected layers (docs/design.md section 2.4) hold Z (W's shape, dense over groups) and M_j = B_j B_j^T per
group j. Their feedback weight is W_fb_j = M_j Z_j; with w the inner width of that product (C_out
when M is kept, 2 * C_mid/G when it is applied as B_j (B_j^T ·), see feedback.py):

    dL/dx product    W_fb = M·Z                              G * C_out * w * K
                     + conv_transpose(g, W_fb), dense        P * C_out * K * G
    dL/dx sequence   g' = M_j g per position and group       P * G * C_out * w
                     + conv_transpose(g', Z), grouped        P * C_out * K * G
    dL/dZ            dL/dW (G = 1), or the dense correlation  as for dL/dR product, without B^T

so nothing scales with C_mid. Example, ResNet-18's
last 3x3 conv at batch 16 (P = 784, C = 512, r = 10): dL/dx costs 13.9 GMAC in product order and
20.6 GMAC in sequence order; a linear layer with batch 8 and C = 1024 costs 10.7 GMAC in product
order and 0.2 GMAC in sequence order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STRATEGIES = ("auto", "product", "sequence", "reference")
ORDERS = ("product", "sequence")


@dataclass(frozen=True)
class Plan:
    """What the backward will do, and why.

    input_order / feedback_grad_order: "product" or "sequence" (None when that gradient is not
    needed); a projected layer's feedback_grad_order is "correlation" (dL/dZ, see above).
    macs: multiply-adds of each candidate (input_order, feedback_grad_order) pair, and of
    backpropagation's own backward ("bp").
    timings: for backend="auto", the measured seconds of every candidate that agreed ("backend:orders"), and the
    errors and rejections beside them (dispatch.py); empty before the first backward of the shape.
    """

    input_order: str | None
    feedback_grad_order: str | None
    backend: str
    macs: dict = field(compare=False)
    reason: str = field(compare=False, default="")
    timings: dict = field(compare=False, default_factory=dict)


@dataclass(frozen=True)
class LayerShape:
    """Sizes the cost model needs: P output positions, channels, K inputs per output, groups."""

    positions: int
    out_channels: int
    mid_channels: int
    in_per_group_times_kernel: int
    groups: int
    parametrization: str = "explicit"
    projection_width: int = 0  # projected layers: inner width of M_j Z_j (C_out, or 2 * C_mid/G factored)


def layer_shape(grad_output_shape, weight_shape, mid_channels: int, groups: int, parametrization: str = "explicit",
                projection_width: int = 0) -> LayerShape:
    """LayerShape of a linear (weight 2-d, any leading dims) or conv layer from its tensor shapes."""
    out_channels = weight_shape[0]
    fan = math.prod(weight_shape[1:])
    if len(weight_shape) == 2:
        positions = math.prod(grad_output_shape[:-1])
    else:
        positions = grad_output_shape[0] * math.prod(grad_output_shape[2:])
    return LayerShape(positions, out_channels, mid_channels, fan, groups, parametrization, projection_width)


def candidate_macs(shape: LayerShape, need_input_grad: bool, need_weight_grad: bool, need_feedback_grad: bool):
    """MACs of every (input_order, feedback_grad_order) pair, plus "bp" (BP's backward for the layer)."""
    if shape.parametrization == "projected":
        return _projected_candidate_macs(shape, need_input_grad, need_weight_grad, need_feedback_grad)
    P, C_out, C_mid, K, G = (
        shape.positions, shape.out_channels, shape.mid_channels, shape.in_per_group_times_kernel, shape.groups)
    mid_error = P * C_out * C_mid
    input_cost = {"product": C_out * C_mid * K + P * C_out * K * G, "sequence": P * C_mid * K}
    weight_grad = P * C_out * K
    feedback_cost = {
        "product": C_out * C_mid * K + (P * C_out * K * (G - 1) if G > 1 else 0)
        + (0 if need_weight_grad else weight_grad),
        "sequence": P * C_mid * K,
    }
    input_choices = ORDERS if need_input_grad else (None,)
    feedback_choices = ORDERS if need_feedback_grad else (None,)
    macs = {}
    for input_order in input_choices:
        for feedback_order in feedback_choices:
            total = (weight_grad if need_weight_grad else 0)
            total += input_cost[input_order] if input_order else 0
            total += feedback_cost[feedback_order] if feedback_order else 0
            if "sequence" in (input_order, feedback_order):
                total += mid_error
            macs[(input_order, feedback_order)] = total
    macs["bp"] = (P * C_out * K if need_input_grad else 0) + (weight_grad if need_weight_grad else 0)
    return macs


def _projected_candidate_macs(shape: LayerShape, need_input_grad, need_weight_grad, need_feedback_grad):
    P, C_out, K, G, width = (
        shape.positions, shape.out_channels, shape.in_per_group_times_kernel, shape.groups, shape.projection_width)
    dense_dgrad = P * C_out * K * G
    input_cost = {"product": G * C_out * width * K + dense_dgrad, "sequence": P * G * C_out * width + dense_dgrad}
    weight_grad = P * C_out * K
    # dL/dZ is the correlation conv_weight(x, g) with groups = 1; for G = 1 it is dL/dW itself.
    feedback_cost = P * C_out * K * (G - 1) + (0 if need_weight_grad else weight_grad)
    macs = {}
    for input_order in ORDERS if need_input_grad else (None,):
        total = (weight_grad if need_weight_grad else 0) + (input_cost[input_order] if input_order else 0)
        macs[(input_order, "correlation" if need_feedback_grad else None)] = total + (
            feedback_cost if need_feedback_grad else 0)
    macs["bp"] = (P * C_out * K if need_input_grad else 0) + (weight_grad if need_weight_grad else 0)
    return macs


def choose_orders(shape: LayerShape, strategy: str, need_input_grad: bool, need_weight_grad: bool,
                  need_feedback_grad: bool, backend: str = "torch") -> Plan:
    """The plan for one backward call. strategy "auto" takes the cheapest pair by MACs."""
    macs = candidate_macs(shape, need_input_grad, need_weight_grad, need_feedback_grad)
    pairs = [key for key in macs if key != "bp"]
    if strategy in ("product", "sequence"):
        input_order = strategy if need_input_grad else None
        feedback_order = strategy if need_feedback_grad else None
        if shape.parametrization == "projected" and need_feedback_grad:
            feedback_order = "correlation"
        reason = f"strategy={strategy!r} requested"
    elif strategy == "auto":
        input_order, feedback_order = min(pairs, key=lambda pair: (macs[pair], pair != ("product", "product")))
        reason = f"cheapest of {len(pairs)} candidate orders by multiply-adds"
    else:
        raise ValueError(f"strategy must be 'auto', 'product' or 'sequence' for the fast backward; got {strategy!r}")
    return Plan(input_order, feedback_order, backend, macs, reason)


def check_strategy(strategy) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    return strategy


def triton_fuses_sequence(spatial_dims: int, groups: int, parametrization: str, keeps_projection_matrix: bool) -> bool:
    """Whether the fused Triton sequence-order input gradient covers a layer: linear, 1-d or 2-d, groups = 1
    (and, projected, M kept). Other layers run that one gradient in PyTorch, and their Plan says so."""
    return spatial_dims <= 2 and groups == 1 and (parametrization == "explicit" or keeps_projection_matrix)
