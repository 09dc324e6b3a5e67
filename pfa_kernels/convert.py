"""Swap the Linear and Conv1d/2d/3d layers of any model for PFA layers, keeping their weights.

    model = pk.convert(torchvision.models.resnet18(), mode="pfa", exclude=("fc",), expand_ratio=10)
    model, report = pk.convert(model, return_report=True)   # what was converted, what was not, and why

Layers are matched by type (subclasses of nn.Linear / nn.ConvNd included); the new layer reuses the
old layer's weight and bias Parameter objects, so an optimizer built before conversion still holds
them. Linear layers owned by nn.MultiheadAttention are left as they are and reported: the attention
uses their weights directly and never calls their forward, so converting them would change nothing.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .dfa import DirectFeedbackAlignment
from .feedback import check_feedback_options
from .nn import PFA_LAYERS, PFAConv1d, PFAConv2d, PFAConv3d, PFALinear

# mode -> layer keyword arguments it implies; the fixed-feedback rules take no PFA feedback arguments.
MODE_PRESETS = {
    "pfa": {},
    "pfa-o": {"feedback_init": "orthogonal", "expand_ratio": 1},
    "kp": {"feedback_init": "identity", "expand_ratio": 1},
    "fa": {"rule": "fa"}, "usf": {"rule": "usf"}, "frsf": {"rule": "frsf"}, "brsf": {"rule": "brsf"},
    "dfa": {},  # a model wrapper, not per-layer feedback: see dfa.py
}
MODES = tuple(MODE_PRESETS)
_FIXED_RULE_KWARGS = ("backend", "feedback_seed")
_PFA_CLASS_FOR = ((nn.Conv1d, PFAConv1d), (nn.Conv2d, PFAConv2d), (nn.Conv3d, PFAConv3d), (nn.Linear, PFALinear))
_LAYER_KWARGS = ("expand_ratio", "feedback_init", "feedback_density", "parametrization", "strategy", "backend",
                 "feedback_seed")


@dataclass(frozen=True)
class ConversionRecord:
    """One candidate layer: its qualified name, its type, and what convert did with it."""

    name: str
    layer_type: str
    converted: bool
    reason: str


def _pfa_class(module: nn.Module):
    for nn_class, pfa_class in _PFA_CLASS_FOR:
        if isinstance(module, nn_class):
            return pfa_class
    return None


def _build_pfa_layer(module: nn.Module, pfa_class, layer_kwargs: dict) -> nn.Module:
    weight = module.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if pfa_class is PFALinear:
        layer = PFALinear(module.in_features, module.out_features, module.bias is not None, **factory, **layer_kwargs)
    else:
        layer = pfa_class(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, module.groups, module.bias is not None,
                          module.padding_mode, **factory, **layer_kwargs)
    layer.weight = module.weight
    layer.bias = module.bias
    layer.train(module.training)
    return layer


def convert(model: nn.Module, mode: str = "pfa", exclude=(), return_report: bool = False, **layer_kwargs):
    """Replace every Linear/Conv1d/2d/3d in `model` (in place) by its PFA counterpart; return the model.

    mode: "pfa" (the default), "pfa-o" (orthogonal B, r = 1), "kp" (Kolen-Pollack: B = I, r = 1), a
    fixed-feedback baseline "fa", "usf", "frsf", "brsf" (baselines.py; these take only backend and
    feedback_seed), or "dfa" (returns a DirectFeedbackAlignment wrapping the model; dfa.py). Layer
    keyword arguments override a mode's presets. exclude: glob patterns (fnmatch) on qualified module
    names ("fc", "layer4.*") to leave alone. layer_kwargs: the feedback keyword arguments of the PFA
    layers (expand_ratio, feedback_init, feedback_density, parametrization, strategy, backend,
    feedback_seed); with feedback_seed=s, the i-th converted layer gets seed s + i. With
    return_report=True, returns (model, [ConversionRecord, ...]). The model is untouched if the call raises.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    unknown = sorted(set(layer_kwargs) - set(_LAYER_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; convert accepts {_LAYER_KWARGS}")
    if mode == "dfa":
        extra = sorted(set(layer_kwargs) - {"feedback_seed"})
        if extra or exclude or return_report:
            raise TypeError(f"mode='dfa' wraps the whole model and takes only feedback_seed; got {extra or 'exclude'}")
        return DirectFeedbackAlignment(model, layer_kwargs.get("feedback_seed"))
    if "rule" in MODE_PRESETS[mode]:
        ignored = sorted(set(layer_kwargs) - set(_FIXED_RULE_KWARGS))
        if ignored:
            raise TypeError(f"mode={mode!r} is a fixed-feedback rule; it takes only {_FIXED_RULE_KWARGS}, "
                            f"not {ignored}")
    layer_kwargs = {**MODE_PRESETS[mode], **layer_kwargs}
    check_feedback_options(layer_kwargs.get("feedback_init", "random"), layer_kwargs.get("feedback_density", 1.0),
                           layer_kwargs.get("parametrization", "explicit"))
    base_seed = layer_kwargs.pop("feedback_seed", None)

    attention_owned = {
        id(child) for module in model.modules() if isinstance(module, nn.MultiheadAttention)
        for child in module.modules() if child is not module}
    records, replacements = [], []
    for name, module in model.named_modules():
        if isinstance(module, PFA_LAYERS):
            continue
        pfa_class = _pfa_class(module)
        if pfa_class is None:
            continue
        layer_type = type(module).__name__
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            records.append(ConversionRecord(name, layer_type, False, "matches exclude"))
        elif id(module) in attention_owned:
            records.append(ConversionRecord(
                name, layer_type, False, "owned by nn.MultiheadAttention, which uses its weights directly"))
        else:
            seed = None if base_seed is None else base_seed + len(replacements)
            # Build every replacement before swapping any, so an error leaves the model as it was.
            replacements.append((name, _build_pfa_layer(module, pfa_class, {**layer_kwargs, "feedback_seed": seed})))
            records.append(ConversionRecord(name, layer_type, True, f"-> {pfa_class.__name__}"))

    for name, layer in replacements:
        if not name:  # the model itself is a single layer
            model = layer
            continue
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
    return (model, records) if return_report else model
