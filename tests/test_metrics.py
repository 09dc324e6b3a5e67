"""Alignment metrics against theory and against direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pfa_kernels as pk
from pfa_kernels import metrics


@pytest.mark.parametrize("expand_ratio", [1, 10])
def test_path_alignment_matches_theory_when_R_is_B_transpose_W(expand_ratio):
    torch.manual_seed(0)
    layer = pk.PFAConv2d(128, 128, 3, expand_ratio=expand_ratio, dtype=torch.float64, parametrization="explicit")
    with torch.no_grad():
        layer.feedback.R.copy_(torch.einsum("om,oikl->mikl", layer.feedback.B, layer.weight))
    expected = math.degrees(math.acos(1 / math.sqrt(1 + 1 / expand_ratio)))
    assert metrics.theoretical_alignment(expand_ratio) == pytest.approx(expected)
    assert metrics.path_alignment(layer) == pytest.approx(expected, abs=1.0)
    assert metrics.norm_ratio(layer) == pytest.approx(math.sqrt(1 + 1 / expand_ratio), abs=0.03)
    if expand_ratio == 10:
        assert 17.0 < metrics.path_alignment(layer) < 18.1


def test_alignment_of_grouped_layers_uses_block_diagonal_weight():
    layer = pk.PFAConv2d(4, 4, 3, groups=2, expand_ratio=1, feedback_init="identity", dtype=torch.float64,
                         parametrization="explicit")
    with torch.no_grad():
        layer.feedback.R.copy_(layer.weight)
    assert metrics.path_alignment(layer) == pytest.approx(0.0, abs=1e-5)
    assert metrics.norm_ratio(layer) == pytest.approx(1.0)
    with torch.no_grad():
        layer.feedback.R.mul_(-2)
    assert metrics.path_alignment(layer) == pytest.approx(180.0, abs=1e-5)


def test_report_rows_and_table():
    model = nn.Sequential(pk.PFAConv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), pk.PFALinear(4, 2, expand_ratio=2))
    rows = metrics.report(model)
    assert [row["layer"] for row in rows] == ["0", "3"]
    assert rows[1]["mid_channels"] == 4 and 0 <= rows[1]["path_alignment"] <= 180
    assert rows[0]["norm_ratio"] == pytest.approx(metrics.norm_ratio(model[0]))
    assert "align (deg)" in metrics.format_report(rows)
    with pytest.raises(TypeError, match="PFA layer"):
        metrics.path_alignment(nn.Linear(2, 2))


def _model_with_bn():
    identity = dict(expand_ratio=1, feedback_init="identity", parametrization="explicit")
    return nn.Sequential(pk.PFAConv2d(3, 6, 3, padding=1, **identity),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                         pk.PFALinear(6 * 16, 10, **identity), nn.ReLU(),
                         pk.PFALinear(10, 3, expand_ratio=3, parametrization="explicit"))


def test_input_gradient_alignment_is_zero_when_feedback_is_the_weight_and_restores_state():
    torch.manual_seed(0)
    model = _model_with_bn()
    with torch.no_grad():
        for layer in (model[0], model[5]):
            layer.feedback.R.copy_(layer.weight)
    x, target = torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    angles = metrics.input_gradient_alignment(model, x, lambda out: nn.functional.cross_entropy(out, target))
    assert set(angles) == {"0", "5", "7"}
    # Layer 7 (random feedback) sends a misaligned error down; layer 5 with B·R = W passes it on
    # exactly as BP would, so its input error is as far off as the error it received.
    assert angles["7"] > 45
    assert 0 < angles["5"] < 90 and 0 < angles["0"] < 90
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[5].weight.grad is None
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    assert "forward" not in vars(model[0])


def test_input_gradient_alignment_of_a_network_that_is_backpropagation():
    torch.manual_seed(1)
    identity = dict(expand_ratio=1, feedback_init="identity", parametrization="explicit")
    model = nn.Sequential(pk.PFALinear(5, 8, **identity), nn.Tanh(), pk.PFALinear(8, 4, **identity))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.feedback.R.copy_(layer.weight)
    angles = metrics.input_gradient_alignment(model, torch.randn(6, 5), lambda out: out.square().sum())
    assert angles["0"] == pytest.approx(0, abs=1e-3) and angles["2"] == pytest.approx(0, abs=1e-3)
