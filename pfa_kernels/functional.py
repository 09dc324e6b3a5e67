"""Functional PFA layers: validate, apply autocast, and call the custom op (or the literal reference).

Every function takes the forward parameters (weight, bias) and the feedback tensors (B, R) explicitly:

    x       linear: (..., C_in)            conv: (N, C_in, *spatial) or unbatched (C_in, *spatial)
    weight  linear: (C_out, C_in)          conv: (C_out, C_in/groups, *kernel)
    bias    (C_out,) or None
    B       (C_out, C_mid), fixed; C_mid divisible by groups
    R       (C_mid, C_in/groups, *kernel)

strategy: "auto" (cheapest order per call, see planner.py), "product", "sequence", or "reference"
(the literal algorithm of reference.py, for checking). backend: "auto" or a named backend, which
must be available (it is never swapped silently).
"""

from __future__ import annotations

import torch

from . import ops, planner, reference
from .reference import cast_for_autocast


def _check_tensors(x, weight, bias, B, R, groups, spatial_dims):
    named = {"x": x, "weight": weight, "B": B, "R": R}
    if bias is not None:
        named["bias"] = bias
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
    if B.dim() != 2 or B.shape[0] != out_channels:
        raise ValueError(f"B must have shape (C_out={out_channels}, C_mid); got {tuple(B.shape)}")
    mid_channels = B.shape[1]
    if mid_channels % groups:
        raise ValueError(f"groups={groups} must divide C_mid = B.shape[1] = {mid_channels}")
    expected_R = (mid_channels, *weight.shape[1:])
    if tuple(R.shape) != expected_R:
        raise ValueError(f"R must have shape (C_mid, C_in/groups, *kernel) = {expected_R}; got {tuple(R.shape)}")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},); got {tuple(bias.shape)}")
    in_channels = weight.shape[1] * groups
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


def pfa_linear(x, weight, bias, B, R, strategy="auto", backend="auto"):
    """PFA linear layer: y = x W^T + b, with the input gradient fed back through B·R.

    x (..., C_in), weight (C_out, C_in), bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in).
    Returns (..., C_out).
    """
    planner.check_strategy(strategy)
    _check_tensors(x, weight, bias, B, R, 1, 0)
    if strategy == "reference":
        return reference.pfa_linear(x, weight, bias, B, R)
    backend = planner.resolve_backend(backend, x.device.type)
    x, weight, bias, B, R = cast_for_autocast([x, weight, bias, B, R], x.device.type)
    return ops.linear(x, weight, bias, B, R, strategy, backend)


def _pfa_conv(spatial_dims, x, weight, bias, B, R, stride, padding, dilation, groups, strategy, backend):
    planner.check_strategy(strategy)
    _check_tensors(x, weight, bias, B, R, groups, spatial_dims)
    stride = _as_tuple(stride, spatial_dims, "stride")
    padding = _as_tuple(padding, spatial_dims, "padding")
    dilation = _as_tuple(dilation, spatial_dims, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0; got {stride}, {dilation}, {padding}")
    unbatched = x.dim() == spatial_dims + 1
    if unbatched:
        x = x.unsqueeze(0)
    if strategy == "reference":
        y = reference.pfa_conv(x, weight, bias, B, R, stride, padding, dilation, groups)
    else:
        backend = planner.resolve_backend(backend, x.device.type)
        x, weight, bias, B, R = cast_for_autocast([x, weight, bias, B, R], x.device.type)
        y = ops.conv(x, weight, bias, B, R, stride, padding, dilation, groups, strategy, backend)
    return y.squeeze(0) if unbatched else y


def pfa_conv1d(x, weight, bias, B, R, stride=1, padding=0, dilation=1, groups=1, strategy="auto", backend="auto"):
    """PFA 1-d convolution with zero padding. x (N, C_in, L), weight (C_out, C_in/groups, k),
    bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in/groups, k). Returns (N, C_out, L_out)."""
    return _pfa_conv(1, x, weight, bias, B, R, stride, padding, dilation, groups, strategy, backend)


def pfa_conv2d(x, weight, bias, B, R, stride=1, padding=0, dilation=1, groups=1, strategy="auto", backend="auto"):
    """PFA 2-d convolution with zero padding. x (N, C_in, H, W), weight (C_out, C_in/groups, kh, kw),
    bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in/groups, kh, kw). Returns (N, C_out, H_out, W_out)."""
    return _pfa_conv(2, x, weight, bias, B, R, stride, padding, dilation, groups, strategy, backend)


def pfa_conv3d(x, weight, bias, B, R, stride=1, padding=0, dilation=1, groups=1, strategy="auto", backend="auto"):
    """PFA 3-d convolution with zero padding. x (N, C_in, D, H, W), weight (C_out, C_in/groups, kd, kh, kw),
    bias (C_out,) or None, B (C_out, C_mid), R (C_mid, C_in/groups, kd, kh, kw). Returns (N, C_out, *out)."""
    return _pfa_conv(3, x, weight, bias, B, R, stride, padding, dilation, groups, strategy, backend)
