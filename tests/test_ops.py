"""The torch.library custom ops: opcheck (schema, fake kernels, autograd registration) and torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import pfa_kernels as pk
from pfa_kernels import ops


def _projection(B, groups):
    B_by_group = B.reshape(B.shape[0], groups, -1).transpose(0, 1)
    return B_by_group @ B_by_group.transpose(1, 2)


def _conv_samples():
    """(x, weight, bias, B, M, feedback, stride, padding, dilation, groups, parametrization, strategy, backend)."""
    f64 = {"dtype": torch.float64}
    for groups, strategy, parametrization in itertools.product((1, 2), ("auto", "product", "sequence"),
                                                               ("explicit", "projected")):
        x = torch.randn(2, 4, 6, 5, **f64, requires_grad=True)
        weight = torch.randn(6, 4 // groups, 3, 3, **f64, requires_grad=True)
        bias = torch.randn(6, **f64, requires_grad=True)
        B = torch.randn(6, 4, **f64)
        if parametrization == "explicit":
            M, feedback = None, torch.randn(4, 4 // groups, 3, 3, **f64, requires_grad=True)
        else:
            M, feedback = _projection(B, groups), torch.randn(6, 4, 3, 3, **f64, requires_grad=True)
        yield (x, weight, bias, B, M, feedback, [2, 1], [1, 0], [1, 2], groups, parametrization, strategy, "torch")
    x = torch.randn(2, 3, 7, dtype=torch.float32).to(memory_format=torch.contiguous_format)
    yield (x, torch.randn(5, 3, 3), None, torch.randn(5, 2), None, torch.randn(2, 3, 3), [1], [1], [1], 1, "explicit",
           "auto", "torch")
    # Projected with M applied through B (M = None): C_mid small next to C_out.
    yield (x, torch.randn(5, 3, 3), None, torch.randn(5, 2), None, torch.randn(5, 3, 3, requires_grad=True), [1], [1],
           [1], 1, "projected", "sequence", "torch")
    x = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    yield (x, torch.randn(3, 4, 1, 1), None, torch.randn(3, 9), None, torch.randn(9, 4, 1, 1), [1, 1], [0, 0], [1, 1],
           1, "explicit", "product", "torch")


def _linear_samples():
    """(x, weight, bias, B, M, feedback, parametrization, strategy, backend)."""
    f64 = {"dtype": torch.float64}
    for strategy, parametrization in itertools.product(("auto", "product", "sequence"), ("explicit", "projected")):
        B = torch.randn(4, 9, **f64)
        M, feedback = ((None, torch.randn(9, 5, **f64, requires_grad=True)) if parametrization == "explicit"
                       else (_projection(B, 1), torch.randn(4, 5, **f64, requires_grad=True)))
        yield (torch.randn(3, 2, 5, **f64, requires_grad=True), torch.randn(4, 5, **f64, requires_grad=True),
               torch.randn(4, **f64, requires_grad=True), B, M, feedback, parametrization, strategy, "torch")


def _conv_id(sample):
    return f"{sample[10]}-g{sample[9]}-{sample[11]}-{sample[0].dim() - 2}d{'-M' if sample[4] is not None else ''}"


@pytest.mark.parametrize("sample", list(_conv_samples()), ids=_conv_id)
def test_opcheck_conv(sample):
    torch.library.opcheck(ops.conv, sample)


@pytest.mark.parametrize("sample", list(_linear_samples()), ids=lambda s: f"{s[6]}-{s[7]}")
def test_opcheck_linear(sample):
    torch.library.opcheck(ops.linear, sample)


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
@pytest.mark.parametrize("mask", [[True, True, True, True], [False, True, False, True], [True, False, True, False],
                                  [False, False, False, True]])
def test_opcheck_backward_ops(mask, parametrization):
    conv_sample = next(s for s in _conv_samples() if s[10] == parametrization)
    x, weight, _, B, M, feedback, *conv_args = conv_sample
    grad_output = torch.randn(2, 6, 3, 1, dtype=torch.float64)
    torch.library.opcheck(ops.conv_backward, (grad_output, x.detach(), weight.detach(), B, M, feedback.detach(),
                                              *conv_args, mask))
    x, weight, _, B, M, feedback, *options = next(s for s in _linear_samples() if s[6] == parametrization)
    grad_output = torch.randn(3, 2, 4, dtype=torch.float64)
    torch.library.opcheck(ops.linear_backward, (grad_output, x.detach(), weight.detach(), B, M, feedback.detach(),
                                                *options, mask))


def _small_pfa_cnn(parametrization):
    return nn.Sequential(
        pk.PFAConv2d(3, 8, 3, padding=1, parametrization=parametrization), nn.BatchNorm2d(8), nn.ReLU(),
        pk.PFAConv2d(8, 8, 3, stride=2, groups=2, expand_ratio=2, padding_mode="reflect", padding=1,
                     parametrization=parametrization), nn.ReLU(),
        nn.Flatten(), pk.PFALinear(8 * 4 * 4, 5, strategy="sequence", parametrization=parametrization))


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, parametrization):
    """A model of PFA layers compiles without graph breaks and gives the eager gradients."""
    torch._dynamo.reset()
    model = _small_pfa_cnn(parametrization)
    x = torch.randn(4, 3, 8, 8)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert model[0].feedback.parameter.grad is not None


def test_torch_compile_converted_resnet18():
    """A converted torchvision ResNet-18 (BN, residual adds, strided and 1x1 convs, linear head) compiles
    with fullgraph=True and gives the eager gradients."""
    import torchvision

    torch._dynamo.reset()
    model = pk.convert(torchvision.models.resnet18(num_classes=10), expand_ratio=0.5)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()  # backend="auto" measures each shape here; both runs below use those decisions
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sample", list(_conv_samples()), ids=lambda s: f"g{s[9]}-{s[11]}-{s[10]}")
def test_eager_calls_equal_the_op_bit_for_bit(sample):
    """Eager calls on plain tensors skip torch.library's dispatch (ops.apply_conv's autograd.Function); outputs and
    every gradient are bitwise the op's, and only the op appears in a graph torch.compile or export traces."""
    x, weight, bias, B, M, feedback, *rest = sample
    backend = "torch"  # one backend for both calls: "auto" may switch from torch to cpp after its first call
    results = []
    for call in (ops.apply_conv, ops.conv):
        inputs = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
                  for t in (x, weight, bias, feedback)]
        y = call(inputs[0], inputs[1], inputs[2], B, M, inputs[3], *rest[:-1], backend)
        if y.requires_grad:
            y.backward(torch.ones_like(y))
        results.append((y, *(None if t is None else t.grad for t in inputs), type(y.grad_fn).__name__))
    (y_eager, *grads_eager, eager_node), (y_op, *grads_op, op_node) = results
    if y_eager.requires_grad:
        assert eager_node == "_EagerConvBackward" and "pfa_kernels_conv" in op_node
    assert torch.equal(y_eager, y_op)
    for eager, op in zip(grads_eager, grads_op, strict=True):
        assert (eager is None and op is None) or torch.equal(eager, op)


def test_traced_calls_take_the_op():
    layer = pk.PFALinear(4, 3)
    graph = torch.export.export(layer, (torch.randn(2, 4, requires_grad=True),)).graph
    assert any("pfa_kernels.linear" in str(node.target) for node in graph.nodes)
