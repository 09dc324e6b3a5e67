"""Check a converted model on its own architecture and inputs: every PFA layer runs, learns, and equals the paper's
algorithm.

    report = pk.verify(model, (images,))     # on float64 copies; the model itself is not touched
    print(report); assert report.ok          # or pk.testing.assert_matches_reference(model, (images,))

One forward/backward of a float64 copy with the fast kernels, and one of a second copy in which every PFA layer
runs the literal algorithm (strategy="reference"; projected layers through their explicit twin, R = B^T Z + N).
Reported per PFA layer: how often its forward ran (0 means the model uses its weight without calling it, e.g.
F.linear(x, layer.weight): it trains with backpropagation), whether its feedback received a gradient, and the
relative error of its weight, bias and feedback gradients and of the model's input gradients against the literal
run. Fixed-feedback rules (FA, sign symmetry) are checked for calls only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn import PFA_LAYERS


@dataclass
class LayerCheck:
    name: str
    layer_type: str
    rule: str
    forward_calls: int
    feedback_has_grad: bool | None   # None for fixed-feedback rules, which learn no feedback
    errors: dict = field(default_factory=dict)  # gradient name -> relative error against the literal algorithm

    def problems(self, tolerance: float) -> list[str]:
        found = []
        if self.forward_calls == 0:
            found.append("its forward never ran (the model uses its weight directly): it trains with backpropagation")
        if self.feedback_has_grad is False:
            found.append("its feedback received no gradient")
        found += [f"{name} gradient differs from the literal algorithm by {error:.2e}"
                  for name, error in self.errors.items() if not error <= tolerance]
        return found


@dataclass
class VerifyReport:
    layers: list[LayerCheck]
    input_errors: dict
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.layers) and not self.problems()

    def problems(self) -> list[str]:
        found = [f"{layer.name}: {problem}" for layer in self.layers for problem in layer.problems(self.tolerance)]
        found += [f"input {name}: gradient differs from the literal algorithm by {error:.2e}"
                  for name, error in self.input_errors.items() if not error <= self.tolerance]
        if not self.layers:
            found.append("the model has no PFA layers (pk.convert it first)")
        return found

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'type':12s} {'rule':5s} {'calls':>5s} {'feedback grad':>13s} {'max error':>10s}"]
        for layer in self.layers:
            worst = max(layer.errors.values(), default=0.0)
            grad = {None: "-", True: "yes", False: "NO"}[layer.feedback_has_grad]
            lines.append(f"{layer.name:40s} {layer.layer_type:12s} {layer.rule:5s} {layer.forward_calls:5d} "
                         f"{grad:>13s} {worst:10.2e}")
        worst_input = max(self.input_errors.values(), default=0.0)
        lines.append(f"input gradients: max relative error {worst_input:.2e} (tolerance {self.tolerance:g})")
        lines += [f"PROBLEM {problem}" for problem in self.problems()]
        return "\n".join(lines)


def _relative_error(actual, expected, scale=None) -> float:
    """||actual - expected|| / scale (default ||expected||), absolute when the scale is 0."""
    scale = expected.norm().item() if scale is None else scale
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


def _as_float64(inputs):
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return tuple(t.detach().double().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in inputs)


def _output_tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _output_tensors(item)]
    return []


def _run(model, inputs, seed, grad_outputs=None):
    """Forward (same RNG for dropout) and backward with fixed random output gradients; returns them and the
    inputs' gradients."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        outputs = _output_tensors(model(*inputs))
    if grad_outputs is None:
        generator = torch.Generator().manual_seed(seed)
        grad_outputs = [torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device) for o in outputs]
    torch.autograd.backward(outputs, grad_outputs)
    return grad_outputs, [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


@torch.no_grad()
def _literal_twin(model):
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, PFA_LAYERS) and module.rule == "pfa":
            if module.parametrization == "projected":
                # R = B^T Z exactly in float64: the null-space part N (R = B^T Z + N) changes no W_fb and no
                # gradient, and the one re-derived from the seed is only float32-exact (B N ~ 1e-7).
                module.feedback = module.feedback.as_explicit(with_null=False)
            module.strategy = "reference"
    return twin


@torch.no_grad()
def _float64_copy(model):
    """model in float64, with each projected layer's M = B B^T recomputed in float64 (a float32 M is B B^T rounded,
    1e-7 away from the float64 product the literal algorithm forms)."""
    fast = copy.deepcopy(model).double()
    for module in fast.modules():
        if isinstance(module, PFA_LAYERS) and module.parametrization == "projected":
            module.feedback.refresh_projection_matrix()
    return fast


def verify(model: nn.Module, example_inputs, tolerance: float = 1e-8, seed: int = 0) -> VerifyReport:
    """One forward/backward of float64 copies of `model` on `example_inputs` (a tensor or a tuple of forward
    arguments): the fast kernels against the literal algorithm, per PFA layer. The model is not modified."""
    fast = _float64_copy(model)
    literal = _literal_twin(fast)
    calls = {}

    def counter(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
        return hook

    layers = {name: m for name, m in fast.named_modules() if isinstance(m, PFA_LAYERS)}
    handles = [layer.register_forward_pre_hook(counter(name)) for name, layer in layers.items()]
    try:
        fast_inputs, literal_inputs = _as_float64(example_inputs), _as_float64(example_inputs)
        grad_outputs, fast_input_grads = _run(fast, fast_inputs, seed)
        _, literal_input_grads = _run(literal, literal_inputs, seed, grad_outputs)
    finally:
        for handle in handles:
            handle.remove()
    literal_layers = dict(literal.named_modules())
    checks = []
    for name, layer in layers.items():
        twin = literal_layers[name]
        check = LayerCheck(name, type(layer).__name__, layer.rule, calls.get(name, 0), None)
        pairs = {"weight": (layer.weight.grad, twin.weight.grad)}
        if layer.bias is not None:
            pairs["bias"] = (layer.bias.grad, twin.bias.grad)
        if layer.rule == "pfa":
            grad = layer.feedback.parameter.grad
            check.feedback_has_grad = grad is not None
            if grad is not None and layer.parametrization == "projected":
                grad = layer.feedback.R_grad_from_weight_grad(grad)
            pairs["feedback"] = (grad, twin.feedback.parameter.grad)
        # Weight and bias against the norm of the layer's whole parameter gradient (dW, db): a bias in front of
        # a BatchNorm has a gradient that is 0 in exact arithmetic and ~1e-17 of rounding either way, whose
        # error relative to itself means nothing.
        parameter_scale = sum(expected.norm().item() ** 2 for label, (_, expected) in pairs.items()
                              if label in ("weight", "bias") and expected is not None) ** 0.5
        for label, (actual, expected) in pairs.items():
            if actual is not None and expected is not None:
                scale = parameter_scale if label in ("weight", "bias") else None
                check.errors[label] = _relative_error(actual, expected, scale)
            elif (actual is None) != (expected is None):
                check.errors[label] = float("inf")
        checks.append(check)
    input_errors = {f"#{i}": _relative_error(a, e)
                    for i, (a, e) in enumerate(zip(fast_input_grads, literal_input_grads, strict=True))
                    if a is not None and e is not None}
    return VerifyReport(checks, input_errors, tolerance)
