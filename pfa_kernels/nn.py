"""PFA layers: drop-in replacements for nn.Linear and nn.Conv1d/2d/3d.

Each layer *is* its nn counterpart (a subclass): weight, bias, every constructor argument, padding
modes, "same"/"valid" padding, and a BP checkpoint loads into it. What changes is the backward: the
input gradient is fed back through W_fb = B·R (layer.feedback) instead of W, and R learns.

Feedback keyword arguments (keyword-only, shared by every layer and pk.convert):
    expand_ratio      C_mid / C_out (int or float > 0; C_mid = round(r * C_out) >= 1); paper: 10
    feedback_init     "random" (PFA), "orthogonal" (PFA-o, B B^T = I when C_mid >= C_out),
                      "identity" (Kolen-Pollack; needs C_mid == C_out)
    feedback_density  in (0, 1], or a pair (B density, R density): fixed Bernoulli masks on B and R
    parametrization   "auto" (the default: "projected" wherever it is exact, explicit for a masked R, an
                      ill-conditioned B or strategy "reference"), "explicit" (R held as a Parameter) or
                      "projected" (Z, W's shape, with W_fb = M·Z: exact for SGD-family optimizers at BP's cost,
                      docs/design.md section 2.4; an optimizer of another family raises at its first step; see
                      pk.reparametrize and pk.check_optimizer)
    feedback_groups   convolutions with groups > 1: "grouped" (B block-diagonal per group, so W_fb, R, Z and M
                      are grouped like W and the backward costs BP's; the default) or "dense" (one dense B
                      mixing every group into every output, as the authors' code; docs/design.md section 2.5)
    strategy          "auto" | "product" | "sequence" | "reference" (the literal algorithm)
    backend           "auto" | "torch" | "triton" | "cpp" (a named backend must be available)
    feedback_seed     int or None: the seed B, R and the masks are drawn from
    rule              "pfa" (the default: learned feedback as above), or a fixed-feedback baseline
                      (baselines.py): "fa", "usf", "frsf", "brsf"; these ignore the PFA arguments
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, eager_ticket, functional, ops, planner
from .baselines import FIXED_RULES, FixedFeedback
from .feedback import check_feedback_options
from .feedback_choice import make_feedback

RULES = ("pfa", *FIXED_RULES)


class _PFAMixin:
    """Feedback state and settings shared by every PFA layer."""

    def _init_feedback(self, in_per_group, kernel_size, groups, expand_ratio, feedback_init, feedback_density,
                       parametrization, strategy, backend, feedback_seed, device, dtype, rule="pfa",
                       feedback_groups="grouped"):
        if rule == "pfa":
            if parametrization == "auto" and strategy == "reference":  # the literal algorithm needs an explicit R
                parametrization = "explicit"
            self.feedback = make_feedback(self.weight.shape[0], in_per_group, kernel_size, groups, expand_ratio,
                                          feedback_init, feedback_density, feedback_seed, device=device, dtype=dtype,
                                          parametrization=parametrization, feedback_groups=feedback_groups)
        else:
            self.feedback = FixedFeedback(rule, tuple(self.weight.shape), feedback_seed, device=device, dtype=dtype)
        self.strategy = strategy
        self.backend = backend

    @property
    def parametrization(self) -> str:
        """ "explicit" or "projected" (pk.reparametrize switches it); "direct" for a fixed-feedback rule."""
        return self.feedback.parametrization

    @property
    def rule(self) -> str:
        return getattr(self.feedback, "rule", "pfa")

    def feedback_weight(self) -> torch.Tensor:
        """The weight dL/dx uses in place of W: B·R (dense if groups > 1) or a fixed rule's W_fb (W's shape)."""
        return self.feedback.feedback_weight_for(self.weight)

    def _feedback_arguments(self):
        """(weight, B, M, feedback tensor, parametrization) as the functional ops take them."""
        return self.feedback.op_arguments(self.weight, self.strategy)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "feedback"):  # nn's constructor calls this before the feedback exists
            self.feedback.reset_parameters()

    def _needs_pfa_backward(self, x: torch.Tensor) -> bool:
        """Whether a backward of this call can reach the PFA op: the input gradient (fed back through W_fb) or the
        feedback's own. Without either (eval, torch.no_grad(), a frozen first layer) the layer runs nn's forward:
        identical outputs, and a weight gradient that is BP's by definition, without the op's per-call cost.
        brsf always takes the op: its forward draws the batch's feedback magnitudes."""
        grad_enabled = torch.is_grad_enabled()
        if grad_enabled and x.requires_grad:  # the common case in training, decided first
            return True
        if self.rule == "brsf":
            return True
        if not grad_enabled:
            return False
        feedback_parameter = self.feedback.parameter
        return feedback_parameter is not None and feedback_parameter.requires_grad

    def _feedback_extra_repr(self) -> str:
        if self.rule != "pfa":
            return f", rule={self.rule!r}, backend={self.backend!r}"
        grouping = f", feedback_groups={self.feedback.feedback_groups!r}" if self.feedback.groups > 1 else ""
        return (f", expand_ratio={self.feedback.expand_ratio}, feedback_init={self.feedback.feedback_init!r}, "
                f"feedback_density={self.feedback.feedback_density}{grouping}, "
                f"parametrization={self.parametrization!r}, strategy={self.strategy!r}, backend={self.backend!r}")

    def backward_plan(self, input_shape, need_input_grad: bool = True) -> planner.Plan:
        """The backward's plan (orders, backend, multiply-adds of every candidate) for an input of this shape.

        With backend="auto" it is the dispatcher's decision for the shape (dispatch.py): the measured choice with
        the timings of every candidate once a backward of that shape has run, before that the static choice (the
        PyTorch backend) with a reason saying so. With strategy "reference" (the literal algorithm, which takes no
        plan) this is the plan "auto" would take.
        """
        with torch.device("meta"):
            x = torch.empty(input_shape)
            weight = torch.empty(self.weight.shape)
            output_shape = self._meta_forward(x, weight).shape
        device, dtype = self.weight.device, self.weight.dtype
        backend = dispatch.check_backend(self.backend, device.type, dtype, device)
        strategy = "auto" if self.strategy == "reference" else self.strategy
        groups = getattr(self, "groups", 1)
        feedback_parameter = self.feedback.parameter
        mask = [need_input_grad, self.weight.requires_grad, self.bias is not None,
                feedback_parameter is not None and feedback_parameter.requires_grad]
        with torch.no_grad():
            B, M, feedback, parametrization = self.feedback.op_arguments(self.weight)[1:]
        plan_args = (output_shape, self.weight.shape, self.feedback.mid_channels, groups, strategy)
        plan_kwargs = dict(output_mask=mask, parametrization=parametrization, keeps_projection_matrix=M is not None)
        if backend != "auto":
            return ops.plan_backward(*plan_args, backend, **plan_kwargs)
        plan = ops.plan_backward(*plan_args, "torch", **plan_kwargs)
        # The conv arguments exactly as forward passes them to the op (linear layers have none).
        conv = ((list(self.stride), self._op_padding()[1], list(self.dilation), groups)
                if hasattr(self, "stride") else ())
        key = ops.dispatch_key(device, dtype, output_shape, self.weight.shape, None if B is None else B.shape,
                               M is not None, feedback.shape, conv, parametrization, strategy, mask)
        decision = dispatch.cached(key)
        if decision is None:
            why = ("PFA_KERNELS_DISPATCH=static: the PyTorch backend" if dispatch.mode() == "static" else
                   "backend='auto', not measured yet for this shape: its first backward measures the candidates "
                   "and returns the PyTorch result")
            return dataclasses.replace(plan, reason=f"{plan.reason}; {why}")
        chosen = ops.plan_backward(*plan_args, decision.plan.backend, **plan_kwargs,
                                   orders=(decision.plan.input_order, decision.plan.feedback_grad_order))
        timings = {"seconds": decision.times, "relative_error": decision.errors, "rejected": decision.rejected}
        reason = (f"backend='auto', {decision.source} on {key.device}: fastest of {len(decision.times)} agreeing "
                  f"candidates is {decision.choice}")
        return dataclasses.replace(chosen, reason=f"{reason}; {chosen.reason}", timings=timings)


_PFA_DEFAULTS = {"expand_ratio": 10, "feedback_init": "random", "feedback_density": 1.0,
                 "parametrization": "auto", "strategy": "auto", "feedback_groups": "grouped"}
_INT64 = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _check_layer_options(feedback_init, feedback_density, parametrization, strategy, backend, rule="pfa",
                         expand_ratio=10, feedback_seed=None, feedback_groups="grouped", groups=1):
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    if rule != "pfa":  # a fixed-feedback rule has no B, R or order: PFA arguments would be silently ignored
        given = dict(expand_ratio=expand_ratio, feedback_init=feedback_init, feedback_density=feedback_density,
                     parametrization=parametrization, strategy=strategy, feedback_groups=feedback_groups)
        ignored = sorted(name for name, value in given.items() if value != _PFA_DEFAULTS[name])
        if ignored:
            raise TypeError(f"rule={rule!r} is a fixed-feedback rule: it takes backend and feedback_seed, not the PFA "
                            f"arguments {ignored}")
    if isinstance(feedback_seed, int) and not _INT64[0] <= feedback_seed <= _INT64[1]:  # other types: feedback.py
        raise ValueError(f"feedback_seed must be in [-2**63, 2**64 - 1] (a torch.Generator seed); got {feedback_seed}")
    check_feedback_options(feedback_init, feedback_density, parametrization, feedback_groups)
    functional.check_strategy_for(strategy, parametrization)
    if strategy == "sequence" and groups > 1 and feedback_groups == "grouped" and rule == "pfa":
        raise ValueError(
            "strategy='sequence' is not an order of grouped feedback: its W_fb has W's shape, so dL/dx is "
            "backpropagation's GEMM with W_fb (the product order, which strategy='auto' and 'product' take). "
            "Use feedback_groups='dense' for the sequence order through B and R")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}; got {backend!r}")


class PFALinear(_PFAMixin, nn.Linear):
    """nn.Linear with PFA feedback. Input (..., in_features) -> (..., out_features).

    weight (out_features, in_features), bias (out_features,); feedback.B (out_features, C_mid),
    feedback.R (C_mid, in_features) [explicit] or feedback.Z (out_features, in_features) [projected].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 expand_ratio=10, feedback_init="random", feedback_density=1.0, parametrization="auto",
                 strategy="auto", backend="auto", feedback_seed=None, rule="pfa", feedback_groups="grouped"):
        _check_layer_options(feedback_init, feedback_density, parametrization, strategy, backend, rule, expand_ratio,
                             feedback_seed, feedback_groups)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_feedback(in_features, (), 1, expand_ratio, feedback_init, feedback_density, parametrization,
                            strategy, backend, feedback_seed, device, dtype, rule, feedback_groups)

    _eager_ticket = None  # the call that last took the C++ eager twin, while it holds (eager_ticket.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced (torch.compile, torch.jit.trace): the op, whose autograd the tracer records; no ticket is read.
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
        ticket = None if traced else self._eager_ticket
        if ticket is not None and ticket.admits(self, x):
            return ticket.run(x)
        if not self._needs_pfa_backward(x):
            return F.linear(x, self.weight, self.bias)
        weight, B, M, feedback, parametrization = self._feedback_arguments()
        output = functional._linear(x, weight, self.bias, B, M, feedback, parametrization, self.strategy,
                                    self.backend, layer_call=True)
        if not traced and (ticket is not None or (parametrization == "projected" and M is not None)):
            self._eager_ticket = eager_ticket.issue(self, x, weight, B, M, feedback, parametrization)  # or None
        return output

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_eager_ticket", None)  # it holds the tensors .to() / .cuda() / .double() replace
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_eager_ticket", None)  # another process's dispatch table has not measured its call
        return state

    def _meta_forward(self, x, weight):
        return F.linear(x, weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._feedback_extra_repr()


class _PFAConvNd(_PFAMixin):
    _spatial_dims: int

    def _init_conv_feedback(self, expand_ratio, feedback_init, feedback_density, parametrization, strategy,
                            backend, feedback_seed, device, dtype, rule, feedback_groups):
        self._init_feedback(self.in_channels // self.groups, self.kernel_size, self.groups, expand_ratio,
                            feedback_init, feedback_density, parametrization, strategy, backend, feedback_seed,
                            device, dtype, rule, feedback_groups)

    def _op_padding(self):
        """(explicit pad for F.pad or None, the op's symmetric zero padding)."""
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return None, list(self.padding)
        pads = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        lefts, rights = pads[0::2], pads[1::2]
        if self.padding_mode == "zeros" and lefts == rights:
            return None, list(reversed(lefts))
        return pads, [0] * self._spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._needs_pfa_backward(x):
            return self._conv_forward(x, self.weight, self.bias)  # nn's own forward (every padding mode)
        pads, padding = self._op_padding()
        if pads is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pads, mode=mode)
        weight, B, M, feedback, parametrization = self._feedback_arguments()
        return functional._conv(self._spatial_dims, x, weight, self.bias, B, M, feedback, parametrization,
                                list(self.stride), padding, list(self.dilation), self.groups, self.strategy,
                                self.backend, layer_call=True)

    def _meta_forward(self, x, weight):
        pads, padding = self._op_padding()
        if pads is not None:
            x = F.pad(x, pads)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self._spatial_dims - 1]
        return conv(x, weight, None, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._feedback_extra_repr()


def _conv_class(base: type[nn.Module], spatial_dims: int, name: str):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, *, expand_ratio=10, feedback_init="random",
                 feedback_density=1.0, parametrization="auto", strategy="auto", backend="auto",
                 feedback_seed=None, rule="pfa", feedback_groups="grouped"):
        _check_layer_options(feedback_init, feedback_density, parametrization, strategy, backend, rule, expand_ratio,
                             feedback_seed, feedback_groups, groups)
        base.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                      padding_mode, device=device, dtype=dtype)
        self._init_conv_feedback(expand_ratio, feedback_init, feedback_density, parametrization, strategy, backend,
                                 feedback_seed, device, dtype, rule, feedback_groups)

    doc = (f"nn.{base.__name__} with PFA feedback. Input (N, C_in, *spatial) or (C_in, *spatial), {spatial_dims} "
           f"spatial dims.\n\n    weight (C_out, C_in/groups, *kernel), bias (C_out,); feedback.B (C_out, C_mid), "
           f"feedback.R (C_mid, C_in/groups, *kernel) [explicit] or feedback.Z (C_out, C_in, *kernel) "
           f"[projected].\n    ")
    return type(name, (_PFAConvNd, base), {"__init__": __init__, "_spatial_dims": spatial_dims, "__doc__": doc,
                                           "__module__": __name__})


PFAConv1d = _conv_class(nn.Conv1d, 1, "PFAConv1d")
PFAConv2d = _conv_class(nn.Conv2d, 2, "PFAConv2d")
PFAConv3d = _conv_class(nn.Conv3d, 3, "PFAConv3d")

PFA_LAYERS = (PFALinear, PFAConv1d, PFAConv2d, PFAConv3d)
