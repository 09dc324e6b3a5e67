"""pk.unconvert and pk.bp_state_dict: a trained PFA model back to plain nn layers, for deployment."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import pfa_kernels as pk


def _trained(model: nn.Module, **convert_kwargs) -> nn.Module:
    """`model` converted and trained one SGD step (so W, b and the feedback differ from their initial values)."""
    torch.manual_seed(0)
    model = pk.convert(model, **convert_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(4, 3, 32, 32)
    nn.functional.cross_entropy(model(images), torch.randint(0, 10, (4,))).backward()
    optimizer.step()
    return model.eval()


def _small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
def test_unconverted_resnet_computes_the_same_and_loads_into_torchvision(parametrization):
    model = _trained(torchvision.models.resnet18(num_classes=10), parametrization=parametrization)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    weights = {name: p for name, p in model.named_parameters() if "feedback" not in name}
    model, report = pk.unconvert(model, return_report=True)
    assert not any(isinstance(m, pk.nn.PFA_LAYERS) for m in model.modules())
    assert len(report) == 21 and all(r.removed for r in report)
    assert {r.replaced_by for r in report} == {"Conv2d", "Linear"}
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    for name, parameter in model.named_parameters():
        assert parameter is weights[name]  # the same Parameters: an optimizer's references stay valid
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_bp_state_dict_loads_into_the_plain_model_strictly():
    model = _trained(torchvision.models.resnet18(num_classes=10), parametrization="projected")
    state = model.state_dict()
    assert any(".feedback." in key for key in state)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(pk.bp_state_dict(state), strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bp_state_dict_keeps_a_users_own_feedback_module():
    state = {"feedback.weight": torch.ones(2), "head.feedback.R": torch.ones(2), "head.feedback.B": torch.ones(2),
             "head.weight": torch.ones(2)}
    assert list(pk.bp_state_dict(state)) == ["feedback.weight", "head.weight"]


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_exported_and_scripted_graphs_hold_no_pfa_op(name):
    """torch.export of the unconverted model has no pfa_kernels op (the converted one has), and TorchScript
    compiles it. (ONNX: torch.onnx.export(model, (images,), "model.onnx", dynamo=True) on this exported program;
    onnx is not a dependency.)"""
    model = torchvision.models.resnet18(num_classes=10) if name == "resnet18" else _small_vit()
    model = _trained(model, exclude=() if name == "resnet18" else ("heads.*",))
    images = torch.randn(2, 3, 32, 32)
    converted_graph = torch.export.export(model, (images,)).graph
    assert any("pfa_kernels" in str(node.target) for node in converted_graph.nodes)
    with torch.no_grad():
        expected = model(images)
    model = pk.unconvert(model)
    exported = torch.export.export(model, (images,))
    assert not any("pfa_kernels" in str(node.target) for node in exported.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(images), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(model)(images), expected, rtol=0, atol=1e-6)


def test_shared_layers_and_a_single_layer_model():
    shared = pk.PFALinear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    model, report = pk.unconvert(model, return_report=True)
    assert model[0] is model[2] and type(model[0]) is nn.Linear
    assert [r.name for r in report] == ["0", "2"]
    layer = pk.PFAConv2d(3, 5, 3, padding=1, padding_mode="reflect", rule="fa")
    x = torch.randn(1, 3, 6, 6)
    plain = pk.unconvert(layer)
    assert type(plain) is nn.Conv2d and plain.padding_mode == "reflect"
    with torch.no_grad():
        assert torch.equal(plain(x), layer(x))


def test_bad_input_raises_and_changes_nothing():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pk.unconvert("resnet18")
    wrapped = pk.convert(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), mode="dfa")
    with pytest.raises(TypeError, match="DirectFeedbackAlignment"):
        pk.unconvert(wrapped)
