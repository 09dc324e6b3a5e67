"""Functional PFA layers: validate, apply autocast, and call the custom op (or the literal reference).

Every function takes the forward parameters (weight, bias) and the feedback tensors explicitly:

    x       linear: (..., C_in)            conv: (N, C_in, *spatial) or unbatched (C_in, *spatial)
    weight  linear: (C_out, C_in)          conv: (C_out, C_in/groups, *kernel)
    bias    (C_out,) or None
    B       (C_out, C_mid), fixed; C_mid divisible by groups
    R       (C_mid, C_in/groups, *kernel)                    pfa_linear, pfa_conv1d/2d/3d
    M, Z    M (groups, C_out, C_out) = B_j B_j^T or None,    pfa_linear_projected, pfa_conv*d_projected
            Z (C_out, C_in, *kernel): W_fb = M·Z (docs/design.md section 2.4)

strategy: "auto" (cheapest order per call, see planner.py), "product", "sequence", or "reference"
(the literal algorithm of reference.py, for checking; explicit R only). backend: "auto" (measured and verified per
shape, see dispatch.py) or a named backend, which must be available and is never swapped for another.
"""

from __future__ import annotations

import torch

from . import dispatch, ops, planner, reference
from .reference import cast_for_autocast


def check_strategy_for(strategy, parametrization) -> str:
    planner.check_strategy(strategy)
    if strategy == "reference" and parametrization == "projected":
        raise ValueError("strategy='reference' runs the literal algorithm, which needs an explicit R; use "
                         "parametrization='explicit' (pk.reparametrize(model, 'explicit')) to compare with it")
    return strategy


def _check_tensors(x, weight, bias, B, M, feedback, parametrization, groups, spatial_dims):
    feedback_name = {"explicit": "R", "projected": "Z", "direct": "feedback_weight"}[parametrization]
    named = {"x": x, "weight": weight, feedback_name: feedback}
    if parametrization == "explicit" or (parametrization == "projected" and (B is not None or M is None)):
        named["B"] = B  # a projected layer with M reads no B (None allowed)
    if bias is not None:
        named["bias"] = bias
    if M is not None:
        named["M"] = M
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; all tensors must share a device")
        if tensor.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; all tensors must share a dtype")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    if weight.dim() != spatial_dims + 2:
        raise ValueError(f"weight must have {spatial_dims + 2} dims; got shape {tuple(weight.shape)}")
    out_channels = weight.shape[0]
    if out_channels % groups:
        raise ValueError(f"groups={groups} must divide the output channels of weight ({out_channels})")
    if parametrization == "direct":
        if feedback.requires_grad:
            raise ValueError("feedback_weight is a fixed W_fb and does not learn: pass it without requires_grad "
                             "(e.g. feedback_weight.detach())")
        if tuple(feedback.shape) != tuple(weight.shape):
            raise ValueError(f"feedback_weight must have weight's shape {tuple(weight.shape)}; got "
                             f"{tuple(feedback.shape)}")
    elif B is not None and (B.dim() != 2 or B.shape[0] != out_channels):
        raise ValueError(f"B must have shape (C_out={out_channels}, C_mid); got {tuple(B.shape)}")
    mid_channels = 0 if B is None else B.shape[1]
    if mid_channels % groups:
        raise ValueError(f"groups={groups} must divide C_mid = B.shape[1] = {mid_channels}")
    if parametrization == "explicit":
        expected_R = (mid_channels, *weight.shape[1:])
        if tuple(feedback.shape) != expected_R:
            raise ValueError(
                f"R must have shape (C_mid, C_in/groups, *kernel) = {expected_R}; got {tuple(feedback.shape)}")
    elif parametrization == "projected":
        expected_Z = (out_channels, weight.shape[1] * groups, *weight.shape[2:])
        if tuple(feedback.shape) != expected_Z:
            raise ValueError(f"Z must have shape (C_out, C_in, *kernel) = {expected_Z}; got {tuple(feedback.shape)}")
        if M is not None and tuple(M.shape) != (groups, out_channels, out_channels):
            raise ValueError(
                f"M must have shape (groups, C_out, C_out) = {(groups, out_channels, out_channels)} or be None; "
                f"got {tuple(M.shape)}")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},); got {tuple(bias.shape)}")
    _check_input_shape(x, weight.shape[1] * groups, spatial_dims)


def _check_layer_input(x, weight, groups, spatial_dims):
    """A PFA layer's per-call check: what depends on x (type, dtype, device and shape against the layer's weight).
    The layer's own tensors (weight, bias, B, M, feedback) are made consistent by its constructor, .to() and
    load_state_dict, so _check_tensors' checks of them cannot fail here; they cost 6 us a call, half a 64x64
    layer's forward in nn."""
    if type(x) is not torch.Tensor and not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype != weight.dtype:
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        if not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the layer's weight has {weight.dtype}; all tensors must "
                            f"share a dtype (convert the layer with .to({x.dtype}) or use autocast)")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the layer's weight is on {weight.device}; all tensors must share a "
                         f"device")
    _check_input_shape(x, weight.shape[1] * groups, spatial_dims)


def _check_input_shape(x, in_channels, spatial_dims):
    if spatial_dims == 0:
        if x.dim() < 1 or x.shape[-1] != in_channels:
            raise ValueError(f"x must have shape (..., {in_channels}); got {tuple(x.shape)}")
    else:
        if x.dim() not in (spatial_dims + 1, spatial_dims + 2):
            raise ValueError(
                f"x must have shape (N, C_in, *spatial) or (C_in, *spatial) with {spatial_dims} spatial dims; "
                f"got {tuple(x.shape)}")
        channels = x.shape[-spatial_dims - 1]
        if channels != in_channels:
            raise ValueError(f"x has {channels} channels but weight expects {in_channels} (C_in/groups * groups)")


def _as_tuple(value, spatial_dims, name):
    if isinstance(value, int):
        return [value] * spatial_dims
    value = list(value)
    if len(value) != spatial_dims or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or {spatial_dims} ints; got {value!r}")
    return value


def _linear(x, weight, bias, B, M, feedback, parametrization, strategy, backend, layer_call=False):
    """layer_call: called by a PFA layer on its own tensors, which need no check but x's (_check_layer_input)."""
    check_strategy_for(strategy, parametrization)
    if layer_call:
        _check_layer_input(x, weight, 1, 0)
    else:
        _check_tensors(x, weight, bias, B, M, feedback, parametrization, 1, 0)
    if strategy == "reference":
        return reference.pfa_linear(x, weight, bias, B, feedback)
    x, weight, bias, B, M, feedback = cast_for_autocast([x, weight, bias, B, M, feedback], x.device.type)
    backend = dispatch.check_backend(backend, x.device.type, x.dtype, x.device)
    return ops.apply_linear(x, weight, bias, B, M, feedback, parametrization, strategy, backend)


def _conv(spatial_dims, x, weight, bias, B, M, feedback, parametrization, stride, padding, dilation, groups, strategy,
          backend, layer_call=False):
    """layer_call: as in _linear."""
    check_strategy_for(strategy, parametrization)
    if layer_call:
        _check_layer_input(x, weight, groups, spatial_dims)
    else:
        _check_tensors(x, weight, bias, B, M, feedback, parametrization, groups, spatial_dims)
    stride = _as_tuple(stride, spatial_dims, "stride")
    padding = _as_tuple(padding, spatial_dims, "padding")
    dilation = _as_tuple(dilation, spatial_dims, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0; got {stride}, {dilation}, {padding}")
    unbatched = x.dim() == spatial_dims + 1
    if unbatched:
        x = x.unsqueeze(0)
    if strategy == "reference":
        y = reference.pfa_conv(x, weight, bias, B, feedback, stride, padding, dilation, groups)
    else:
        x, weight, bias, B, M, feedback = cast_for_autocast([x, weight, bias, B, M, feedback], x.device.type)
        backend = dispatch.check_backend(backend, x.device.type, x.dtype, x.device)
        y = ops.apply_conv(x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization,
                           strategy, backend)
    return y.squeeze(0) if unbatched else y


def pfa_linear(x, weight, bias, B, R, strategy="auto", backend="auto"):
    """PFA linear layer: y = x W^T + b, with the input gradient fed back through B·R.

    x (..., C_in), weight (C_out, C_in), bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in).
    Returns (..., C_out).
    """
    return _linear(x, weight, bias, B, None, R, "explicit", strategy, backend)


def pfa_linear_projected(x, weight, bias, B, M, Z, strategy="auto", backend="auto"):
    """Projected PFA linear layer: y = x W^T + b, input gradient fed back through M·Z; Z's gradient is dL/dW.

    x (..., C_in), weight and Z (C_out, C_in), bias (C_out,) or None, B (C_out, C_mid),
    M (1, C_out, C_out) = B B^T or None (then applied as B (B^T ·)); B may be None when M is given.
    Returns (..., C_out).
    """
    return _linear(x, weight, bias, B, M, Z, "projected", strategy, backend)


def pfa_conv1d(x, weight, bias, B, R, stride=1, padding=0, dilation=1, groups=1, strategy="auto", backend="auto"):
    """PFA 1-d convolution with zero padding. x (N, C_in, L), weight (C_out, C_in/groups, k),
    bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in/groups, k). Returns (N, C_out, L_out)."""
    return _conv(1, x, weight, bias, B, None, R, "explicit", stride, padding, dilation, groups, strategy, backend)


def pfa_conv2d(x, weight, bias, B, R, stride=1, padding=0, dilation=1, groups=1, strategy="auto", backend="auto"):
    """PFA 2-d convolution with zero padding. x (N, C_in, H, W), weight (C_out, C_in/groups, kh, kw),
    bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in/groups, kh, kw). Returns (N, C_out, H_out, W_out)."""
    return _conv(2, x, weight, bias, B, None, R, "explicit", stride, padding, dilation, groups, strategy, backend)


def pfa_conv3d(x, weight, bias, B, R, stride=1, padding=0, dilation=1, groups=1, strategy="auto", backend="auto"):
    """PFA 3-d convolution with zero padding. x (N, C_in, D, H, W), weight (C_out, C_in/groups, kd, kh, kw),
    bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in/groups, kd, kh, kw). Returns (N, C_out, *out)."""
    return _conv(3, x, weight, bias, B, None, R, "explicit", stride, padding, dilation, groups, strategy, backend)


def _projected_conv(spatial_dims):
    def projected_conv(x, weight, bias, B, M, Z, stride=1, padding=0, dilation=1, groups=1, strategy="auto",
                       backend="auto"):
        return _conv(spatial_dims, x, weight, bias, B, M, Z, "projected", stride, padding, dilation, groups, strategy,
                     backend)

    projected_conv.__name__ = projected_conv.__qualname__ = f"pfa_conv{spatial_dims}d_projected"
    projected_conv.__doc__ = (
        f"Projected PFA {spatial_dims}-d convolution with zero padding: the input gradient is fed back through\n"
        f"    M·Z and Z's gradient is the dense correlation conv_weight(x, g) (dL/dW when groups = 1).\n\n"
        f"    x (N, C_in, *spatial), weight (C_out, C_in/groups, *kernel), bias (C_out,) or None, B (C_out, C_mid),\n"
        f"    M (groups, C_out, C_out) = B_j B_j^T or None, Z (C_out, C_in, *kernel); B may be None when M is\n"
        f"    given. Returns (N, C_out, *out).\n    ")
    return projected_conv


def feedback_linear(x, weight, bias, feedback_weight, backend="auto"):
    """Linear layer whose dL/dx uses a fixed feedback_weight (W's shape) instead of W (FA, sign symmetry).

    x (..., C_in), weight and feedback_weight (C_out, C_in), bias (C_out,) or None. Returns (..., C_out).
    """
    return _linear(x, weight, bias, None, None, feedback_weight, "direct", "auto", backend)


def feedback_conv(x, weight, bias, feedback_weight, stride=1, padding=0, dilation=1, groups=1, backend="auto"):
    """Convolution (1d/2d/3d by weight.dim()) whose dL/dx uses a fixed feedback_weight (W's shape) instead of W.

    x (N, C_in, *spatial), weight and feedback_weight (C_out, C_in/groups, *kernel), bias (C_out,) or None.
    """
    return _conv(weight.dim() - 2, x, weight, bias, None, None, feedback_weight, "direct", stride, padding, dilation,
                 groups, "auto", backend)


pfa_conv1d_projected = _projected_conv(1)
pfa_conv2d_projected = _projected_conv(2)
pfa_conv3d_projected = _projected_conv(3)
