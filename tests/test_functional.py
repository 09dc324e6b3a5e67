"""Functional PFA ops: gradcheck, autocast against a low-precision reference, and input validation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    LOW_PRECISION_ERROR_FACTOR,
    LOW_PRECISION_FLOOR,
    STRATEGIES,
    dense_projection,
    explicit_twin,
    projected_to_R_grad,
    relative_error,
)

import pfa_kernels as pk
from pfa_kernels import functional, reference

CONV_FUNCTIONS = {1: functional.pfa_conv1d, 2: functional.pfa_conv2d, 3: functional.pfa_conv3d}


def _conv_tensors(spatial_dims, groups=1, dtype=torch.float64, mid_channels=4):
    x = torch.randn(2, 2 * groups, *([5] * spatial_dims), dtype=dtype)
    weight = torch.randn(2 * groups, 2, *([3] * spatial_dims), dtype=dtype)
    bias = torch.randn(2 * groups, dtype=dtype)
    B = torch.randn(2 * groups, mid_channels * groups, dtype=dtype)
    R = torch.randn(mid_channels * groups, 2, *([3] * spatial_dims), dtype=dtype)
    return x, weight, bias, B, R


def _feedback_path(x, B, R, spatial_dims, **conv_args):
    """The literal feedback path x -> R -> B, in plain PyTorch: its exact VJP is PFA's (dL/dx, dL/dR)."""
    conv = [None, torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d][spatial_dims]
    mid = conv(x, R, None, **conv_args)
    return torch.matmul(mid.movedim(1, -1), B.t()).movedim(-1, 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("spatial_dims, groups", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_gradcheck(spatial_dims, groups, strategy):
    """gradcheck in float64: dL/dW, dL/db are the exact VJP of y = conv(x, W) + b; dL/dx, dL/dR are the
    exact VJP of the feedback path x -> R -> B (checked on a function whose value is that path and whose
    backward is the PFA op's)."""
    x, weight, bias, B, R = _conv_tensors(spatial_dims, groups)
    conv_args = dict(stride=2, padding=1, dilation=1, groups=groups)
    pfa = CONV_FUNCTIONS[spatial_dims]

    def forward_params(weight, bias):
        return pfa(x, weight, bias, B, R, **conv_args, strategy=strategy)

    def feedback_params(x, R):
        y = pfa(x, weight, bias, B, R, **conv_args, strategy=strategy)
        return y - y.detach() + _feedback_path(x, B, R, spatial_dims, **conv_args).detach()

    # backend="auto" returns the torch result on a shape's first backward and the measured choice (torch or cpp)
    # after it: the two agree to ~1e-16, not bitwise, which gradcheck's reentrancy check would take for
    # nondeterminism.
    assert torch.autograd.gradcheck(forward_params, (weight.requires_grad_(), bias.requires_grad_()), nondet_tol=1e-12)
    assert torch.autograd.gradcheck(feedback_params, (x.requires_grad_(), R.requires_grad_()), nondet_tol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_linear(strategy):
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 7, dtype=torch.float64)
    R = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, b: functional.pfa_linear(x, w, b, B, R, strategy=strategy),
                                    (weight, bias), nondet_tol=1e-12)  # as in test_gradcheck

    def feedback_params(x, R):
        y = functional.pfa_linear(x, weight, bias, B, R, strategy=strategy)
        return y - y.detach() + (x @ R.t() @ B.t()).detach()

    assert torch.autograd.gradcheck(feedback_params, (x, R), nondet_tol=1e-12)


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in tensors]
    y = fn(*tensors)
    grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))  # the same in every run
    y.backward(grad_output.to(y.dtype))
    return y, [t.grad for t in tensors]


@pytest.mark.parametrize("strategy", ("product", "sequence"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("kind", ("linear", "conv2d", "conv2d-groups"))
def test_autocast_against_low_precision_reference(kind, dtype, strategy):
    """Under autocast the output is in the autocast dtype, gradients come back in each input's dtype,
    and the error against a float64 reference is at most a small multiple of the reference's own
    error when it runs under the same autocast."""
    if kind == "linear":
        tensors = [torch.randn(6, 16), torch.randn(12, 16) / 4, torch.randn(12), torch.randn(12, 40) / 6,
                   torch.randn(40, 16) / 4]

        def run(x, w, b, B, R, strategy):
            return functional.pfa_linear(x, w, b, B, R, strategy=strategy)
    else:
        groups = 2 if kind == "conv2d-groups" else 1
        tensors = [torch.randn(2, 8, 7, 7), torch.randn(12, 8 // groups, 3, 3) / 6, torch.randn(12),
                   torch.randn(12, 24) / 5, torch.randn(24, 8 // groups, 3, 3) / 6]

        def run(x, w, b, B, R, strategy):
            return functional.pfa_conv2d(x, w, b, B, R, stride=2, padding=1, groups=groups, strategy=strategy)

    def with_grad(tensors, strategy, autocast):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return _grads(lambda *t: run(*t, strategy), tensors)

    exact_y, exact_grads = with_grad([t.double() for t in tensors], "reference", False)
    ref_y, ref_grads = with_grad(tensors, "reference", True)
    fast_y, fast_grads = with_grad(tensors, strategy, True)
    assert fast_y.dtype == dtype
    assert all(g is None or g.dtype == torch.float32 for g in fast_grads)
    for name, fast, ref, exact in zip(("y", "x", "weight", "bias", "B", "R"), [fast_y, *fast_grads],
                                      [ref_y, *ref_grads], [exact_y, *exact_grads], strict=True):
        if exact is None:
            assert fast is None and name == "B"
            continue
        fast_error, ref_error = relative_error(fast, exact), relative_error(ref, exact)
        assert fast_error <= LOW_PRECISION_ERROR_FACTOR * ref_error + LOW_PRECISION_FLOOR[dtype], (
            name, fast_error, ref_error)


def test_reference_strategy_is_the_literal_algorithm():
    x, weight, bias, B, R = _conv_tensors(2)
    weight.requires_grad_(True)
    y = functional.pfa_conv2d(x, weight, bias, B, R, padding=1, strategy="reference")
    torch.testing.assert_close(y, reference.pfa_conv(x, weight, bias, B, R, 1, 1, 1, 1))
    assert y.grad_fn.name().endswith("_LiteralPFABackward")


@pytest.mark.parametrize("change, match", [
    (dict(B=torch.randn(4, 3)), "B must have shape"),
    (dict(R=torch.randn(4, 2, 3)), "R must have shape"),
    (dict(bias=torch.randn(3)), "bias must have shape"),
    (dict(x=torch.randn(2, 3, 5, 5)), "channels"),
    (dict(x=torch.randn(5, 5)), "x must have shape"),
    (dict(weight=torch.randn(2, 2, 3)), "weight must have"),
    (dict(B=torch.randn(2, 4, dtype=torch.float64)), "B has dtype"),
    (dict(R=torch.randint(0, 3, (4, 2, 3, 3))), "R must be a floating-point"),
    (dict(x=[1.0]), "x must be a torch.Tensor"),
    (dict(stride=0), "stride"),
    (dict(padding=(1, 1, 1)), "padding"),
    (dict(strategy="fast"), "strategy"),
    (dict(backend="triton"), "backend='triton' is not available"),
    (dict(groups=2), "groups"),
])
def test_bad_input_raises_naming_the_argument(change, match):
    x, weight, bias, B, R = _conv_tensors(2, dtype=torch.float32)
    args = dict(x=x, weight=weight, bias=bias, B=B, R=R, stride=1, padding=1, groups=1, strategy="auto",
                backend="auto")
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        functional.pfa_conv2d(**args)


def test_named_backend_torch_runs_and_auto_reports_its_choice():
    assert pk.dispatch.candidate_backends("cpu", torch.float32, "explicit")[0] == "torch"
    x, weight, bias, B, R = _conv_tensors(2)
    torch.testing.assert_close(functional.pfa_conv2d(x, weight, bias, B, R, backend="torch"),
                               functional.pfa_conv2d(x, weight, bias, B, R, backend="auto"))


def _layer_grads(layer, x, autocast_dtype=None):
    """Output and (x, weight, bias, feedback) gradients of a layer, under autocast if a dtype is given."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype))
    return y, [x.grad, layer.weight.grad, layer.bias.grad, layer.feedback.parameter.grad]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("kind, strategy", [("linear", "product"), ("linear", "sequence"), ("conv2d-groups", "product"),
                                            ("conv2d-dense-groups", "product"), ("conv2d-dense-groups", "sequence")])
def test_projected_autocast_against_low_precision_reference(kind, dtype, strategy):
    """A projected layer under autocast against the literal algorithm on its explicit twin (R = B^T Z + N),
    run under the same autocast and in float64; dL/dZ is compared through B^T. (B is well conditioned here,
    as at the paper's r = 10; see PFAFeedback._warn_if_ill_conditioned for the other case.)"""
    if kind == "linear":
        layer, x = pk.PFALinear(16, 12, expand_ratio=10, parametrization="projected", strategy=strategy), \
            torch.randn(6, 16)
    else:
        layer = pk.PFAConv2d(8, 12, 3, stride=2, padding=1, groups=2, expand_ratio=10, parametrization="projected",
                             strategy=strategy, feedback_groups="dense" if "dense" in kind else "grouped")
        x = torch.randn(2, 8, 7, 7)
    twin = explicit_twin(layer)
    twin.strategy = "reference"
    fast_y, fast_grads = _layer_grads(layer, x, dtype)
    assert fast_y.dtype == dtype and all(g.dtype == torch.float32 for g in fast_grads)
    fast_grads[3] = projected_to_R_grad(layer, fast_grads[3])
    ref_y, ref_grads = _layer_grads(twin, x, dtype)
    exact_y, exact_grads = _layer_grads(copy.deepcopy(twin).double(), x.double())
    for name, fast, ref, exact in zip(("y", "x", "weight", "bias", "R"), [fast_y, *fast_grads], [ref_y, *ref_grads],
                                      [exact_y, *exact_grads], strict=True):
        fast_error, ref_error = relative_error(fast, exact), relative_error(ref, exact)
        assert fast_error <= LOW_PRECISION_ERROR_FACTOR * ref_error + LOW_PRECISION_FLOOR[dtype], (
            name, fast_error, ref_error)


def _projected_tensors(groups=1, keep_M=True):
    x, weight, bias, B, _ = _conv_tensors(2, groups, dtype=torch.float32)
    B_by_group = B.reshape(B.shape[0], groups, -1).transpose(0, 1)
    M = B_by_group @ B_by_group.transpose(1, 2) if keep_M else None
    Z = torch.randn(weight.shape[0], weight.shape[1] * groups, 3, 3)
    return x, weight, bias, B, M, Z


@pytest.mark.parametrize("keep_M", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_projected_functional_matches_explicit(groups, keep_M):
    """pfa_conv2d_projected with Z = pinv(B^T) R gives the explicit op's dL/dx, and dL/dZ = the dense correlation."""
    x, weight, bias, B, R = _conv_tensors(2, groups)
    Z, M = dense_projection(B, R, groups, keep_M)
    Z.requires_grad_(True)
    x_explicit, x_projected = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad_output = torch.randn(2, 2 * groups, 3, 3, dtype=torch.float64)
    functional.pfa_conv2d(x_explicit, weight, bias, B, R, stride=2, padding=1, groups=groups).backward(grad_output)
    functional.pfa_conv2d_projected(x_projected, weight, bias, B, M, Z, stride=2, padding=1,
                                    groups=groups).backward(grad_output)
    torch.testing.assert_close(x_projected.grad, x_explicit.grad, rtol=1e-10, atol=1e-12)
    correlation = torch.nn.grad.conv2d_weight(x, Z.shape, grad_output, stride=2, padding=1)
    torch.testing.assert_close(Z.grad, correlation, rtol=1e-12, atol=1e-12)
    x_rows, B_linear = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    y = functional.pfa_linear_projected(x_rows, torch.randn(3, 5, dtype=torch.float64), None, B_linear,
                                        None, torch.randn(3, 5, dtype=torch.float64), strategy="sequence")
    assert y.shape == (4, 3)


@pytest.mark.parametrize("change, match", [
    (dict(Z=torch.randn(2, 2, 3, 3)), "Z must have shape \\(C_out, C_in, \\*kernel\\)"),
    (dict(M=torch.randn(2, 2)), "M must have shape \\(groups, C_out, C_out\\)"),
    (dict(M=torch.randn(1, 2, 2, dtype=torch.float64)), "M has dtype"),
    (dict(strategy="reference"), "strategy='reference'.*explicit R"),
])
def test_projected_bad_input_raises_naming_the_argument(change, match):
    x, weight, bias, B, M, Z = _projected_tensors(groups=2)
    args = dict(x=x, weight=weight, bias=bias, B=B, M=M, Z=Z, padding=1, groups=2)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        functional.pfa_conv2d_projected(**args)
