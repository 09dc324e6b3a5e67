"""A PFA linear layer's cached fast path: the last call that took the C++ eager twin (ops._cpp_eager_order), kept
with everything that call's checks and plan lookup depended on, so that the next call with the same input and an
unchanged layer and dispatch table goes straight to it.

In a 64x64 layer's forward and backward, the layer's tensors, functional's checks and the lookup of the measured
plan cost about 35 us (154 us in all, nn 94 us); comparing against a ticket costs about 8 us (129 us in all). Anything a
ticket does not hold equal sends the call through the full path, which issues a new ticket where the twin applies
(and drops the old one):
- the input: type, shape, dtype, device, requires_grad;
- the layer: the weight, bias, feedback, M and Z objects as registered, no B held, the weight's shape, the dtype and
  device of weight, Z and M, the requires_grad of weight, bias and Z, strategy and backend;
- the modes: grad mode, autocast, deterministic algorithms, the dispatch mode and the dispatch table's generation
  (dispatch.clear, load), and neither torch.compile nor torch.jit.trace at work (nn.py checks those first).
A layer drops its ticket when it is moved or cast (_apply), copied or pickled.
"""

from __future__ import annotations

import torch

from . import dispatch, ops
from .backends import cpp as cpp_backend


class EagerTicket:
    """What held when a layer's call took the C++ twin, and the input gradient's order it ran with."""

    __slots__ = ("x_shape", "dtype", "device", "device_type", "weight", "weight_shape", "bias", "feedback", "M", "Z",
                 "requires_grad", "strategy", "backend", "deterministic", "generation", "sequence")

    def __init__(self, layer, x: torch.Tensor, weight, bias, feedback, M, Z, order: str):
        self.x_shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.device_type = x.device.type  # (device.type took 5 us inside a training step)
        self.weight, self.weight_shape, self.bias, self.feedback, self.M, self.Z = (weight, weight.shape, bias,
                                                                                   feedback, M, Z)
        self.requires_grad = _requires_grad(weight, bias, Z)
        self.strategy, self.backend = layer.strategy, layer.backend
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.generation = dispatch.generation()
        self.sequence = order == "sequence"

    def admits(self, layer, x) -> bool:
        """Whether this call is the ticket's: the same kind of input to the same, unchanged layer, in the same
        modes (the common training call: grad mode on, x requiring grad). Not under torch.compile: the caller
        checks that first."""
        weight, feedback = self.weight, self.feedback
        buffers = feedback._buffers
        return (type(x) is torch.Tensor and x.requires_grad and torch.is_grad_enabled() and x.shape == self.x_shape
                and x.dtype is self.dtype and x.device == self.device
                and layer._parameters.get("weight") is weight and layer._parameters.get("bias") is self.bias
                and layer._modules.get("feedback") is feedback and buffers.get("M") is self.M
                and buffers.get("B_held") is None and feedback._parameters.get("Z") is self.Z
                and weight.shape == self.weight_shape and weight.dtype is self.dtype and weight.device == self.device
                and self.Z.dtype is self.dtype and self.Z.device == self.device and self.M.dtype is self.dtype
                and _requires_grad(weight, self.bias, self.Z) == self.requires_grad
                and layer.strategy == self.strategy and layer.backend == self.backend
                and not torch.is_autocast_enabled(self.device_type)
                and torch.are_deterministic_algorithms_enabled() == self.deterministic
                and dispatch.generation() == self.generation and dispatch.mode() == "measure")

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return cpp_backend.EAGER.eager_projected_linear(x, self.weight, self.bias, self.M, self.Z, self.sequence,
                                                        self.strategy, self.backend)


def _requires_grad(weight, bias, Z) -> tuple[bool, bool, bool]:
    return weight.requires_grad, bias is not None and bias.requires_grad, Z.requires_grad


def issue(layer, x, weight, B, M, Z, parametrization) -> EagerTicket | None:
    """A ticket for this call of a PFA linear layer (after its full path ran), where the call took the C++ twin:
    with its tensors registered where admits() looks for them (not under torch.nn.utils.prune, parametrizations,
    DataParallel replicas or FSDP's flat parameters, which replace them) and no B held."""
    feedback = layer._modules.get("feedback")
    if (cpp_backend.EAGER is None or type(x) is not torch.Tensor or not x.requires_grad
            or torch.is_autocast_enabled(x.device.type) or not ops._eager(x, weight, layer.bias, B, M, Z)
            or B is not None or layer._parameters.get("weight") is not weight
            or layer._parameters.get("bias") is not layer.bias or feedback is None
            or feedback._buffers.get("M") is not M or feedback._parameters.get("Z") is not Z):
        return None
    order = ops._cpp_eager_order(x, weight, layer.bias, B, M, Z, parametrization, layer.strategy, layer.backend)
    return None if order is None else EagerTicket(layer, x, weight, layer.bias, feedback, M, Z, order)
