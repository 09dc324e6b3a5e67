"""pk.convert on torchvision models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import pfa_kernels as pk


def _plain_layers(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(m, pk.nn.PFA_LAYERS)}


@pytest.mark.parametrize("name, input_size", [("resnet18", 32), ("resnet50", 32), ("vit_b_16", 224)])
def test_converts_torchvision_models_keeping_weights(name, input_size):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    before = _plain_layers(model)
    weights = {n: m.weight for n, m in before.items()}
    x = torch.randn(2, 3, input_size, input_size)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model, report = pk.convert(model, expand_ratio=0.25, return_report=True)
    converted = [r for r in report if r.converted]
    skipped = [r for r in report if not r.converted]
    assert {r.name for r in report} == set(before)
    for record in converted:
        layer = model.get_submodule(record.name)
        assert isinstance(layer, pk.nn.PFA_LAYERS)
        assert layer.weight is weights[record.name]
    if name == "vit_b_16":
        assert skipped and all("MultiheadAttention" in r.reason for r in skipped)
        assert any(r.name.endswith("mlp.0") for r in converted) and any(r.name == "conv_proj" for r in converted)
    else:
        assert not skipped
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # same forward: the weights were kept
    model.train()
    model(x).sum().backward()
    assert all(model.get_submodule(r.name).feedback.R.grad is not None for r in converted)


def test_exclude_seed_and_kwargs():
    model = torchvision.models.resnet18(num_classes=10)
    model, report = pk.convert(model, exclude=("fc", "layer4.*"), expand_ratio=2, feedback_init="orthogonal",
                               strategy="product", feedback_seed=100, return_report=True)
    assert isinstance(model.fc, nn.Linear) and not isinstance(model.fc, pk.PFALinear)
    assert not isinstance(model.layer4[0].conv1, pk.PFAConv2d)
    assert isinstance(model.layer3[1].conv2, pk.PFAConv2d)
    assert model.conv1.feedback.seed == 100 and model.conv1.feedback.feedback_init == "orthogonal"
    assert model.conv1.strategy == "product" and model.conv1.feedback.mid_channels == 128
    assert sum(r.reason == "matches exclude" for r in report) == 1 + 5  # fc and layer4's five convs
    again, second = pk.convert(model, return_report=True)  # PFA layers are never converted twice
    assert again is model and all(r.name.startswith(("fc", "layer4")) for r in second)


def test_single_layer_and_errors_leave_the_model_untouched():
    assert isinstance(pk.convert(nn.Linear(3, 2)), pk.PFALinear)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups"):
        pk.convert(model, expand_ratio=0.75)  # C_mid = 3 for the grouped conv: not divisible by 2
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.Conv2d
    with pytest.raises(ValueError, match="mode"):
        pk.convert(model, mode="bp")
    with pytest.raises(TypeError, match="expand_rate"):
        pk.convert(model, expand_rate=2)
    with pytest.raises(ValueError, match="feedback_density"):
        pk.convert(model, feedback_density=2)
