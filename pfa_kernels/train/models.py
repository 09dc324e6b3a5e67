"""Models of the paper's recipes: the digits CNN, an MLP (MNIST 2x512), ResNet-20 with option-A shortcuts
(CIFAR-10; He et al. 2016, section 4.2) and torchvision's ResNet-18/50. Built with nn layers; the rule is
applied afterwards by pk.convert."""

from __future__ import annotations

import torch.nn.functional as F
import torchvision
from torch import nn

from ..demo import small_cnn


def mlp(in_features: int, hidden: int, depth: int, num_classes: int) -> nn.Sequential:
    layers, width = [nn.Flatten()], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class _OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the new channels (option A)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = (_OptionAShortcut(channels - in_channels) if stride != 1 or in_channels != channels
                         else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet20(num_classes: int = 10) -> nn.Sequential:
    """ResNet-20 for 32x32 inputs: 3 stages of 3 basic blocks (16, 32, 64 channels), option-A shortcuts."""
    layers, in_channels = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for channels, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(3):
            layers.append(_BasicBlock(in_channels, channels, stride if block == 0 else 1))
            in_channels = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def build(config: dict, input_shape: tuple[int, ...]) -> nn.Module:
    model = config["model"]
    name, classes = model["name"], model["num_classes"]
    if name == "digits_cnn":
        return small_cnn()
    if name == "mlp":
        features = 1
        for size in input_shape:
            features *= size
        return mlp(features, model["hidden"], model["depth"], classes)
    if name == "resnet20":
        return resnet20(classes)
    if name in ("resnet18", "resnet50"):
        return getattr(torchvision.models, name)(num_classes=classes)
    raise ValueError(f"model.name must be digits_cnn, mlp, resnet20, resnet18 or resnet50; got {name!r}")
