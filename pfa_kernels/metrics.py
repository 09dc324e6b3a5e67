"""Alignment metrics of PFA layers (docs/design.md section 1).

- path_alignment(layer): angle in degrees between flatten(W) and flatten(W_fb = B·R); for grouped
  convs W is embedded block-diagonally in W_fb's dense shape. Theory for R = B^T W and random B:
  arccos(1 / sqrt(1 + 1/r)), 17.5 degrees at r = 10.
- norm_ratio(layer): ||W_fb||_F / ||W||_F (theory for R = B^T W: sqrt(1 + 1/r), 1.049 at r = 10).
- report(model): one row per PFA layer.
- input_gradient_alignment(model, inputs, loss_fn): per layer, the angle between the loss gradient
  with respect to the layer's input under PFA and under backpropagation, for one batch.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn

from .nn import PFA_LAYERS


def _check_layer(layer):
    if not isinstance(layer, PFA_LAYERS):
        raise TypeError(f"layer must be a PFA layer ({', '.join(c.__name__ for c in PFA_LAYERS)}); "
                        f"got {type(layer).__name__}")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """W in W_fb's shape: W itself, or block-diagonal (C_out, C_in, *kernel) when groups > 1."""
    weight = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    if groups == 1:
        return weight
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    dense = weight.new_zeros(weight.shape[0], in_per_group * groups, *weight.shape[2:])
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        dense[rows, group * in_per_group:(group + 1) * in_per_group] = weight[rows]
    return dense


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors seen as flat vectors, in degrees (computed in float64)."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    cosine = torch.dot(a, b) / (a.norm() * b.norm())
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine.item()))))


def _weight_pair(layer):
    """(W, W_fb) in one shape: W_fb's (PFA's is dense over groups; a fixed rule's has W's own shape)."""
    feedback_weight = layer.feedback_weight()
    weight = layer.weight.detach()
    return (weight if feedback_weight.shape == weight.shape else dense_weight(layer)), feedback_weight


@torch.no_grad()
def path_alignment(layer: nn.Module) -> float:
    """Angle in degrees between the layer's forward weight W and its feedback weight W_fb (B·R for PFA; for a
    fixed-feedback rule this is the weight alignment of FA / sign symmetry)."""
    _check_layer(layer)
    return angle_degrees(*_weight_pair(layer))


@torch.no_grad()
def norm_ratio(layer: nn.Module) -> float:
    """||W_fb||_F / ||W||_F."""
    _check_layer(layer)
    return (layer.feedback_weight().double().norm() / layer.weight.detach().double().norm()).item()


def theoretical_alignment(expand_ratio: float) -> float:
    """Expected path alignment (degrees) once B·R = B B^T W: arccos(1 / sqrt(1 + 1/r))."""
    return math.degrees(math.acos(1 / math.sqrt(1 + 1 / expand_ratio)))


def report(model: nn.Module) -> list[dict]:
    """A row per PFA layer of `model`: name, type, weight shape, C_mid, path alignment, norm ratio."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, PFA_LAYERS):
            rows.append({
                "layer": name or type(module).__name__,
                "type": type(module).__name__,
                "weight_shape": tuple(module.weight.shape),
                "rule": module.rule,
                "mid_channels": module.feedback.mid_channels,
                "path_alignment": path_alignment(module),
                "norm_ratio": norm_ratio(module),
            })
    return rows


def format_report(rows: list[dict]) -> str:
    """report(model) as a fixed-width text table."""
    header = f"{'layer':<32} {'type':<10} {'weight shape':<20} {'C_mid':>6} {'align (deg)':>11} {'norm ratio':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['layer']:<32} {row['type']:<10} {str(row['weight_shape']):<20} {row['mid_channels']:>6} "
                     f"{row['path_alignment']:>11.2f} {row['norm_ratio']:>10.3f}")
    return "\n".join(lines)


def _input_gradients(model, inputs, loss_fn, layers):
    """dL/d(input) of each layer for one forward/backward, without touching any .grad."""
    captured, handles = {}, []

    def capture(name):
        def pre_hook(module, args):
            x = args[0]
            if not x.requires_grad:  # the first layer's input: give it a gradient to report
                x = x.detach().requires_grad_(True)
            captured[name] = x
            return (x, *args[1:])
        return pre_hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(capture(name)))
    try:
        loss = loss_fn(model(inputs))
    finally:
        for handle in handles:
            handle.remove()
    names = list(captured)
    grads = torch.autograd.grad(loss, [captured[n] for n in names], allow_unused=True)
    return dict(zip(names, grads, strict=True))


def input_gradient_alignment(model: nn.Module, inputs: torch.Tensor, loss_fn) -> dict[str, float]:
    """Per PFA layer: angle (degrees) between PFA's and backpropagation's dL/d(layer input) for one batch.

    inputs: the model's input batch; loss_fn: maps the model's output to a scalar loss. Both runs
    see the same batch, the same random state (dropout) and the same buffers: BatchNorm running
    statistics, .grad fields and the RNG are restored, so training continues as if this was never
    called. In the BP run every PFA layer uses its own W as feedback (B·R replaced by W).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PFA_LAYERS)}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            pfa_grads = _input_gradients(model, inputs, loss_fn, layers)
        _restore_buffers(model, buffers)
        with torch.random.fork_rng(devices=devices), _backpropagation_forward(layers):
            bp_grads = _input_gradients(model, inputs, loss_fn, layers)
    finally:
        _restore_buffers(model, buffers)
    return {name: angle_degrees(pfa_grads[name], bp_grads[name]) for name in layers
            if pfa_grads.get(name) is not None and bp_grads.get(name) is not None}


@contextlib.contextmanager
def _backpropagation_forward(layers):
    """Within the block, each PFA layer runs its nn base class's forward: plain backpropagation."""
    for layer in layers.values():
        nn_base = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn"))
        layer.forward = functools.partial(nn_base.forward, layer)
    try:
        yield
    finally:
        for layer in layers.values():
            del layer.forward


@torch.no_grad()
def _restore_buffers(model, buffers):
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
