"""Fixed-feedback baselines (FA, uSF, frSF, brSF) against their literal references, and convert's modes."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCE, assert_relative_close, layer_gradients, relative_error
from torch import nn

import pfa_kernels as pk
from pfa_kernels import reference
from pfa_kernels.baselines import FIXED_RULES

LAYERS = {
    "linear": lambda **kw: (pk.PFALinear(6, 5, dtype=torch.float64, **kw), torch.randn(3, 2, 6, dtype=torch.float64)),
    "conv1d": lambda **kw: (pk.PFAConv1d(3, 5, 3, stride=2, padding=1, dtype=torch.float64, **kw),
                            torch.randn(2, 3, 9, dtype=torch.float64)),
    "conv2d-groups": lambda **kw: (pk.PFAConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64, **kw),
                                   torch.randn(2, 4, 5, 5, dtype=torch.float64)),
    "conv3d": lambda **kw: (pk.PFAConv3d(2, 3, 3, stride=2, padding=1, dtype=torch.float64, **kw),
                            torch.randn(1, 2, 5, 4, 5, dtype=torch.float64)),
}


def _literal(layer, feedback_weight):
    def forward(x):
        if isinstance(layer, pk.PFALinear):
            return reference.fixed_feedback_linear(x, layer.weight, layer.bias, feedback_weight)
        return reference.fixed_feedback_conv(x, layer.weight, layer.bias, feedback_weight, layer.stride,
                                             layer.padding, layer.dilation, layer.groups)
    return forward


@pytest.mark.parametrize("rule", FIXED_RULES)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fixed_rules_match_their_literal_reference(kind, rule):
    """float64: dL/dx through W_fb, dL/dW and dL/db as in BP; the layer has no learned feedback."""
    layer, x = LAYERS[kind](rule=rule, feedback_seed=3)
    assert layer.feedback.parameter is None and not list(layer.feedback.parameters())
    output, grads, grad_output = layer_gradients(layer, x)
    used = layer.feedback.last_feedback_weight if rule == "brsf" else layer.feedback_weight()
    expected_output, expected, _ = layer_gradients(layer, x, grad_output, _literal(layer, used))
    assert_relative_close(output, expected_output, TOLERANCE[torch.float64], "output")
    for name in ("x", "weight", "bias"):
        assert_relative_close(grads[name], expected[name], TOLERANCE[torch.float64], name)
    assert grads["x"].sub(x.new_zeros(1)).norm() > 0


def test_rule_feedback_weights():
    weight_shape = (4, 3, 3)
    layer = pk.PFAConv1d(3, 4, 3, rule="usf")
    W = layer.weight.detach()
    torch.testing.assert_close(layer.feedback_weight(), torch.sign(W) * W.square().mean().sqrt())
    fa = pk.PFAConv1d(3, 4, 3, rule="fa", feedback_seed=1)
    assert fa.feedback.F.shape == weight_shape and fa.feedback.F.abs().max() <= 1 / 9 ** 0.5
    assert torch.equal(fa.feedback_weight(), pk.PFAConv1d(3, 4, 3, rule="fa", feedback_seed=1).feedback_weight())
    frsf = pk.PFAConv1d(3, 4, 3, rule="frsf")
    assert torch.equal(torch.sign(frsf.feedback_weight()), torch.sign(frsf.weight.detach()))
    brsf = pk.PFAConv1d(3, 4, 3, rule="brsf")
    x = torch.randn(2, 3, 7)
    brsf(x)
    first = brsf.feedback.last_feedback_weight.clone()
    brsf(x)
    assert not torch.equal(first, brsf.feedback.last_feedback_weight)  # new magnitudes every batch
    assert torch.equal(torch.sign(first), torch.sign(brsf.weight.detach()))
    assert "rule='brsf'" in repr(brsf)


@pytest.mark.parametrize("mode", ["pfa", "pfa-o", "kp", *FIXED_RULES])
def test_convert_modes_and_metrics(mode):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(),
                          nn.LazyLinear(4))
    model(torch.randn(2, 3, 8, 8))
    model = pk.convert(model, mode=mode, feedback_seed=0)
    layers = [m for m in model.modules() if isinstance(m, pk.nn.PFA_LAYERS)]
    assert len(layers) == 3 and all(layer.rule == ("pfa" if mode in ("pfa", "pfa-o", "kp") else mode)
                                    for layer in layers)
    if mode in ("pfa-o", "kp"):
        assert all(layer.feedback.mid_channels == layer.weight.shape[0] for layer in layers)
    rows = pk.metrics.report(model)
    assert [row["rule"] for row in rows] == [layer.rule for layer in layers]
    for row in rows:
        assert 0 <= row["path_alignment"] <= 180 and row["norm_ratio"] > 0
    if mode in ("usf", "frsf", "brsf"):  # sign-concordant feedback is within 90 degrees of W
        assert all(row["path_alignment"] < 90 for row in rows)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(layer.weight.grad is not None for layer in layers)


def test_fixed_rules_refuse_pfa_arguments_and_learning():
    with pytest.raises(TypeError, match="fixed-feedback rule.*expand_ratio"):
        pk.convert(nn.Sequential(nn.Linear(3, 2)), mode="fa", expand_ratio=10)
    with pytest.raises(ValueError, match="rule must be one of"):
        pk.PFALinear(3, 2, rule="dfa")
    weight, feedback_weight = torch.randn(2, 3), torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="does not learn"):  # refused before any forward work
        pk.functional.feedback_linear(torch.randn(4, 3), weight.requires_grad_(), None, feedback_weight)
    model = pk.convert(nn.Sequential(nn.Linear(3, 2)), mode="fa")
    assert pk.reparametrize(model, "projected") is model and model[0].parametrization == "direct"


def test_dfa_matches_the_literal_algorithm():
    """DFA (one batched projection) vs the hand-written DFA of an MLP in float64: every weight and bias gradient."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    model = pk.convert(mlp, mode="dfa", feedback_seed=5)
    x, grad_output = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    model(x).backward(grad_output)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    expected = reference.dfa_mlp_gradients(x, [m.weight for m in linears], [m.bias for m in linears],
                                           model.feedback_matrices(), grad_output)
    for layer, (grad_weight, grad_bias) in zip(linears, expected, strict=True):
        assert_relative_close(layer.weight.grad, grad_weight, TOLERANCE[torch.float64], "weight")
        assert_relative_close(layer.bias.grad, grad_bias, TOLERANCE[torch.float64], "bias")
    # The output layer learns as in backpropagation; the hidden layers do not.
    dfa_grads = [layer.weight.grad.clone() for layer in linears]
    mlp.zero_grad()
    mlp(x).backward(grad_output)
    torch.testing.assert_close(dfa_grads[-1], linears[-1].weight.grad)
    assert relative_error(dfa_grads[0], linears[0].weight.grad) > 0.1


def test_dfa_on_a_cnn_trains_and_keeps_its_feedback():
    model = pk.convert(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                                     nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)), mode="dfa", feedback_seed=1)
    x = torch.randn(8, 1, 8, 8)
    model(x).sum().backward()
    assert [D.shape for D in model.feedback_matrices()] == [(4 * 8 * 8, 3), (4 * 3 * 3, 3)]
    D = model.D.clone()
    model(x).sum().backward()
    assert torch.equal(model.D, D)
    with torch.no_grad():
        assert model(x).shape == (8, 3)
    with pytest.raises(TypeError, match="dfa"):
        pk.convert(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), mode="dfa", expand_ratio=3)
