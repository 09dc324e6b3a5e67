"""Zero-size inputs through the compiled ops: N = 0, C_in = 0, C_out = 0 (and C_mid = 0) give correctly shaped
empty or zero gradients, as nn's do (dL/dW, dL/db against nn's autograd; dL/dx, dL/dR against the literal
algorithm, reference.py, which runs wherever nn does).

A zero-size input used to reach the fused CPU kernel's division by its block count, and SIGFPE kills the whole
process: the cases run in a child process (this file run as a script) that prints each result as it goes; the
tests read them. A killed child fails the case it was running, and another child runs the rest.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from torch import nn

import pfa_kernels as pk
from pfa_kernels import reference
from pfa_kernels.backends import cpp

ORDERS = (("product", "product"), ("sequence", "sequence"), ("product", "sequence"), ("sequence", "product"))
MASKS = ([True, True, True, True], [True, False, True, False], [False, True, False, True])


def _assert_same(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12, msg=what)


def _grads(forward, inputs, grad_output):
    """Autograd gradients of forward(*inputs) for grad_output; zeros where an input is unused."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    grads = torch.autograd.grad(forward(*leaves), leaves, grad_output, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]


def _expected(x, weight, B, R, grad_output, conv=None):
    """(dL/dx, dL/dW, dL/db, dL/dR): nn's dL/dW and dL/db, the literal algorithm's dL/dx and dL/dR. Where nn's
    convolution cannot take the shapes (C_out = 0 raises; C_in = 0 returns no output channels, so it cannot take
    this g), the gradients by hand: sums of products with an empty g or x are zero, and dL/db sums g."""
    bias = weight.new_zeros(weight.shape[0])
    if conv is not None and 0 in (weight.shape[0], x.shape[1]):
        grad_b = grad_output.sum((0, 2, 3))
        return [torch.zeros_like(x), torch.zeros_like(weight), grad_b, torch.zeros_like(R)]
    if conv is None:
        nn_forward = F.linear
        literal = reference.pfa_linear
    else:
        nn_forward = lambda x, w, b: F.conv2d(x, w, b, *conv)  # noqa: E731
        literal = lambda x, w, b, B, R: reference.pfa_conv(x, w, b, B, R, *conv)  # noqa: E731
    _, grad_w, grad_b = _grads(nn_forward, (x, weight, bias), grad_output)
    grad_x, _, _, _, grad_r = _grads(literal, (x, weight, bias, B, R), grad_output)
    return [grad_x, grad_w, grad_b, grad_r]


def _check_op_grads(grads, expected, mask, like):
    names = ("dL/dx", "dL/dW", "dL/db", "dL/dR")
    for name, wanted, got, want, template in zip(names, mask, grads, expected, like, strict=True):
        _assert_same(got, want if wanted else template.new_empty(0), name)


# ----------------------------------------------------------------------------- cases


def _randn(*shape, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64, device=device)


def _linear_sequence(P, C_out, C_mid, C_in, dtype=torch.float64, device="cpu"):
    g, B, R = (_randn(*shape, device=device).to(dtype) for shape in ((P, C_out), (C_out, C_mid), (C_mid, C_in)))
    out = torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R)
    assert out.dtype == dtype
    _assert_same(out.double(), (g.double() @ B.double()) @ R.double(), "dL/dx")


def _feedback_product(C_out, C_mid, C_in_per_group, groups, device="cpu"):
    B, R = _randn(C_out, C_mid, device=device), _randn(C_mid, C_in_per_group, 3, 3, device=device)
    _assert_same(torch.ops.pfa_kernels.cpp_feedback_product(B, R, groups), reference.feedback_weight(B, R, groups),
                 "W_fb")


def _linear_backward(leading, C_in, C_out, C_mid, orders, mask, device="cpu"):
    x, weight = _randn(*leading, C_in, device=device), _randn(C_out, C_in, device=device)
    B, R = _randn(C_out, C_mid, device=device), _randn(C_mid, C_in, device=device)
    grad_output = _randn(*leading, C_out, device=device)
    grads = torch.ops.pfa_kernels.cpp_linear_backward(grad_output, x, weight, B, R, *orders, mask)
    _check_op_grads(grads, _expected(x, weight, B, R, grad_output), mask, (x, weight, weight, R))


def _conv_backward(N, C_in, C_out, groups, orders, mask, device="cpu"):
    conv = ([2, 1], [1, 1], [1, 1], groups)  # stride, padding, dilation, groups
    C_mid = 2 * groups
    x, weight = _randn(N, C_in, 5, 4, device=device), _randn(C_out, C_in // groups, 3, 3, device=device)
    B, R = _randn(C_out, C_mid, device=device), _randn(C_mid, C_in // groups, 3, 3, device=device)
    grad_output = _randn(N, C_out, 3, 4, device=device)
    grads = torch.ops.pfa_kernels.cpp_conv_backward(grad_output, x, weight, B, R, *conv[:3], groups, *orders, mask)
    _check_op_grads(grads, _expected(x, weight, B, R, grad_output, conv), mask, (x, weight, weight, R))


def _layer(make_layer, make_nn, input_shape, strategy, device="cpu"):
    """A PFA layer (backend="cpp") on a zero-size input: output and dL/dW, dL/db as nn's; dL/dx and dL/dR as the
    literal algorithm's (a convolution with C_in = 0 has none to compare: both are empty, and the literal
    algorithm cannot run, its g·B failing on the no-channel output ATen's convolution gives)."""
    from conftest import TOLERANCE, assert_matches_reference

    layer = make_layer(backend="cpp", strategy=strategy, dtype=torch.float64).to(device)
    twin = make_nn(dtype=torch.float64).to(device)
    twin.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = _randn(*input_shape, device=device)
    assert layer.backward_plan(x.shape).backend == "cpp"
    x_layer, x_nn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = layer(x_layer)
    y_nn = twin(x_nn)
    grad_output = torch.randn_like(y_nn)
    y.backward(grad_output)
    y_nn.backward(grad_output)
    _assert_same(y, y_nn, "output")
    for name in ("weight", "bias"):
        _assert_same(getattr(layer, name).grad, getattr(twin, name).grad, f"dL/d{name}")
    assert x_layer.grad.shape == x.shape and layer.feedback.parameter.grad.shape == layer.feedback.parameter.shape
    if isinstance(layer, nn.Conv2d) and layer.in_channels == 0:
        assert x_layer.grad.numel() == 0 and layer.feedback.parameter.grad.numel() == 0
    else:
        assert_matches_reference(layer, x, TOLERANCE[torch.float64])


def _opcheck(name, args, device="cpu"):
    """The fake kernel (cpp.py) agrees with the real one on the zero-size shapes, and autograd/compile checks pass."""
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(getattr(torch.ops.pfa_kernels, name).default, args)


def _opcheck_samples():
    B, mask = _randn(3, 5), [True, True, True, True]
    yield "linear_sequence-N0", ("cpp_linear_sequence_input_grad", (_randn(0, 3), B,
                                                                     _randn(5, 4)))
    yield "feedback_product-Cin0", ("cpp_feedback_product", (B, _randn(5, 0, 3, 3), 1))
    for name, (x, g) in {"N0": ((0, 4), (0, 3)), "Cin0": ((2, 0), (2, 3))}.items():
        yield f"linear_backward-{name}", ("cpp_linear_backward", (
            _randn(*g), _randn(*x), _randn(3, x[1]), B,
            _randn(5, x[1]), "sequence", "sequence", mask))
        yield f"conv_backward-{name}", ("cpp_conv_backward", (
            _randn(*g, 3, 4), _randn(*x, 5, 4), _randn(3, x[1], 3, 3), B,
            _randn(5, x[1], 3, 3), [2, 1], [1, 1], [1, 1], 1, "sequence", "product", mask))


def _cases():
    """{case id: (function, arguments)}: every op called directly, and through the layers."""
    cases = {}
    for shape in ((0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 0, 4), (2, 3, 5, 0), (0, 0, 0, 0)):
        cases["linear_sequence-" + "x".join(map(str, shape))] = (_linear_sequence, shape)
    cases["linear_sequence-bf16-0x3x5x4"] = (_linear_sequence, (0, 3, 5, 4, torch.bfloat16))
    cases["linear_sequence-f32-2x3x5x0"] = (_linear_sequence, (2, 3, 5, 0, torch.float32))
    for shape in ((0, 4, 2, 1), (3, 0, 2, 1), (3, 4, 0, 1), (0, 4, 2, 2), (3, 4, 0, 2)):
        cases["feedback_product-" + "x".join(map(str, shape))] = (_feedback_product, shape)
    linear_shapes = {"N0": ((0,), 4, 3, 5), "N0-3d": ((3, 0), 4, 3, 5), "Cin0": ((2,), 0, 3, 5),
                     "Cout0": ((2,), 4, 0, 5), "Cmid0": ((2,), 4, 3, 0), "unbatched-Cin0": ((), 0, 3, 5)}
    conv_shapes = {"N0": (0, 4, 3, 1), "N0-groups2": (0, 4, 6, 2), "Cin0": (2, 0, 3, 1),
                   "Cin0-groups2": (2, 0, 6, 2), "Cout0": (2, 4, 0, 1)}
    for orders in ORDERS:
        for m, mask in enumerate(MASKS):
            tag = f"{orders[0]}-{orders[1]}-mask{m}"
            for name, shape in linear_shapes.items():
                cases[f"linear_backward-{name}-{tag}"] = (_linear_backward, (*shape, orders, mask))
            for name, shape in conv_shapes.items():
                cases[f"conv_backward-{name}-{tag}"] = (_conv_backward, (*shape, orders, mask))
    layers = {"linear-N0": (lambda **kw: pk.PFALinear(4, 3, **kw), lambda **kw: nn.Linear(4, 3, **kw), (0, 4)),
              "linear-N0-3d": (lambda **kw: pk.PFALinear(4, 3, **kw), lambda **kw: nn.Linear(4, 3, **kw), (2, 0, 4)),
              "linear-Cin0": (lambda **kw: pk.PFALinear(0, 3, **kw), lambda **kw: nn.Linear(0, 3, **kw), (5, 0)),
              "conv-N0": (lambda **kw: pk.PFAConv2d(3, 4, 3, padding=1, **kw),
                          lambda **kw: nn.Conv2d(3, 4, 3, padding=1, **kw), (0, 3, 5, 5)),
              "conv-N0-groups2": (lambda **kw: pk.PFAConv2d(4, 4, 3, groups=2, expand_ratio=2, feedback_groups="dense",
                                                            **kw),
                                  lambda **kw: nn.Conv2d(4, 4, 3, groups=2, **kw), (0, 4, 5, 5)),
              "conv-N0-grouped-feedback": (lambda **kw: pk.PFAConv2d(4, 4, 3, groups=2, expand_ratio=2, **kw),
                                           lambda **kw: nn.Conv2d(4, 4, 3, groups=2, **kw), (0, 4, 5, 5)),
              "conv-Cin0": (lambda **kw: pk.PFAConv2d(0, 4, 3, **kw), lambda **kw: nn.Conv2d(0, 4, 3, **kw),
                            (2, 0, 5, 5))}
    for name, sample in _opcheck_samples():
        cases[f"opcheck-{name}"] = (_opcheck, sample)
    for name, (make_layer, make_nn, shape) in layers.items():
        for strategy in ("auto", "product") if name.endswith("grouped-feedback") else ("auto", "product", "sequence"):
            cases[f"layer-{name}-{strategy}"] = (_layer, (make_layer, make_nn, shape, strategy))
    return cases


CASE_IDS = list(_cases())


def _run_cases(case_ids):
    """Child process: run these cases, one JSON line per event, flushed so a crash leaves the ones before it."""
    assert cpp.LOAD_ERROR is None, cpp.LOAD_ERROR
    torch.manual_seed(0)
    cases = _cases()
    for case in case_ids:
        function, arguments = cases[case]
        print(json.dumps({"start": case}), flush=True)
        try:
            function(*arguments)
        except Exception as error:  # reported to the parent, which fails that case
            print(json.dumps({"case": case, "error": f"{type(error).__name__}: {error}"}), flush=True)
        else:
            print(json.dumps({"case": case, "error": None}), flush=True)


@pytest.fixture(scope="module")
def results():
    """{case id: None (passed) or the error}. A child killed in a case records how it died for that case, and a
    new child carries on with the cases after it."""
    outcome, remaining = {}, CASE_IDS
    while remaining:
        child = subprocess.run([sys.executable, __file__], input=json.dumps(remaining), capture_output=True,
                               text=True, timeout=600, cwd=Path(__file__).parent)
        started = None
        for line in child.stdout.splitlines():
            event = json.loads(line)
            if "start" in event:
                started = event["start"]
            else:
                outcome[event["case"]] = event["error"]
                started = None
        if child.returncode == 0:
            break
        how = (f"signal {signal.Signals(-child.returncode).name}" if child.returncode < 0
               else f"exit code {child.returncode}")
        if started is None:  # died outside any case: nothing more to learn from another child
            raise RuntimeError(f"the child process died ({how}): {child.stderr[-2000:]}")
        outcome[started] = f"the child process died ({how}) in this case; stderr: {child.stderr[-2000:]}"
        remaining = remaining[remaining.index(started) + 1:]
    return outcome


@pytest.mark.parametrize("case", CASE_IDS)
def test_zero_size(case, results):
    assert case in results, "not run"
    if results[case] is not None:
        pytest.fail(results[case])


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", CASE_IDS)
def test_zero_size_cuda(case):
    """The same cases on the GPU, in this process (a zero-size grid there raises "invalid configuration argument",
    it does not kill the process): every CUDA op returns before launching."""
    function, arguments = _cases()[case]
    function(*arguments, device="cuda")
    torch.cuda.synchronize()


if __name__ == "__main__":
    _run_cases(json.load(sys.stdin))
