"""A PFA linear layer's cached fast path: the last call that took the C++ eager twin (ops._cpp_eager_order), kept
with everything that call's checks and plan lookup depended on, so that the next call with the same input and an
unchanged layer and dispatch table goes straight to it.

In a 64x64 layer's forward and backward, the layer's tensors, functional's checks and the lookup of the measured
plan cost about 35 us (154 us in all, nn 94 us); comparing against a ticket costs a fraction of that. Anything a
ticket does not hold equal (a new input shape, dtype, device or requires_grad, another weight, bias or feedback
object or a change of their dtype, device or requires_grad, strategy, backend, autocast, grad mode, deterministic
mode, dispatch mode, a cleared or loaded dispatch table) sends the call through the full path, which issues a new
ticket where the twin applies.
"""

from __future__ import annotations

import torch

from . import dispatch, ops
from .backends import cpp as cpp_backend


class EagerTicket:
    """What held when a layer's call took the C++ twin, and the input gradient's order it ran with."""

    __slots__ = ("x_shape", "dtype", "device", "weight", "bias", "feedback", "M", "Z", "requires_grad", "strategy",
                 "backend", "deterministic", "generation", "sequence")

    def __init__(self, layer, x: torch.Tensor, order: str):
        self.x_shape, self.dtype, self.device = x.shape, x.dtype, x.device
        feedback = layer._modules["feedback"]
        self.weight, self.bias, self.feedback = layer._parameters["weight"], layer._parameters["bias"], feedback
        self.M, self.Z = feedback._buffers["M"], feedback._parameters["Z"]
        self.requires_grad = _requires_grad(self.weight, self.bias, self.Z)
        self.strategy, self.backend = layer.strategy, layer.backend
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.generation = dispatch.generation()
        self.sequence = order == "sequence"

    def admits(self, layer, x) -> bool:
        """Whether this call is the ticket's: the same kind of input to the same, unchanged layer, in the same
        modes (the common training call: grad mode on, x requiring grad). Not under torch.compile: the caller
        checks that first."""
        weight, feedback = self.weight, self.feedback
        return (type(x) is torch.Tensor and x.requires_grad and torch.is_grad_enabled() and x.shape == self.x_shape
                and x.dtype is self.dtype and x.device == self.device
                and layer._parameters["weight"] is weight and layer._parameters["bias"] is self.bias
                and layer._modules["feedback"] is feedback and feedback._buffers["M"] is self.M
                and feedback._parameters["Z"] is self.Z
                and weight.dtype is self.dtype and weight.device == self.device and self.Z.dtype is self.dtype
                and _requires_grad(weight, self.bias, self.Z) == self.requires_grad
                and layer.strategy == self.strategy and layer.backend == self.backend
                and not torch.is_autocast_enabled(self.device.type)
                and torch.are_deterministic_algorithms_enabled() == self.deterministic
                and dispatch.generation() == self.generation and dispatch.mode() == "measure")

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return cpp_backend.EAGER.eager_projected_linear(x, self.weight, self.bias, self.M, self.Z, self.sequence,
                                                        self.strategy, self.backend)


def _requires_grad(weight, bias, Z) -> tuple[bool, bool, bool]:
    return weight.requires_grad, bias is not None and bias.requires_grad, Z.requires_grad


def issue(layer, x, weight, B, M, feedback, parametrization) -> EagerTicket | None:
    """A ticket for this call of a PFA linear layer (after its full path ran), where the call took the C++ twin."""
    if (cpp_backend.EAGER is None or type(x) is not torch.Tensor or not x.requires_grad
            or torch.is_autocast_enabled(x.device.type) or not ops._eager(x, weight, layer.bias, B, M, feedback)):
        return None
    order = ops._cpp_eager_order(x, weight, layer.bias, B, M, feedback, parametrization, layer.strategy,
                                 layer.backend)
    return None if order is None else EagerTicket(layer, x, order)
