"""The C++ eager twin of a projected linear layer (csrc/eager_linear.cpp, ops._cpp_eager_order) and a layer's cached
fast path to it (pfa_kernels/eager_ticket.py): bit for bit the Python path, taken only where that would run the
PyTorch backend's measured plan, and left whenever anything the full path checks changes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES

import pfa_kernels as pk
from pfa_kernels import ops
from pfa_kernels.backends import cpp as cpp_backend

pytestmark = pytest.mark.skipif(cpp_backend.EAGER is None, reason="the compiled extension is not built")

TWIN = "EagerProjectedLinear"


def _took_twin(output: torch.Tensor) -> bool:
    return output.grad_fn is not None and TWIN in output.grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["product", "sequence"])
@pytest.mark.parametrize("frozen", ["", "x", "weight", "bias", "Z", "no-bias"])
def test_the_cpp_twin_is_the_python_twin_bit_for_bit(device, dtype, order, frozen):
    """Output and every gradient of the C++ twin equal the Python twin's on the PyTorch backend with the same order,
    whichever inputs need a gradient, with gradients accumulated over two calls (on a GPU too, where present)."""
    torch.manual_seed(0)
    layer = pk.PFALinear(7, 5, bias=frozen != "no-bias", parametrization="projected", dtype=dtype, device=device)
    weight, B, M, Z, _ = layer._feedback_arguments()
    x = torch.randn(6, 7, dtype=dtype, device=device)
    tensors = {"x": x, "weight": weight, "bias": layer.bias, "Z": Z}
    results = []
    for run in ("cpp", "python"):
        leaves = {name: None if t is None else t.detach().clone().requires_grad_(name != frozen)
                  for name, t in tensors.items()}
        arguments = (leaves["x"], leaves["weight"], leaves["bias"])
        for _ in range(2):
            if run == "cpp":
                output = cpp_backend.EAGER.eager_projected_linear(*arguments, M, leaves["Z"], order == "sequence",
                                                                  "auto", "auto")
            else:
                output = ops._EagerLinear.apply(*arguments, B, M, leaves["Z"], "projected", order, "torch")
            output.backward(torch.arange(output.numel(), dtype=dtype, device=device).reshape(output.shape).cos())
        results.append((output, {name: None if t is None else t.grad for name, t in leaves.items()}))
    (cpp_output, cpp_grads), (python_output, python_grads) = results
    assert torch.equal(cpp_output, python_output)
    for name, grad in python_grads.items():
        assert (grad is None and cpp_grads[name] is None) or torch.equal(cpp_grads[name], grad), name


def _train(layer, inputs, steps=3):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    took = []
    for x in inputs[:steps]:
        optimizer.zero_grad()
        output = layer(x)
        took.append(_took_twin(output))
        output.square().sum().backward()
        optimizer.step()
    return took


def test_a_layer_takes_the_twin_after_measuring_and_trains_as_without_it(monkeypatch):
    """The first call measures in Python; later calls take the twin (the second through the full path, which issues
    the ticket, then the ticket). Three SGD steps leave the parameters bit for bit those of the Python path."""
    torch.manual_seed(1)
    layer = pk.PFALinear(16, 12)
    python_layer = copy.deepcopy(layer)
    inputs = [torch.randn(8, 16, requires_grad=True) for _ in range(4)]
    pk.dispatch.clear()
    assert _train(layer, inputs, 4) == [False, True, True, True]
    assert layer._eager_ticket is not None
    monkeypatch.setattr(cpp_backend, "EAGER", None)
    pk.dispatch.clear()
    assert _train(python_layer, inputs, 4) == [False] * 4
    for (name, mine), theirs in zip(layer.named_parameters(), python_layer.parameters(), strict=True):
        assert torch.equal(mine, theirs), name


def _ticketed_layer():
    torch.manual_seed(2)
    layer = pk.PFALinear(10, 6)
    x = torch.randn(4, 10, requires_grad=True)
    for _ in range(2):
        layer(x).sum().backward()
    assert layer._eager_ticket is not None and _took_twin(layer(x))
    return layer, x


@pytest.mark.parametrize("change", ["strategy", "backend", "dtype", "shape", "no x grad", "frozen weight", "no_grad",
                                    "autocast", "dispatch clear", "static dispatch", "deterministic", "new weight",
                                    "reparametrize"])
def test_the_ticket_is_left_when_anything_changes(monkeypatch, change):
    """Every change the full path would see sends the call through it: the twin is not taken where the full path
    would not take it, and the output is the full path's."""
    layer, x = _ticketed_layer()
    if change == "strategy":
        layer.strategy = "sequence"
    elif change == "backend":
        layer.backend = "torch"
    elif change == "dtype":
        layer.double()
        x = x.detach().double().requires_grad_()
    elif change == "shape":
        x = torch.randn(5, 10, requires_grad=True)
    elif change == "no x grad":
        x = x.detach()
    elif change == "frozen weight":
        layer.weight.requires_grad_(False)
    elif change == "dispatch clear":
        pk.dispatch.clear()
    elif change == "static dispatch":
        monkeypatch.setenv("PFA_KERNELS_DISPATCH", "static")
    elif change == "new weight":
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    elif change == "reparametrize":
        pk.reparametrize(layer, "explicit")
    if change == "no_grad":
        with torch.no_grad():
            output = layer(x)
        assert output.grad_fn is None
        return
    if change == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = layer(x)
        assert output.dtype == torch.bfloat16 and not _took_twin(output)
        return
    if change == "deterministic":
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert not _took_twin(layer(x))  # a new key: measured first
        finally:
            torch.use_deterministic_algorithms(previous)
        return
    output = layer(x)
    if change == "new weight":  # the same call otherwise: the full path takes the twin again, with the new weight
        assert layer._eager_ticket.weight is layer.weight
        assert torch.equal(output, torch.nn.functional.linear(x, layer.weight, layer.bias))
        return
    assert not _took_twin(output)


def test_create_graph_through_the_twin_refuses_a_second_derivative():
    """Under create_graph=True the twin's backward runs the backward op: first-order gradients are the Python path's,
    and differentiating them again raises as it does there."""
    layer, x = _ticketed_layer()
    output = layer(x)
    assert _took_twin(output)
    grad_x, = torch.autograd.grad(output.square().sum(), x, create_graph=True)
    with torch.no_grad():
        expected = output.mul(2).mm(layer.feedback.feedback_weight())
    torch.testing.assert_close(grad_x, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="second-order gradients are not supported by PFA layers"):
        grad_x.sum().backward()


def test_create_graph_asks_the_backward_op_for_the_forward_gradients():
    """Under create_graph the twin passes the backward op the gradients the forward asked for (as the Python twin's
    ctx.needs_input_grad), so it finds the decision already measured instead of measuring a new key."""
    layer, x = _ticketed_layer()
    keys = len(pk.dispatch.table())
    output = layer(x)
    assert _took_twin(output)
    torch.autograd.grad(output.sum(), x, create_graph=True)
    assert len(pk.dispatch.table()) == keys


def test_layers_whose_weight_is_not_a_registered_parameter_take_the_full_path():
    """Pruning (and parametrizations, DataParallel replicas, FSDP's flat parameters) replace the registered weight:
    no ticket is issued (the full path may still take the twin, which differentiates the computed weight as the
    Python twin does), and the calls raise nothing."""
    from torch.nn.utils import prune

    layer, x = _ticketed_layer()
    prune.l1_unstructured(layer, "weight", amount=0.5)
    for _ in range(3):
        output = layer(x)
        output.sum().backward()
    assert layer._eager_ticket is None
    assert torch.equal(output, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert layer.weight_orig.grad is not None


def test_a_traced_layer_records_the_pfa_gradient():
    """torch.jit.trace cannot see the C++ twin (it would record a plain linear, BP's gradient): a traced layer with
    a ticket records the Python twin, whose backward feeds the error back through W_fb."""
    layer, x = _ticketed_layer()
    traced = torch.jit.trace(layer, (x,), check_trace=False)
    grad_x, = torch.autograd.grad(traced(x).sum(), x)
    expected = torch.ones(x.shape[0], layer.out_features).mm(layer.feedback.feedback_weight().detach())
    torch.testing.assert_close(grad_x, expected, rtol=1e-5, atol=1e-6)


def test_the_ticket_is_dropped_when_the_layer_is_moved_copied_or_reparametrized():
    """A ticket holds the layer's tensors: .to() (which replaces M), pickling (another process has not measured the
    call), deepcopy and pk.reparametrize drop it."""
    import io

    layer, _ = _ticketed_layer()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)._eager_ticket is None
    assert copy.deepcopy(layer)._eager_ticket is None
    layer.double()
    assert layer._eager_ticket is None
    layer, _ = _ticketed_layer()
    pk.reparametrize(layer, "explicit")
    assert layer._eager_ticket is None


def test_a_layer_holding_B_takes_the_full_path():
    """A B loaded from an older checkpoint is held (and the ops get it): no ticket while it is."""
    layer, x = _ticketed_layer()
    layer.feedback.B = layer.feedback.B.clone()
    output = layer(x)
    assert layer._eager_ticket is None and not _took_twin(output)


@pytest.mark.parametrize("bias", [True, False])
def test_a_call_through_the_ticket_matches_the_literal_algorithm(monkeypatch, bias):
    """A float64 layer's call that takes the twin through its ticket: output and every gradient are reference.py's
    (on the explicit twin of the layer, dL/dR = B^T dL/dZ) to 1e-12."""
    from conftest import assert_matches_reference

    from pfa_kernels import eager_ticket

    torch.manual_seed(3)
    layer = pk.PFALinear(9, 7, bias=bias, dtype=torch.float64)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        layer(x).sum().backward()
    runs = []
    run = eager_ticket.EagerTicket.run
    monkeypatch.setattr(eager_ticket.EagerTicket, "run", lambda ticket, x: runs.append(x) or run(ticket, x))
    assert_matches_reference(layer, x, 1e-12)
    assert len(runs) == 1  # the layer's call in it went through the ticket
