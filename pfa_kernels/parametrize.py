"""Switching PFA layers between explicit R and projected Z, and checking that an optimizer suits Z.

    model = pk.reparametrize(model, "projected")      # every PFA layer, in place; B·R kept exactly
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pk.check_optimizer(optimizer, model)               # raises for Adam & co. on a projected Z

Why only some optimizers (DESIGN.md section 2.4): with R = B^T Z + N, an update of R that is linear
in its gradient B^T dL/dW and in R itself is B^T times the same update of Z, so B·R = M·Z holds after
every step. SGD (momentum, dampening, Nesterov, weight decay, any lr schedule) and ASGD are linear.
Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam, LAMB, Lion, LBFGS, ... are not: they
divide or sign elementwise, and elementwise operations do not commute with B^T, so a projected layer
trained with them is a different (and unstudied) learning rule. Gradient clipping by total norm is the
other caveat: it sees ||dL/dZ|| = ||dL/dW|| where the explicit layer has ||B^T dL/dW||.
"""

from __future__ import annotations

import torch
from torch import nn

from .feedback import PARAMETRIZATIONS
from .nn import PFA_LAYERS

# Optimizers whose update is linear in (gradient, parameter), given their hyper-parameters and step count.
LINEAR_OPTIMIZERS = (torch.optim.SGD, torch.optim.ASGD)


def _pfa_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers with learned PFA feedback (fixed-feedback rules have nothing to reparametrize)."""
    return {name or type(model).__name__: m for name, m in model.named_modules()
            if isinstance(m, PFA_LAYERS) and m.rule == "pfa"}


def reparametrize(model: nn.Module, parametrization: str) -> nn.Module:
    """Switch every PFA layer of `model` to "projected" or "explicit" in place; return the model.

    projected: Z_0 = M^+ B R (the minimum-norm Z with B^T Z = R when C_mid < C_out), so W_fb = B·R is
    kept exactly; R's null-space part N (B N = 0) is kept as feedback.R_null. explicit: R = B^T Z + N,
    so a round trip returns the same R. Parameters are replaced: build the optimizer afterwards.
    Raises (changing nothing) if any layer cannot switch: a masked R or strategy "reference" cannot be
    projected.
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}; got {parametrization!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    layers = _pfa_layers(model)
    if parametrization == "projected":
        for name, layer in layers.items():  # check every layer before switching any
            if layer.feedback.R_mask is not None:
                raise ValueError(
                    f"layer {name!r} has a masked R (feedback_density={layer.feedback.feedback_density!r}), which "
                    f"the projected parametrization cannot hold: re-zeroing R elementwise after every update leaves "
                    f"the row space of B^T. Keep it explicit (exclude it) or mask B alone with "
                    f"feedback_density=(B_density, 1.0)")
            if layer.strategy == "reference":
                raise ValueError(f"layer {name!r} has strategy='reference' (the literal algorithm), which needs an "
                                 f"explicit R; set its strategy to 'auto' first")
    for layer in layers.values():
        if parametrization == "projected":
            layer.feedback.to_projected()
        else:
            layer.feedback.to_explicit()
    return model


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Raise a clear error if `optimizer` updates a projected layer's Z with a rule that is not linear in
    the gradient (anything but SGD/ASGD), where projected training would differ from PFA; return the optimizer.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    projected = {id(layer.feedback.Z): name for name, layer in _pfa_layers(model).items()
                 if layer.parametrization == "projected"}
    held = [projected[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in projected]
    if held and type(optimizer) not in LINEAR_OPTIMIZERS:
        names = ", ".join(repr(n) for n in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ValueError(
            f"{type(optimizer).__name__} updates the projected feedback Z of layer(s) {names}, but projected feedback "
            f"reproduces PFA only under optimizers whose update is linear in the gradient (SGD with any momentum, "
            f"dampening, Nesterov and weight decay; ASGD). {type(optimizer).__name__} acts elementwise on the "
            f"gradient, which does not commute with B^T. Use parametrization='explicit' "
            f"(pk.reparametrize(model, 'explicit') before building the optimizer) or an SGD optimizer")
    return optimizer
