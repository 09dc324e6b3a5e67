"""PFA modules against the literal algorithm and against their nn counterparts."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import (
    CONV_CASES,
    STRATEGIES,
    TOLERANCE,
    assert_matches_reference,
    assert_relative_close,
    build,
    explicit_twin,
    feedback_group_runs,
    is_grouped_case,
    layer_gradients,
    literal_forward,
    projected_to_R_grad,
    same_state_entry,
)
from torch import nn

import pfa_kernels as pk
from pfa_kernels.feedback import PARAMETRIZATIONS


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("case, strategy, feedback_groups", feedback_group_runs(sorted(CONV_CASES)))
def test_conv_matches_reference_float64(case, strategy, feedback_groups, parametrization):
    layer, _, _, x = build(case, strategy=strategy, parametrization=parametrization, feedback_groups=feedback_groups)
    assert layer.feedback.grouped == (is_grouped_case(case) and feedback_groups == "grouped")
    assert_matches_reference(layer, x, TOLERANCE[torch.float64])


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("case", ["2d-groups2", "2d-depthwise-stride2", "1d-groups-dilation"])
def test_grouped_feedback_refuses_the_sequence_order(case, parametrization):
    with pytest.raises(ValueError, match="strategy='sequence' is not an order of grouped feedback"):
        build(case, strategy="sequence", parametrization=parametrization)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("case, strategy, feedback_groups", feedback_group_runs(
    ["2d-k3-pad1", "2d-groups2", "2d-circular-groups", "1d-stride2", "3d-stride2"]) + [
    ("linear", strategy, "grouped") for strategy in STRATEGIES])
def test_matches_reference_float32(case, strategy, feedback_groups, parametrization):
    """float32 fast paths against the float64 literal algorithm on the same (float32-representable) inputs."""
    if case == "linear":
        layer, x = pk.PFALinear(9, 7, dtype=torch.float64, expand_ratio=3, strategy=strategy,
                                parametrization=parametrization), torch.randn(6, 9)
    else:
        layer, _, _, x = build(case, dtype=torch.float64, strategy=strategy, parametrization=parametrization,
                               feedback_groups=feedback_groups)
    layer32 = copy.deepcopy(layer).float()
    layer.load_state_dict(layer32.state_dict())  # the float64 reference sees the float32-rounded values
    x = x.float()
    _, grads, grad_output = layer_gradients(layer32, x)
    assert all(grad.dtype == torch.float32 for grad in grads.values())
    if parametrization == "projected":
        grads["R"] = projected_to_R_grad(layer, grads["R"].double())
        layer = explicit_twin(layer)
    _, expected, _ = layer_gradients(layer, x.double(), grad_output.double(), literal_forward(layer))
    for name, value in expected.items():
        assert_relative_close(grads[name], value, TOLERANCE[torch.float32], name)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("expand_ratio", [0.5, 1, 3, 10])
def test_conv_expand_ratios(expand_ratio, parametrization):
    layer = pk.PFAConv2d(3, 6, 3, stride=2, padding=1, dtype=torch.float64, expand_ratio=expand_ratio,
                         parametrization=parametrization)
    assert layer.feedback.mid_channels == int(expand_ratio * 6 + 0.5)
    assert_matches_reference(layer, torch.randn(2, 3, 7, 7, dtype=torch.float64), TOLERANCE[torch.float64])


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_forward_equals_nn(case):
    layer, nn_class, kwargs, x = build(case)
    plain = nn_class(**kwargs, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("feedback.")})
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("expand_ratio", [0.25, 1, 3, 10])
@pytest.mark.parametrize("input_shape", [(5,), (4, 5), (2, 3, 5)])
def test_linear_matches_reference(input_shape, expand_ratio, strategy, parametrization):
    layer = pk.PFALinear(5, 7, dtype=torch.float64, expand_ratio=expand_ratio, strategy=strategy,
                         parametrization=parametrization)
    assert layer.feedback.mid_channels == max(1, int(expand_ratio * 7 + 0.5))
    assert_matches_reference(layer, torch.randn(input_shape, dtype=torch.float64), TOLERANCE[torch.float64])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sparse_feedback_matches_reference(strategy):
    layer = pk.PFAConv2d(4, 6, 3, padding=1, dtype=torch.float64, expand_ratio=2, feedback_density=0.3,
                         strategy=strategy)
    assert_matches_reference(layer, torch.randn(2, 4, 5, 5, dtype=torch.float64), TOLERANCE[torch.float64])


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sparse_B_alone_matches_reference(strategy, parametrization):
    layer = pk.PFAConv2d(4, 6, 3, padding=1, dtype=torch.float64, expand_ratio=2, feedback_density=(0.3, 1.0),
                         strategy=strategy, parametrization=parametrization)
    assert layer.feedback.R_mask is None and not layer.feedback.B_mask.all()
    assert_matches_reference(layer, torch.randn(2, 4, 5, 5, dtype=torch.float64), TOLERANCE[torch.float64])


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("frozen", ["weight", "R", "bias", "x"])
@pytest.mark.parametrize("strategy, groups, feedback_groups", [
    (strategy, groups, feedback_groups) for strategy in STRATEGIES
    for groups, feedback_groups in ((1, "grouped"), (2, "grouped"), (2, "dense"))
    if (strategy, groups, feedback_groups) != ("sequence", 2, "grouped")])  # no such order (test above)
def test_partial_gradients(frozen, strategy, groups, feedback_groups, parametrization):
    """Only the gradients asked for are computed, and they are still exact."""
    layer = pk.PFAConv2d(4, 6, 3, groups=groups, padding=1, dtype=torch.float64, expand_ratio=1, strategy=strategy,
                         parametrization=parametrization, feedback_groups=feedback_groups)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    grad_output = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    twin = explicit_twin(layer) if parametrization == "projected" else layer
    _, expected, _ = layer_gradients(twin, x, grad_output, literal_forward(twin))
    if frozen != "x":
        {"weight": layer.weight, "R": layer.feedback.parameter, "bias": layer.bias}[frozen].requires_grad_(False)
    x = x.requires_grad_(frozen != "x")
    layer(x).backward(grad_output)
    got = {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad, "R": layer.feedback.parameter.grad}
    if parametrization == "projected" and got["R"] is not None:
        got["R"] = projected_to_R_grad(layer, got["R"])
    for name, value in got.items():
        if name == frozen:
            assert value is None
        else:
            torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_unbatched_input(parametrization):
    layer = pk.PFAConv2d(3, 4, 3, dtype=torch.float64, parametrization=parametrization)
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))
    assert_matches_reference(layer, x, TOLERANCE[torch.float64])


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_channels_last_and_non_contiguous(parametrization):
    layer = pk.PFAConv2d(4, 6, 3, padding=1, dtype=torch.float64, expand_ratio=2, parametrization=parametrization)
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    _, grads, _ = layer_gradients(layer, x)
    assert grads["x"].is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(layer, x, TOLERANCE[torch.float64])
    x_strided = torch.randn(2, 4, 14, 6, dtype=torch.float64)[:, :, ::2]
    assert not x_strided.is_contiguous()
    assert_matches_reference(layer, x_strided, TOLERANCE[torch.float64])
    linear = pk.PFALinear(5, 3, dtype=torch.float64, parametrization=parametrization)
    assert_matches_reference(linear, torch.randn(5, 4, dtype=torch.float64).t(), TOLERANCE[torch.float64])


def test_identity_feedback_gives_R_the_weight_gradient():
    layer = pk.PFAConv2d(5, 5, 3, padding=1, dtype=torch.float64, expand_ratio=1, feedback_init="identity")
    _, grads, _ = layer_gradients(layer, torch.randn(2, 5, 6, 6, dtype=torch.float64))
    torch.testing.assert_close(grads["R"], grads["weight"], rtol=0, atol=0)


@pytest.mark.parametrize("strategy, feedback_groups", [(strategy, feedback_groups) for strategy in STRATEGIES
                                                      for feedback_groups in ("grouped", "dense")
                                                      if (strategy, feedback_groups) != ("sequence", "grouped")])
def test_feedback_equal_to_weight_gives_backpropagation(strategy, feedback_groups):
    layer = pk.PFAConv2d(4, 6, 3, stride=2, groups=2, padding=1, dtype=torch.float64, expand_ratio=1,
                         feedback_init="identity", strategy=strategy, feedback_groups=feedback_groups,
                         parametrization="explicit")
    with torch.no_grad():
        layer.feedback.R.copy_(layer.weight)
    plain = nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=1, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("feedback.")})
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    x_bp = x.detach().clone().requires_grad_(True)
    grad_output = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    layer(x).backward(grad_output)
    plain(x_bp).backward(grad_output)
    torch.testing.assert_close(x.grad, x_bp.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip():
    layer = pk.PFAConv2d(4, 4, 3, expand_ratio=1.5, feedback_density=0.5, groups=2)
    state = layer.state_dict()
    # B and the masks are drawn from the seed in "_extra_state" (tests/test_feedback.py: checksums, old checkpoints)
    assert {"weight", "bias", "feedback.R", "feedback._extra_state"} == set(state)
    other = pk.PFAConv2d(4, 4, 3, expand_ratio=1.5, feedback_density=0.5, groups=2)
    assert not torch.equal(other.feedback.B, layer.feedback.B)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert same_state_entry(value, state[key]), key
    assert torch.equal(other.feedback.B, layer.feedback.B) and torch.equal(other.feedback.R_mask, layer.feedback.R_mask)
    assert torch.equal(other.feedback.B_mask, layer.feedback.B_mask)


def test_loads_backpropagation_checkpoints():
    conv = nn.Conv2d(3, 5, 3)
    layer = pk.PFAConv2d(3, 5, 3, parametrization="explicit")
    B_before = layer.feedback.B.clone()
    layer.load_state_dict(conv.state_dict())
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert torch.equal(layer.feedback.B, B_before)
    linear = nn.Linear(4, 2)
    pfa_linear = pk.PFALinear(4, 2, parametrization="explicit")
    pfa_linear.load_state_dict(linear.state_dict())
    assert torch.equal(pfa_linear.weight, linear.weight)
    # A PFA checkpoint missing part of its feedback is an error, not a silent skip.
    partial = {k: v for k, v in layer.state_dict().items() if k != "feedback.R"}
    with pytest.raises(RuntimeError, match="feedback.R"):
        layer.load_state_dict(partial)


def test_reset_parameters_redraws_the_same_feedback():
    layer = pk.PFAConv2d(3, 5, 3, feedback_density=0.5)
    B, R = layer.feedback.B.clone(), layer.feedback.R.detach().clone()
    with torch.no_grad():
        layer.feedback.R.mul_(3)
    layer.reset_parameters()
    assert torch.equal(layer.feedback.B, B) and torch.equal(layer.feedback.R, R)


def test_extra_repr_and_isinstance():
    layer = pk.PFAConv2d(3, 5, 3, expand_ratio=10)
    assert isinstance(layer, nn.Conv2d)
    text = repr(layer)
    assert "expand_ratio=10" in text and "B: (5, 50)" in text and "strategy='auto'" in text


def test_backward_plan_reports_choice():
    layer = pk.PFALinear(1024, 1024, expand_ratio=10, parametrization="explicit")
    plan = layer.backward_plan((8, 1024))
    assert (plan.input_order, plan.feedback_grad_order) == ("sequence", "sequence")
    assert plan.macs[("sequence", "sequence")] < plan.macs[("product", "product")]
    conv = pk.PFAConv2d(64, 64, 3, padding=1, expand_ratio=10, parametrization="explicit")
    plan = conv.backward_plan((16, 64, 56, 56))
    assert plan.input_order == "product" and plan.backend == "torch" and "cheapest" in plan.reason


@pytest.mark.parametrize("kwargs, match", [
    (dict(expand_ratio=0), "expand_ratio"),
    (dict(expand_ratio=-1.5), "expand_ratio"),
    (dict(expand_ratio="ten"), "expand_ratio"),
    (dict(feedback_density=0.0), "feedback_density"),
    (dict(feedback_density=1.5), "feedback_density"),
    (dict(feedback_init="gaussian"), "feedback_init"),
    (dict(strategy="fastest"), "strategy"),
    (dict(backend="cuda"), "backend"),
    (dict(parametrization="implicit"), "parametrization"),
    (dict(feedback_init="identity", expand_ratio=2), "expand_ratio"),
    (dict(groups=2, strategy="sequence"), "sequence"),
])
def test_bad_options_raise_naming_the_argument(kwargs, match):
    groups = kwargs.pop("groups", 1)
    with pytest.raises((ValueError, TypeError), match=match):
        pk.PFAConv2d(4, 4, 3, groups=groups, **kwargs)


def test_bad_input_raises_and_changes_nothing():
    layer = pk.PFAConv2d(3, 5, 3, expand_ratio=2)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 4, 6, 6))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    layer.backend = "triton"  # Triton runs CPU tensors only under its interpreter
    with pytest.raises(RuntimeError, match="backend='triton' is not available"):
        layer(torch.randn(2, 3, 6, 6))
    for key, value in layer.state_dict().items():
        assert same_state_entry(value, state[key])
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_saves_only_what_backward_needs(layer_kind):
    """No forward through R: autograd keeps x, W, B and R (parameter views), never a C_mid activation."""
    if layer_kind == "linear":
        layer = pk.PFALinear(6, 5, expand_ratio=10, parametrization="explicit")
        x = torch.randn(4, 6, requires_grad=True)
    else:
        layer = pk.PFAConv2d(3, 5, 3, expand_ratio=10, parametrization="explicit")
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert sorted(saved) == sorted([tuple(x.shape), tuple(layer.weight.shape), tuple(layer.feedback.B.shape),
                                    tuple(layer.feedback.R.shape)])
    literal_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: literal_saved.append(tuple(t.shape)) or t, lambda t: t):
        literal_forward(layer)(x)
    mid_shape = (*y.shape[:-1], 50) if layer_kind == "linear" else (2, 50, 6, 6)
    assert mid_shape in literal_saved  # the literal algorithm keeps the mid activation


# ----------------------------------------------------------------------------- edge shapes and misuse

_EDGE_LAYERS = {  # name: (PFA layer class and arguments, input shape)
    "linear-empty-batch": (pk.PFALinear, (4, 3), (0, 4)),
    "linear-empty-leading-dim": (pk.PFALinear, (4, 3), (2, 0, 4)),
    "linear-no-inputs": (pk.PFALinear, (0, 3), (5, 0)),
    "linear-no-outputs": (pk.PFALinear, (3, 0), (5, 3)),
    "conv-empty-batch": (pk.PFAConv2d, (3, 4, 3), (0, 3, 6, 6)),
    "conv-no-inputs": (pk.PFAConv2d, (0, 4, 3), (2, 0, 6, 6)),
    "conv-empty-batch-groups": (pk.PFAConv2d, (4, 6, 3), (0, 4, 5, 5)),
}
_EDGE_RUNS = [(parametrization, strategy, backend) for parametrization in PARAMETRIZATIONS for strategy in STRATEGIES
              for backend in ("torch", "cpp", "auto")
              if not (parametrization == "projected" and strategy == "reference")]


@pytest.mark.parametrize("parametrization, strategy, backend", _EDGE_RUNS)
@pytest.mark.parametrize("case", sorted(_EDGE_LAYERS))
def test_zero_size_shapes_behave_as_nn(case, parametrization, strategy, backend):
    """Empty batches, empty leading dims, C_in = 0 and C_out = 0: the outputs and every gradient are nn's (empty
    tensors, or zeros; dL/db sums grad_output), for every parametrization, strategy and backend."""
    from pfa_kernels.backends import cpp

    if backend == "cpp" and not cpp.is_available("cpu"):
        pytest.skip(cpp.unavailable_reason("cpu"))
    layer_class, arguments, input_shape = _EDGE_LAYERS[case]
    kwargs = dict(groups=2) if case.endswith("groups") else {}
    # Grouped feedback (the default) has no sequence order: the dense one runs it.
    feedback_groups = "dense" if kwargs and strategy == "sequence" else "grouped"
    layer = layer_class(*arguments, **kwargs, parametrization=parametrization, strategy=strategy, backend=backend,
                        dtype=torch.float64, feedback_groups=feedback_groups)
    reference = getattr(nn, layer_class.__name__[3:])(*arguments, **kwargs, dtype=torch.float64)
    reference.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)
    y, y_reference = layer(x), reference(x_reference)
    assert y.shape == y_reference.shape and torch.equal(y, y_reference)
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    y_reference.backward(grad_output)
    assert torch.equal(x.grad, x_reference.grad)
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(layer.bias.grad, reference.bias.grad)
    feedback_grad = layer.feedback.parameter.grad
    assert feedback_grad.shape == layer.feedback.parameter.shape and not feedback_grad.any()


@pytest.mark.parametrize("layer_class, arguments", [(pk.PFAConv2d, (3, 0, 3)), (pk.PFAConv2d, (0, 0, 3))])
def test_zero_output_channel_convolution_raises_as_nn(layer_class, arguments):
    """nn.Conv2d with C_out = 0 raises in its forward (cuDNN/oneDNN take no empty weight): so does the PFA layer,
    with the same error, and building it does not fail on the empty feedback."""
    layer = layer_class(*arguments)
    reference = nn.Conv2d(*arguments)
    x = torch.randn(2, arguments[0], 6, 6)
    with pytest.raises(RuntimeError) as nn_error:
        reference(x)
    with pytest.raises(RuntimeError) as pfa_error:
        layer(x)
    assert str(pfa_error.value) == str(nn_error.value)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_grouped_conv1d_with_frozen_feedback(backend, dtype, parametrization):
    """A grouped Conv1d with bias and frozen feedback: the weight gradient comes from BP's grouped convolution,
    not from a correlation that oneDNN returned although the mask did not ask for it ("invalid gradient at index
    1 - got [4, 1, 1, 1] but expected [4, 1, 1]")."""
    layer = pk.PFAConv1d(4, 4, 3, groups=2, bias=True, parametrization=parametrization, strategy="product",
                         backend=backend, dtype=dtype)
    layer.feedback.parameter.requires_grad_(False)
    reference = nn.Conv1d(4, 4, 3, groups=2, bias=True, dtype=dtype)
    reference.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(8, 4, 33, dtype=dtype, requires_grad=True)  # batch 8: oneDNN's path at batch 1 honours the mask
    layer(x).sum().backward()
    reference(x.detach()).sum().backward()
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_second_order_gradients_raise(layer_kind, parametrization):
    """create_graph=True gives first-order gradients; differentiating them again raises naming the layer by its
    weight shape, not PyTorch's generic "does not have a derivative"."""
    if layer_kind == "linear":
        layer, x = pk.PFALinear(5, 3, parametrization=parametrization), torch.randn(2, 5, requires_grad=True)
    else:
        layer, x = pk.PFAConv2d(2, 3, 3, parametrization=parametrization), torch.randn(2, 2, 5, 5, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second-order gradients are not supported by PFA layers.*weight "
                                           + re.escape(str(tuple(layer.weight.shape)))):
        grad_x.sum().backward()


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_forward_without_a_pfa_gradient_is_nn_forward(monkeypatch, layer_kind):
    """Under no_grad, or when neither x nor the feedback needs a gradient (a frozen first layer), the layer runs nn's
    forward, not the op: same outputs, and dL/dW is BP's. With x requiring grad it takes the op."""
    from pfa_kernels import functional

    calls = []
    for name in ("_linear", "_conv"):
        original = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *args, _original=original, **kwargs: (
            calls.append(1), _original(*args, **kwargs))[1])
    if layer_kind == "linear":
        layer, x = pk.PFALinear(5, 3), torch.randn(2, 5)
        reference = nn.Linear(5, 3)
    else:
        layer, x = pk.PFAConv2d(2, 3, 3, padding=1, padding_mode="reflect"), torch.randn(2, 2, 5, 5)
        reference = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    reference.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))
    assert calls == []
    layer.feedback.parameter.requires_grad_(False)
    layer(x).sum().backward()
    reference(x).sum().backward()
    assert calls == [] and torch.equal(layer.weight.grad, reference.weight.grad)
    layer(x.requires_grad_(True))
    assert calls == [1]


def test_brsf_draws_its_feedback_on_every_forward():
    """brsf's forward draws the batch's feedback magnitudes, with or without a gradient."""
    layer = pk.PFALinear(5, 3, rule="brsf")
    with torch.no_grad():
        layer(torch.randn(2, 5))
    first = layer.feedback.last_feedback_weight.clone()
    with torch.no_grad():
        layer(torch.randn(2, 5))
    assert not torch.equal(first, layer.feedback.last_feedback_weight)


@pytest.mark.parametrize("through_op", [False, True])
@pytest.mark.parametrize("shape", [(5, 4), (3, 5, 4), (2, 3, 5, 4)])
def test_an_inplace_activation_after_a_layer_gets_the_same_gradients(shape, through_op, monkeypatch):
    """nn.ReLU(inplace=True) after a PFALinear (Swin V2's cpb_mlp): F.linear of a 3-D input returns a view, which
    autograd lets no custom Function hand out for in-place use; the layer's output is a tensor of its own, on the
    eager path and through the torch.library op alike."""
    if through_op:
        monkeypatch.setattr(pk.ops, "_eager", lambda *tensors: False)
    torch.manual_seed(0)
    layer = pk.PFALinear(4, 6, expand_ratio=2, dtype=torch.float64, parametrization="explicit")
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grads = []
    for activation in (nn.ReLU(), nn.ReLU(inplace=True)):
        layer.zero_grad()
        x.grad = None
        activation(layer(x)).square().sum().backward()
        grads.append([x.grad.clone(), layer.weight.grad.clone(), layer.feedback.parameter.grad.clone()])
    for plain, inplace in zip(*grads, strict=True):
        torch.testing.assert_close(inplace, plain, rtol=1e-13, atol=1e-13)
