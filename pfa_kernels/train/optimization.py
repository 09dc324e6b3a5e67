"""Optimizer, learning-rate schedule and weight averaging of the training loop.

    parameter_groups(model, no_weight_decay_norm_bias)   one group, or (decayed, not decayed: norm layers and biases)
    optimizer(model, optim)                              SGD / Adam / AdamW from the optim section
    scheduler(optimizer, optim, epochs, steps_per_epoch) step (per epoch) or cosine with linear warmup (per step)
    ema_model / update_ema                               exponential moving average of weights and buffers
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import chain

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .values import ConfigError

# Modules whose parameters are normalization scales and shifts (timm's norm layers subclass these).
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
# The param-group key marking the group that optim.no_weight_decay_norm_bias exempts from the weight-decay schedule.
NO_DECAY = "no_weight_decay"


def no_decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of normalization layers and every bias (a parameter named bias or <something>_bias, as
    nn.MultiheadAttention's in_proj_bias), in model.parameters() order. A PFA layer's feedback parameter (R or Z) is
    decayed with the weights (weight decay is what aligns B R with W)."""
    chosen = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or name == "bias" or name.endswith("_bias"):
                chosen.add(id(parameter))
    return [p for p in model.parameters() if id(p) in chosen]


def parameter_groups(model: nn.Module, no_weight_decay_norm_bias: bool) -> list[dict]:
    if not no_weight_decay_norm_bias:
        return [{"params": list(model.parameters())}]
    exempt = {id(p) for p in no_decay_parameters(model)}
    return [{"params": [p for p in model.parameters() if id(p) not in exempt]},
            {"params": [p for p in model.parameters() if id(p) in exempt], "weight_decay": 0.0, NO_DECAY: True}]


def optimizer(model: nn.Module, optim: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim["no_weight_decay_norm_bias"])
    if optim["name"] == "sgd":
        return torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"],
                               weight_decay=optim["weight_decay"])
    if optim["name"] in ("adam", "adamw"):
        cls = torch.optim.Adam if optim["name"] == "adam" else torch.optim.AdamW
        return cls(groups, lr=optim["lr"], weight_decay=optim["weight_decay"])
    raise ValueError(f"optim.name must be sgd, adam or adamw; got {optim['name']!r}")


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """The weight-decay schedule's value on every group but the exempt one."""
    for group in optimizer.param_groups:
        if not group.get(NO_DECAY):
            group["weight_decay"] = weight_decay


def cosine_warmup_factor(step: int, total_steps: int, warmup_steps: int, min_factor: float) -> float:
    """lr / optim.lr for the step-th optimizer step (0-based): (step + 1) / warmup_steps during the warmup, then a
    half cosine from 1 down to min_factor (= optim.min_lr / optim.lr), reached at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(optim: dict, steps_per_epoch: int) -> int:
    return round(optim["warmup_epochs"] * steps_per_epoch)


def check(optim: dict, epochs: int, steps_per_epoch: int) -> None:
    """The schedule keys that only make sense together: ConfigError naming them."""
    if optim["schedule"] == "step":
        for key, default in (("warmup_epochs", 0.0), ("min_lr", 0.0)):
            if optim[key] != default:
                raise ConfigError(f"optim.{key}={optim[key]} applies to optim.schedule=cosine (the step schedule "
                                  f"uses optim.lr_milestones and optim.lr_gamma)")
        return
    if optim["lr_milestones"]:
        raise ConfigError(f"optim.lr_milestones={optim['lr_milestones']} applies to optim.schedule=step, not cosine")
    if optim["min_lr"] > optim["lr"]:
        raise ConfigError(f"optim.min_lr={optim['min_lr']} must be at most optim.lr={optim['lr']}")
    if warmup_steps(optim, steps_per_epoch) >= epochs * steps_per_epoch:
        raise ConfigError(f"optim.warmup_epochs={optim['warmup_epochs']} leaves no step of the cosine schedule in "
                          f"train.epochs={epochs}")


def scheduler(optimizer: torch.optim.Optimizer, optim: dict, epochs: int, steps_per_epoch: int):
    """step: MultiStepLR, stepped once per epoch. cosine: LambdaLR of cosine_warmup_factor, stepped once per optimizer
    step. The factor is a closure over this run's config (LambdaLR saves no closure in its state dict), so a resumed run
    follows its own optim.lr, optim.min_lr, optim.warmup_epochs and train.epochs."""
    if optim["schedule"] == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, optim["lr_milestones"], optim["lr_gamma"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(optim, epochs, steps_per_epoch))


def cosine_factor(optim: dict, epochs: int, steps_per_epoch: int):
    total, warmup = epochs * steps_per_epoch, warmup_steps(optim, steps_per_epoch)
    min_factor = optim["min_lr"] / optim["lr"] if optim["lr"] > 0 else 0.0

    def factor(step):
        return cosine_warmup_factor(step, total, warmup, min_factor)

    return factor


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of `model` whose parameters and floating-point buffers (BatchNorm's running statistics) follow
    ema = decay * ema + (1 - decay) * model after every update (the first update copies the model)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module) -> None:
    """ema.update_parameters(model), with one foreach call per kind of tensor: under FSDP the parameters are DTensors
    and the buffers plain tensors, which one call cannot mix. Integer buffers (BatchNorm's batch count) take the
    model's value."""
    pairs = list(zip(chain(ema.module.parameters(), ema.module.buffers()), chain(model.parameters(), model.buffers()),
                     strict=True))
    if ema.n_averaged == 0:
        for averaged, current in pairs:
            averaged.detach().copy_(current.detach())
    else:
        groups = defaultdict(lambda: ([], []))
        for averaged, current in pairs:
            if averaged.is_floating_point():
                group = groups[(type(averaged), averaged.device, averaged.dtype)]
                group[0].append(averaged.detach())
                group[1].append(current.detach())
            else:
                averaged.detach().copy_(current.detach())
        for averaged, current in groups.values():
            ema.multi_avg_fn(averaged, current, ema.n_averaged)
    ema.n_averaged += 1
