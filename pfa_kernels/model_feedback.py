"""Model-level feedback products: W_fb of every PFA layer of a model, formed together.

    weights = pk.feedback_weights(model)     # {layer name: W_fb (W's shape; dense if groups > 1)}

With the Triton backend, every layer's (and every group's) product B_j·R_j or M_j·Z_j is one tile range of
a single grouped-GEMM launch (plus one more launch for projected layers that apply M through B), whose tables
reach the GPU in a copy that does not block the host. Other backends form them layer by layer. For metrics,
checks, or a training loop that wants all W_fb at once.
"""

from __future__ import annotations

import torch
from torch import nn

from . import dispatch
from .nn import PFA_LAYERS


@torch.no_grad()
def feedback_weights(model: nn.Module, backend: str = "auto") -> dict[str, torch.Tensor]:
    """{qualified name: W_fb} for every PFA layer of `model` (one dtype and device), computed together."""
    layers = {name or type(model).__name__: m for name, m in model.named_modules() if isinstance(m, PFA_LAYERS)}
    if not layers:
        return {}
    device = next(iter(layers.values())).weight.device
    # "auto" forms the products layer by layer in PyTorch (the static rule: nothing here has been measured);
    # a named backend must be available and take the dtype (float64: not Triton).
    backend = dispatch.check_backend(backend, device.type, next(iter(layers.values())).weight.dtype, device)
    if backend != "triton":
        return {name: layer.feedback_weight() for name, layer in layers.items()}
    # Fixed rules and grouped feedback (its products are C_out/G-row blocks already in W's layout) layer by layer.
    fixed = {name: layer.feedback_weight() for name, layer in layers.items()
             if layer.rule != "pfa" or layer.feedback.grouped}
    layers = {name: layer for name, layer in layers.items() if name not in fixed}
    if not layers:
        return fixed
    from .backends.triton import grouped_matmul as _grouped_matmul  # noqa: F401  (registers the op)
    from .backends.triton.pieces import B_by_group, columns_by_group

    lefts, rights, slots, inner_slots = [], [], [], []
    for name, layer in layers.items():
        feedback = layer.feedback
        groups = feedback.groups
        B_groups = None if feedback.M is not None else B_by_group(feedback.B, groups)  # M: B is not read (nor held)
        if feedback.parametrization == "explicit":
            R = feedback.effective_R()
            right_groups = list(R.reshape(groups, R.shape[0] // groups, -1).unbind(0))
            left_groups = B_groups
        elif feedback.M is not None:
            right_groups, left_groups = columns_by_group(feedback.Z, groups), list(feedback.M.unbind(0))
        else:  # M applied through B: B_j^T Z_j now, B_j times that in a second launch
            right_groups, left_groups = columns_by_group(feedback.Z, groups), [B_j.t() for B_j in B_groups]
            inner_slots += [(name, j, B_groups[j]) for j in range(groups)]
        for j in range(groups):
            lefts.append(left_groups[j])
            rights.append(right_groups[j])
            slots.append((name, j))
    products = dict(zip(slots, torch.ops.pfa_kernels.triton_grouped_matmul(lefts, rights), strict=True))
    if inner_slots:
        second = torch.ops.pfa_kernels.triton_grouped_matmul([B_j for _, _, B_j in inner_slots],
                                                             [products[(name, j)] for name, j, _ in inner_slots])
        products.update({(name, j): product for (name, j, _), product in zip(inner_slots, second, strict=True)})
    weights = dict(fixed)
    for name, layer in layers.items():
        groups, out_channels = layer.feedback.groups, layer.weight.shape[0]
        dense_shape = (out_channels, layer.weight.shape[1] * groups, *layer.weight.shape[2:])
        stacked = torch.stack([products[(name, j)] for j in range(groups)], dim=1)
        weights[name] = stacked.reshape(dense_shape)
    return weights
