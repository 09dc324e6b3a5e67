"""pk.verify and pk.testing.assert_matches_reference: every PFA layer runs, learns, and equals the literal algorithm
on the user's own architecture; layers that never run (a weight passed to a function) and wrong kernels are caught."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import pfa_kernels as pk
from pfa_kernels.backends import torch_ops


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(8 * 4 * 4, 5))


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
def test_a_converted_model_matches_the_literal_algorithm(parametrization):
    model = pk.convert(_cnn(), expand_ratio=4, parametrization=parametrization)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = pk.testing.assert_matches_reference(model, (torch.randn(2, 3, 8, 8),), tolerance=1e-12)
    assert report.ok and len(report.layers) == 3 and all(layer.forward_calls == 1 for layer in report.layers)
    assert all(set(layer.errors) == {"weight", "bias", "feedback"} for layer in report.layers)
    assert all(p.grad is None and torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert "max relative error" in str(report)


class _UsesAWeightDirectly(nn.Module):
    """Passes one layer's weight to a function, as torchvision's Swin attention did before its adapter existed: the
    converted layer's forward (and so its PFA backward) never runs."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(6, 6)
        self.bypassed = nn.Linear(6, 6)

    def forward(self, x):
        return self.used(x) + nn.functional.linear(x, self.bypassed.weight, self.bypassed.bias)


def test_layers_that_never_run_are_reported():
    torch.manual_seed(0)
    model = pk.convert(_UsesAWeightDirectly(), expand_ratio=2)
    report = pk.verify(model, (torch.randn(3, 6),))
    assert {layer.name for layer in report.layers if layer.forward_calls == 0} == {"bypassed"}
    assert {layer.name for layer in report.layers if layer.feedback_has_grad is False} == {"bypassed"}
    assert not report.ok and len(report.problems()) == 2
    with pytest.raises(AssertionError, match="bypassed: its forward never ran"):
        pk.testing.assert_matches_reference(model, (torch.randn(3, 6),))


def test_every_layer_of_a_converted_swin_runs():
    """torchvision's Swin passes attn.qkv.weight and attn.proj.weight to a function; the attention adapter makes those
    layers' forwards run, so none of the 48 is silent."""
    torch.manual_seed(0)
    report = pk.verify(pk.convert(torchvision.models.swin_t(num_classes=10), expand_ratio=0.25),
                       (torch.randn(1, 3, 32, 32),))
    assert report.ok, report.problems()
    assert all(layer.forward_calls >= 1 and layer.feedback_has_grad for layer in report.layers)
    assert sum(layer.name.endswith(("attn.qkv", "attn.proj")) for layer in report.layers) == 24


def test_a_wrong_kernel_is_caught(monkeypatch):
    """A backward whose dL/dx is 0.1% off (as a faulty kernel's would be) fails the check."""
    real = torch_ops.conv_backward

    def wrong(*args, **kwargs):
        grad_x, *rest = real(*args, **kwargs)
        return (None if grad_x is None else grad_x * 1.001, *rest)

    model = pk.convert(_cnn(), expand_ratio=4, backend="torch", parametrization="explicit")
    monkeypatch.setattr(torch_ops, "conv_backward", wrong)
    report = pk.verify(model, (torch.randn(2, 3, 8, 8),))
    assert not report.ok and any("differs from the literal algorithm" in p for p in report.problems()), str(report)


def test_a_model_without_pfa_layers_is_not_ok():
    report = pk.verify(nn.Linear(3, 2), (torch.randn(2, 3),))
    assert not report.ok and "no PFA layers" in report.problems()[0]
