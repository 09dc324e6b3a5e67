"""pk.verify and pk.testing.assert_matches_reference: every PFA layer runs, learns, and equals the literal algorithm
on the user's own architecture; layers that never run (torchvision's Swin attention) and wrong kernels are caught."""

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


def test_layers_that_never_run_are_reported():
    torch.manual_seed(0)
    model = pk.convert(torchvision.models.swin_t(num_classes=10), expand_ratio=0.25)
    report = pk.verify(model, (torch.randn(1, 3, 32, 32),))
    silent = {layer.name for layer in report.layers if layer.forward_calls == 0}
    assert len(silent) == 24 and all(name.endswith(("attn.qkv", "attn.proj")) for name in silent)
    assert {layer.name for layer in report.layers if layer.feedback_has_grad is False} == silent
    assert not report.ok and len(report.problems()) == 48
    with pytest.raises(AssertionError, match="attn.qkv: its forward never ran"):
        pk.testing.assert_matches_reference(model, (torch.randn(1, 3, 32, 32),))


def test_a_wrong_kernel_is_caught(monkeypatch):
    """A backward whose dL/dx is 0.1% off (as a faulty kernel's would be) fails the check."""
    real = torch_ops.conv_backward

    def wrong(*args, **kwargs):
        grad_x, *rest = real(*args, **kwargs)
        return (None if grad_x is None else grad_x * 1.001, *rest)

    model = pk.convert(_cnn(), expand_ratio=4, backend="torch")
    monkeypatch.setattr(torch_ops, "conv_backward", wrong)
    report = pk.verify(model, (torch.randn(2, 3, 8, 8),))
    assert not report.ok and any("differs from the literal algorithm" in p for p in report.problems()), str(report)


def test_a_model_without_pfa_layers_is_not_ok():
    report = pk.verify(nn.Linear(3, 2), (torch.randn(2, 3),))
    assert not report.ok and "no PFA layers" in report.problems()[0]
