"""pk.convert on torchvision models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import DEVICES
from torch import nn

import pfa_kernels as pk


def _plain_layers(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(m, pk.nn.PFA_LAYERS)}


@pytest.mark.parametrize("name, input_size", [("resnet18", 32), ("resnet50", 32), ("vit_b_16", 224)])
def test_converts_torchvision_models_keeping_weights(name, input_size):
    """Every Linear and Conv becomes a PFA layer holding the same weight Parameter; ViT's attention becomes a
    PFAMultiheadAttention whose in_proj holds nn's in_proj_weight (the report names it "<attention>.in_proj")."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    before = _plain_layers(model)
    weights = {n: m.weight for n, m in before.items()}
    attention = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    weights.update({f"{n}.in_proj": m.in_proj_weight for n, m in attention.items()})
    x = torch.randn(2, 3, input_size, input_size)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model, report = pk.convert(model, expand_ratio=0.25, return_report=True)
    assert {r.name for r in report} == set(weights) and all(r.converted for r in report)
    assert len(report) == {"resnet18": 21, "resnet50": 54, "vit_b_16": 1 + 12 * 4 + 1}[name]
    for record in report:
        layer = model.get_submodule(record.name)
        assert isinstance(layer, pk.nn.PFA_LAYERS)
        assert layer.weight is weights[record.name]
    assert all(isinstance(model.get_submodule(n), pk.PFAMultiheadAttention) for n in attention)
    assert not _plain_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # same forward: the weights were kept
    model.train()
    model(x).sum().backward()
    assert all(model.get_submodule(r.name).feedback.parameter.grad is not None for r in report)


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
    with pytest.raises(ValueError, match=r"already has PFA layers \(conv1, .*pk.reparametrize"):
        pk.convert(model, expand_ratio=3)  # a second conversion with other arguments never silently does nothing
    with pytest.raises(ValueError, match="already has PFA layers"):
        pk.convert(model, mode="fa")


def test_single_layer_and_errors_leave_the_model_untouched():
    assert isinstance(pk.convert(nn.Linear(3, 2)), pk.PFALinear)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3, groups=2))
    with pytest.raises(ValueError, match="sequence"):
        pk.convert(model, strategy="sequence")  # not an order of the grouped conv's (grouped) feedback
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.Conv2d
    with pytest.raises(ValueError, match="mode"):
        pk.convert(model, mode="bp")
    with pytest.raises(TypeError, match="expand_rate"):
        pk.convert(model, expand_rate=2)
    with pytest.raises(ValueError, match="feedback_density"):
        pk.convert(model, feedback_density=2)


# ----------------------------------------------------------------------------- conversion never changes a forward

# The smallest model of every torchvision classification family (the others differ only in widths and depths).
TORCHVISION_FAMILIES = {
    "alexnet": 64, "convnext_tiny": 64, "densenet121": 64, "efficientnet_b0": 64, "efficientnet_v2_s": 64,
    "googlenet": 64, "inception_v3": 96, "maxvit_t": 224, "mnasnet0_5": 64, "mobilenet_v2": 64,
    "mobilenet_v3_small": 64, "regnet_x_400mf": 64, "regnet_y_400mf": 64, "resnet18": 64, "resnext50_32x4d": 64,
    "shufflenet_v2_x0_5": 64, "squeezenet1_0": 64, "swin_t": 64, "swin_v2_t": 64, "vgg11": 64, "vit_b_16": 224,
    "wide_resnet50_2": 64,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_FAMILIES))
def test_conversion_keeps_every_torchvision_family_output(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs).eval()
    size = TORCHVISION_FAMILIES[name]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        # r = 0.25: a depthwise layer's C_mid rounds to one channel per group
        converted, report = pk.convert(model, expand_ratio=0.25, return_report=True)
        actual = converted(x)
    difference = (actual - expected).abs().max().item()
    print(f"{name}: max abs diff {difference:.1e}; {sum(r.converted for r in report)} PFA layers, "
          f"{sum(not r.converted for r in report)} left")
    assert difference == 0.0
    assert report and all(r.converted for r in report), [(r.name, r.reason) for r in report if not r.converted]
    assert not _plain_layers(converted)
    # With a gradient to compute, every PFA layer's forward runs (none is applied through its weight alone).
    calls = {}
    for layer_name, layer in converted.named_modules():
        if isinstance(layer, pk.nn.PFA_LAYERS):
            layer.register_forward_pre_hook(lambda module, args, key=layer_name: calls.update({key: 1}))
    converted(x)
    assert set(calls) == {n for n, m in converted.named_modules() if isinstance(m, pk.nn.PFA_LAYERS)}


class StdConv2d(nn.Conv2d):
    """Weight standardization (timm's StdConv2d)."""

    def forward(self, x):
        weight = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                                training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """TensorFlow-style dynamic "same" padding (timm's Conv2dSame)."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1],
                                 strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0,
                                          self.dilation, self.groups)


class LoRALinear(nn.Linear):
    """A low-rank adapter that adds x A^T B^T to the layer's output."""

    def __init__(self, *args, rank=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_a = nn.Parameter(torch.randn(rank, self.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(self.out_features, rank) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


class CondConv2d(nn.Module):
    """A per-sample mixture of expert kernels (timm's CondConv2d): conv-like, but not an nn.Conv2d."""

    def __init__(self, in_channels, out_channels, experts=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, out_channels * in_channels * 9) * 0.1)
        self.shape = (out_channels, in_channels, 3, 3)

    def forward(self, x, routing=None):
        weight = self.weight.mean(0).reshape(self.shape)
        return torch.nn.functional.conv2d(x, weight, padding=1)


def _subclass_model():
    return nn.Sequential(StdConv2d(3, 6, 3, padding=1), nn.ReLU(), Conv2dSame(6, 6, 3, stride=2), nn.ReLU(),
                         CondConv2d(6, 5), nn.Conv2d(5, 4, 1), nn.Flatten(), LoRALinear(4 * 5 * 5, 7),
                         nn.Linear(7, 3))


def test_subclasses_with_their_own_forward_are_left_and_reported():
    torch.manual_seed(0)
    model = _subclass_model().eval()
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    converted, report = pk.convert(model, return_report=True)
    difference = (converted(x) - expected).abs().max().item()
    print(f"subclasses: max abs diff {difference:.1e}")
    assert difference == 0.0
    reasons = {r.name: r.reason for r in report}
    assert "forward of its own" in reasons["0"] and "forward of its own" in reasons["2"]
    assert "forward of its own" in reasons["7"] and "not an nn.Linear/ConvNd" in reasons["4"]
    assert {r.name for r in report if r.converted} == {"5", "8"}
    assert isinstance(converted[5], pk.PFAConv2d) and isinstance(converted[8], pk.PFALinear)
    with pytest.raises(ValueError, match="strict=True.*0: StdConv2d has a forward of its own"):
        pk.convert(_subclass_model(), strict=True)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm", "old_weight_norm", "hook"])
def test_parametrized_or_hooked_layers_are_left_with_the_reason(norm):
    layer = nn.Linear(4, 3)
    if norm == "old_weight_norm":
        layer = torch.nn.utils.weight_norm(layer)
    elif norm == "hook":
        layer.register_forward_hook(lambda module, args, output: output * 2)
    else:
        layer = getattr(torch.nn.utils.parametrizations, norm)(layer)
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    expected = model(x)
    converted, report = pk.convert(model, return_report=True)
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
    assert not report[0].converted and report[1].converted
    assert ("parametriz" in report[0].reason) if norm in ("weight_norm", "spectral_norm") else \
        ("hooks" in report[0].reason)


def test_a_shared_module_becomes_one_pfa_layer_at_every_place():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    converted, report = pk.convert(model, expand_ratio=2, return_report=True, feedback_seed=3)
    assert converted[0] is converted[2] and isinstance(converted[0], pk.PFALinear)
    assert [r.name for r in report] == ["0", "2"] and all("shared by 2 places" in r.reason for r in report)
    assert converted[0].weight is shared.weight
    report = pk.verify(converted.double(), (torch.randn(3, 5, dtype=torch.float64),))
    assert report.ok and report.layers[0].forward_calls == 2, str(report)


def test_lazy_layers_and_bad_seeds_get_clear_errors():
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"0 \(LazyLinear\) is not initialized yet: run one forward pass"):
        pk.convert(lazy)
    lazy(torch.randn(2, 4))
    assert isinstance(pk.convert(lazy)[0], pk.PFALinear)
    with pytest.raises(ValueError, match="feedback_seed must be in"):
        pk.PFALinear(4, 3, feedback_seed=2**70)
    with pytest.raises(ValueError, match="feedback_seed must be in"):
        pk.convert(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), feedback_seed=2**64 - 1)
    with pytest.raises(TypeError, match=r"fixed-feedback rule: it takes backend and feedback_seed, not the PFA "
                                        r"arguments \['expand_ratio'\]"):
        pk.PFAConv2d(3, 4, 3, rule="fa", expand_ratio=3)


@pytest.mark.parametrize("device", DEVICES)
def test_convert_builds_the_feedback_on_the_device(device):
    """pk.convert(device=...) builds every feedback tensor there and moves the model; the feedback equals the one a
    CPU conversion builds (B and R are drawn on the CPU from the seed; M and Z_0 formed on the device), and the
    gradients equal the literal algorithm's."""
    def build(target):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                              nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
        return pk.convert(model, feedback_seed=4, device=target)

    on_device, on_cpu = build(device), build(None)
    tensors = [*on_device.parameters(), *on_device.buffers()]
    assert tensors and all(t.device.type == device for t in tensors)
    for layer, twin in zip(on_device, on_cpu, strict=True):
        if isinstance(layer, pk.nn.PFA_LAYERS):
            assert layer.parametrization == "projected"
            torch.testing.assert_close(layer.feedback.M.cpu(), twin.feedback.M, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.feedback.Z.cpu(), twin.feedback.Z, rtol=1e-4, atol=1e-5)
            assert torch.equal(layer.feedback.B.cpu(), twin.feedback.B)
    pk.testing.assert_matches_reference(on_device, torch.randn(2, 3, 8, 8, device=device), tolerance=1e-8)


def test_convert_device_errors_name_the_argument():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="device must be a torch.device"):
        pk.convert(model, device="gpu7")
    assert type(model[0]) is nn.Linear  # untouched
