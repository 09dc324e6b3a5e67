"""A trained PFA model back to plain nn layers, for deployment (export, TorchScript, ONNX) or a BP checkpoint.

    model, report = pk.unconvert(model, return_report=True)   # nn.Linear / nn.ConvNd with the trained W and b
    state = pk.bp_state_dict(pfa_model.state_dict())          # loads into the torchvision model, strict=True

The forward of a PFA layer is its nn counterpart's (nn.py), so the unconverted model computes exactly what the
PFA model computed; only the feedback (B, R or Z, M, masks: what trains dL/dx) is dropped. Attention modules
convert replaced go back to their original class: PFAMultiheadAttention to nn.MultiheadAttention, the Swin adapters
to torchvision's ShiftedWindowAttention(V2).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .attention import PFAMultiheadAttention
from .convert import attention_adapters, layer_arguments, layer_classes, replace_modules
from .dfa import DirectFeedbackAlignment
from .nn import PFA_LAYERS

# A PFA layer's feedback state sits under "<layer>.feedback.<name>", with the names of feedback.py and baselines.py
# (a user's own module called "feedback" with a "weight" is not matched).
_FEEDBACK_KEY = re.compile(r"(?:^|\.)feedback\.(?:B|R|Z|M|R_null|B_mask|R_mask|F|_extra_state)$")


@dataclass(frozen=True)
class UnconversionRecord:
    name: str                # qualified module name ("" for the model itself)
    layer: str               # the PFA layer's class
    replaced_by: str         # the nn class now in its place
    removed: tuple[str, ...]  # the feedback state it carried (state-dict keys, relative to the layer)


def _nn_layer(layer: nn.Module) -> nn.Module:
    """The nn counterpart of a PFA layer, built on the meta device (no initialization) and holding the layer's own
    weight and bias Parameters, training flag and hooks."""
    nn_class, _ = layer_classes(layer)
    with torch.device("meta"):
        plain = nn_class(*layer_arguments(layer))
    plain.weight = layer.weight
    plain.bias = layer.bias
    plain.train(layer.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
        getattr(plain, hooks).update(getattr(layer, hooks))
    return plain


def unconvert(model: nn.Module, return_report: bool = False):
    """Replace every PFA layer of `model` (in place) by its nn counterpart holding the same weight and bias
    Parameters (the optimizer's references stay valid), and every attention module pk.convert replaced by its
    original class (PFAMultiheadAttention by nn.MultiheadAttention, with one record listing its projections'
    feedback; a Swin adapter by torchvision's class, its qkv and proj recorded as layers); return the model, or
    (model, [UnconversionRecord, ...]).

    Outputs are unchanged: a PFA layer's forward is nn's. A layer used at several places becomes one nn layer at
    all of them. A pk.convert(mode="dfa") wrapper gives back the model it wraps. The model is untouched if the
    call raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(model, DirectFeedbackAlignment):
        raise TypeError("a DirectFeedbackAlignment wrapper (pk.convert(mode='dfa')) holds nn layers already: use "
                        "its .model, and remove the wrapper's hooks by building a fresh model from its state dict")
    adapters = tuple(attention_adapters().values())
    places: dict[int, list[str]] = {}
    layers: dict[int, nn.Module] = {}
    inside: set[int] = set()  # PFA layers of a PFAMultiheadAttention: they go with it
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside:
            continue
        if isinstance(module, adapters):
            if isinstance(module, PFAMultiheadAttention):
                inside.update(id(layer) for layer in module.pfa_layers())
        elif not isinstance(module, PFA_LAYERS):
            continue
        places.setdefault(id(module), []).append(name)
        layers[id(module)] = module
    # All built before any swap.
    replacements = {key: layer.to_module() if isinstance(layer, adapters) else _nn_layer(layer)
                    for key, layer in layers.items()}
    records = []
    for key, names in places.items():
        layer, plain = layers[key], replacements[key]
        owned = layer.named_children() if isinstance(layer, PFAMultiheadAttention) else [("", layer)]
        removed = tuple(f"{child}.feedback.{k}".lstrip(".") for child, sub in owned if isinstance(sub, PFA_LAYERS)
                        for k in sub.feedback.state_dict())
        records += [UnconversionRecord(name, type(layer).__name__, type(plain).__name__, removed) for name in names]
    model = replace_modules(model, places, replacements)
    return (model, records) if return_report else model


def bp_state_dict(state_dict: dict) -> OrderedDict:
    """`state_dict` without the PFA layers' feedback entries ("<layer>.feedback.*"): what the unconverted model (or
    the original torchvision/timm model) loads with strict=True. The tensors are shared, not copied."""
    return OrderedDict((key, value) for key, value in state_dict.items() if not _FEEDBACK_KEY.search(key))
