"""Models of the paper's recipes: the digits CNN, an MLP (MNIST 2x512), ResNet-20 with option-A shortcuts
(CIFAR-10; He et al. 2016, section 4.2) and torchvision's ResNet-18/50; and any torchvision classification model
(model.name=torchvision.<name>) or timm model (timm.<name>, when timm is installed). Built untrained with nn layers;
the rule is applied afterwards by pk.convert."""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..demo import small_cnn
from .values import ConfigError

BUILTIN = ("digits_cnn", "mlp", "resnet20", "resnet18", "resnet50")
# Constructor arguments that make these torchvision models return plain logits in training (no auxiliary heads).
_TORCHVISION_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                         "inception_v3": {"aux_logits": False, "init_weights": True}}


class MissingDependencyError(ConfigError, ImportError):
    """A config value that needs a package that is not installed (an ImportError and a ConfigError)."""


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


def torchvision_names() -> list[str]:
    """torchvision's classification models (detection, segmentation, video, ... live in submodules)."""
    return torchvision.models.list_models(module=torchvision.models)


def _unknown(name: str, library: str, names: list[str], listing: str) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(f'{library}.{c}' for c in close)}" if close else ""
    return ConfigError(f"model.name={library + '.' + name!r}: {library} has no classification model {name!r}{hint} "
                       f"(every name: {listing})")


def _torchvision_model(name: str, classes: int, kwargs: dict) -> nn.Module:
    names = torchvision_names()
    if name not in names:
        raise _unknown(name, "torchvision", names, "torchvision.models.list_models(module=torchvision.models)")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=classes,
                                            **{**_TORCHVISION_DEFAULTS.get(name, {}), **kwargs})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.name='torchvision.{name}' cannot be built with model.num_classes={classes} and "
                          f"model.kwargs={kwargs}: {error}") from error


def _timm_model(name: str, classes: int, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise MissingDependencyError(f"model.name='timm.{name}' needs the timm package, which is not installed: "
                                     f"pip install timm") from error
    if not timm.is_model(name):
        raise _unknown(name, "timm", timm.list_models(), "timm.list_models()")
    try:
        return timm.create_model(name, pretrained=False, num_classes=classes, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.name='timm.{name}' cannot be built with model.num_classes={classes} and "
                          f"model.kwargs={kwargs}: {error}") from error


def check_input(model: nn.Module, config: dict, example: torch.Tensor) -> None:
    """One forward of a training example (eval mode, no gradient, the RNG state kept): a model that cannot take the
    data's images is a ConfigError naming the keys to change, before anything else runs."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(example[None])
    except (RuntimeError, ValueError, AssertionError, IndexError) as error:
        data, reason = config["data"], (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"model.name={config['model']['name']!r} cannot take the images of "
                          f"data.dataset={data['dataset']!r}, of shape {tuple(example.shape)} "
                          f"(data.channels={data['channels']}, data.resize={data['resize']}): "
                          f"{type(error).__name__}: {reason}. Set data.channels=3 for a model built for RGB images, "
                          f"data.resize for one that needs larger ones") from error
    finally:
        model.train(was_training)


def build(config: dict, input_shape: tuple[int, ...]) -> nn.Module:
    model = config["model"]
    name, classes, kwargs = model["name"], model["num_classes"], model["kwargs"]
    if kwargs and name in BUILTIN:
        raise ConfigError(f"model.kwargs={kwargs} applies to torchvision.<name> and timm.<name> models, not "
                          f"model.name={name!r}")
    if name.startswith("torchvision."):
        return _torchvision_model(name.removeprefix("torchvision."), classes, kwargs)
    if name.startswith("timm."):
        return _timm_model(name.removeprefix("timm."), classes, kwargs)
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
    raise ValueError(f"model.name must be one of {', '.join(BUILTIN)}, torchvision.<name> or timm.<name>; "
                     f"got {name!r}")
