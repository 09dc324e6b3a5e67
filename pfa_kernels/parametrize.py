"""Switching PFA layers between explicit R and projected Z, and checking that an optimizer suits Z.

    model = pk.reparametrize(model, "projected")      # every PFA layer, in place; B·R kept exactly
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pk.check_optimizer(optimizer, model)               # raises for Adam & co. on a projected Z

Every optimizer's first step runs the same check (a global step pre-hook, registered when pfa_kernels is imported),
so a projected layer (parametrization "projected", or "auto", the default) never trains under Adam unnoticed.

Why only some optimizers (docs/design.md §2.4): with R = B^T Z + N, an update of R that is linear
in its gradient B^T dL/dW and in R itself is B^T times the same update of Z, so B·R = M·Z holds after
every step. SGD (momentum, dampening, Nesterov, weight decay, any lr schedule) and ASGD are linear, and so is a
subclass of them that keeps their step.
Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam, LAMB, Lion, LBFGS, ... are not: they
divide or sign elementwise, and elementwise operations do not commute with B^T, so a projected layer
trained with them is a different (and unstudied) learning rule. Gradient clipping by total norm is the
other caveat: it sees ||dL/dZ|| = ||dL/dW|| where the explicit layer has ||B^T dL/dW||.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .feedback import LIVE_PROJECTED, PARAMETRIZATIONS
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
    kept exactly; R's null-space part N (B N = 0) is kept as feedback.R_null. Each layer gets a new feedback
    module (feedback.ExplicitFeedback or ProjectedFeedback) sharing its B. explicit: R = B^T Z + N,
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
    for name, layer in layers.items():
        if layer.parametrization == parametrization:
            continue
        before = layer.feedback.parameter
        # A new feedback module of the other parametrization (feedback.py), sharing B and the masks.
        feedback = layer.feedback
        layer.feedback = feedback.as_projected() if parametrization == "projected" else feedback.as_explicit()
        layer.__dict__.pop("_eager_ticket", None)  # a linear layer's fast path holds the old feedback
        # An optimizer built earlier still holds `before`: check_optimizer recognises it by this mark.
        before._replaced_by_reparametrize = name
    return model


def _linear_update(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's update is one of LINEAR_OPTIMIZERS': their class or a subclass that keeps their step.
    torch wraps a class's step in a profiling hook when its first instance is built (on the subclass itself if that
    comes first), so the step functions are compared unwrapped."""
    step = inspect.unwrap(type(optimizer).step)
    return any(isinstance(optimizer, base) and step is inspect.unwrap(base.step) for base in LINEAR_OPTIMIZERS)


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _nonlinear_update_error(optimizer: torch.optim.Optimizer, held: str, more: str = "") -> ValueError:
    """The refusal of an optimizer whose update is not linear in the gradient on the projected feedback `held`."""
    name = type(optimizer).__name__
    overridden = any(isinstance(optimizer, base) for base in LINEAR_OPTIMIZERS)
    why = (f"{name} overrides step, so its update may not be linear in the gradient" if overridden else
           f"{name} acts elementwise on the gradient, which does not commute with B^T")
    return ValueError(
        f"{name} updates the projected feedback {held}, but projected feedback (parametrization 'projected', which "
        f"'auto', the default, picks) reproduces PFA only under optimizers whose update is linear in the gradient "
        f"(SGD with any momentum, dampening, Nesterov and weight decay; ASGD; subclasses of them that keep their "
        f"step). {why}. Use parametrization='explicit' (pk.convert(..., parametrization='explicit'), or "
        f"pk.reparametrize(model, 'explicit') before building the optimizer) or an SGD optimizer{more}")


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Raise a clear error if `optimizer` cannot train `model`'s PFA feedback as PFA: if it was built before
    pk.reparametrize replaced the feedback parameters (it holds the old ones, and the new ones never learn), or if
    it updates a projected layer's Z with a rule that is not linear in the gradient (anything but SGD/ASGD and
    subclasses that keep their step). Return the optimizer.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    held_params = [p for group in optimizer.param_groups for p in group["params"]]
    replaced = [p._replaced_by_reparametrize for p in held_params if hasattr(p, "_replaced_by_reparametrize")]
    if replaced:
        raise ValueError(
            f"the optimizer holds the feedback parameter of layer(s) {_names(replaced)} that pk.reparametrize "
            f"replaced: it was built before pk.reparametrize, so it would update tensors the model no longer uses "
            f"while the layers' new feedback parameters never learn. Build the optimizer after pk.reparametrize")
    held_ids = {id(p) for p in held_params}
    layers = _pfa_layers(model)
    held = [name for name, layer in layers.items()
            if layer.parametrization == "projected" and id(layer.feedback.Z) in held_ids]
    if held and not _linear_update(optimizer):
        raise _nonlinear_update_error(optimizer, f"Z of layer(s) {_names(held)}")
    return optimizer


# ----------------------------------------------------------------------------- the global first-step check

_CHECKED_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()


def _describe(feedback) -> str:
    kernel = "x".join(map(str, feedback.kernel_size))
    return (f"Z {tuple(feedback.Z.shape)} (a {feedback.in_channels_per_group * feedback.groups} -> "
            f"{feedback.out_channels} {'linear' if not kernel else kernel + ' conv'} layer)")


def _check_first_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A step pre-hook of every torch optimizer (torch.optim.optimizer.register_optimizer_step_pre_hook): at the first
    step of an optimizer that is not SGD-family, raise if it updates a projected layer's Z, whose training then is
    not PFA. Later steps, and optimizers that passed, cost one set lookup."""
    if optimizer in _CHECKED_OPTIMIZERS:
        return
    if not _linear_update(optimizer):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        projected = [_describe(feedback) for feedback in list(LIVE_PROJECTED) if id(feedback.Z) in held]
        if projected:
            raise _nonlinear_update_error(optimizer, _names(projected),
                                          "; pk.check_optimizer(optimizer, model) names the layers")
    _CHECKED_OPTIMIZERS.add(optimizer)


register_optimizer_step_pre_hook(_check_first_step)
