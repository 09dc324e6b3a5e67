"""train.fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) for the training loop.

A converted model shards as any other: each block (a ResNet's BasicBlock/Bottleneck, a ViT's encoder block, ...) is
one FSDP unit, then the root holds the rest (stem, head). A model without such blocks shards each module that holds
parameters of its own: a PFA layer with its feedback (its Z or R is read by the layer's forward, never by a forward
of the feedback module, so they belong to one unit). B and M are buffers and stay whole on every rank.

Gathering the full state is a collective: every rank calls full_state(), and rank 0 receives it (on the CPU).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Class names of the blocks each unit holds: torchvision's and timm's ResNet (BasicBlock, Bottleneck), ViT
# (EncoderBlock, Block), Swin, ConvNeXt (CNBlock), MobileNet / EfficientNet (InvertedResidual, MBConv), DenseNet.
BLOCK_SUFFIXES = ("Block", "Bottleneck", "InvertedResidual", "MBConv", "DenseLayer")

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one before the root: the outermost blocks, or without blocks the outermost modules
    holding parameters of their own."""
    def outermost(module, chosen, found):
        for child in module.children():
            if chosen(child):
                found.append(child)
            else:
                outermost(child, chosen, found)
        return found

    return outermost(model, _is_block, []) or outermost(model, _owns_parameters, [])


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """fully_shard every unit, then the root, over all ranks on `device` (parameters move there as they shard)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state(model: nn.Module) -> dict:
    """Every rank calls this: rank 0 gets the whole state dict on the CPU, the other ranks {}."""
    return get_model_state_dict(model, options=_GATHER)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every rank calls this: rank 0 gets the whole optimizer state (keyed by parameter names), the others {}."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_model_state(model: nn.Module, state: dict) -> None:
    """A whole state dict (every rank holds it) into the sharded model: each rank keeps its shards."""
    set_model_state_dict(model, state, options=_SCATTER)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=_SCATTER)
