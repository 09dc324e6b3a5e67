"""Swap the Linear and Conv1d/2d/3d layers of any model for PFA layers, keeping their weights.

    model = pk.convert(torchvision.models.resnet18(), mode="pfa", exclude=("fc",), expand_ratio=10)
    model, report = pk.convert(model, return_report=True)   # what was converted, what was not, and why

Layers are matched by type (nn.Linear / nn.ConvNd and their subclasses); the new layer reuses the old
layer's weight and bias Parameter objects, so an optimizer built before conversion still holds them.
Conversion never changes what a model computes: a layer is left as it is, and reported with the reason (or,
with strict=True, convert raises), when its class has a forward of its own (weight standardization, dynamic
"same" padding, adapters), or its weight is parametrized or hooked (weight_norm, spectral_norm). A module shared at
several places becomes one PFA layer at all of them. Other Linear/Conv-like modules (a weight of two or more dims, a
class name with "Conv" or "Linear") are reported as left alone. pk.verify(model, inputs) checks the result on real
inputs.

Attention modules that apply their projections through the weights instead of calling them (ATTENTION_ADAPTERS):
nn.MultiheadAttention becomes a PFAMultiheadAttention (attention.py) with PFA projections, and torchvision's Swin
attention an adapter calling its qkv and proj modules (adapters.py), which convert then converts as any Linear.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

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
                 "feedback_seed", "feedback_groups")

# Attention modules whose forward applies their projections through the weights (F.linear(x, self.qkv.weight)), so
# that PFA layers in their place would never run: (module that defines the original class, adapter class). An adapter
# names the class it replaces (`original`) and its projections used through their weights (`weight_users`); it has
# refusal(module), from_module(module) and to_module(). PFAMultiheadAttention builds its own PFA projections
# (from_module takes the layer keyword arguments); the Swin adapters call their qkv and proj modules, which convert
# converts as any Linear. A row is read only once its original's module is imported: no model holds the class before.
ATTENTION_ADAPTERS = (
    ("torch.nn", "pfa_kernels.attention.PFAMultiheadAttention"),
    ("torchvision.models.swin_transformer", "pfa_kernels.adapters.PFAShiftedWindowAttention"),
    ("torchvision.models.swin_transformer", "pfa_kernels.adapters.PFAShiftedWindowAttentionV2"),
)


@dataclass(frozen=True)
class ConversionRecord:
    """One candidate layer: its qualified name, its type, and what convert did with it."""

    name: str
    layer_type: str
    converted: bool
    reason: str


def layer_classes(module: nn.Module):
    """(nn class, PFA class) a Linear/ConvNd module (or PFA layer) belongs to, or (None, None)."""
    for nn_class, pfa_class in _PFA_CLASS_FOR:
        if isinstance(module, nn_class):
            return nn_class, pfa_class
    return None, None


_LAYER_LIKE_NAME = re.compile("conv|linear", re.IGNORECASE)


def _refusal(module: nn.Module, nn_class) -> str | None:
    """Why converting this Linear/Conv module would change what the model computes (None: it would not)."""
    if parametrize.is_parametrized(module):
        return ("its weight is parametrized (torch.nn.utils.parametrize: weight_norm, spectral_norm, ...); a PFA "
                "layer would drop the parametrization")
    own_forward = type(module).forward is not nn_class.forward or (
        hasattr(nn_class, "_conv_forward") and type(module)._conv_forward is not nn_class._conv_forward)
    if own_forward:
        return (f"{type(module).__name__} has a forward of its own (not nn.{nn_class.__name__}'s); a PFA layer would "
                f"compute nn.{nn_class.__name__}'s instead")
    if module._forward_pre_hooks or module._forward_hooks:
        return "it has forward hooks (torch.nn.utils.weight_norm, spectral_norm, ...), which a new layer would lose"
    if not isinstance(module.weight, nn.Parameter):
        return f"its weight is a {type(module.weight).__name__}, not a Parameter (computed by a hook?)"
    return None


def attention_adapters() -> dict[type, type]:
    """{original attention class: its adapter} for the rows of ATTENTION_ADAPTERS whose module is imported."""
    table = {}
    for original_module, adapter_path in ATTENTION_ADAPTERS:
        if original_module in sys.modules:
            module_name, _, class_name = adapter_path.rpartition(".")
            adapter = getattr(importlib.import_module(module_name), class_name)
            table[adapter.original] = adapter
    return table


def _adapter_for(module: nn.Module, adapters: dict[type, type]):
    """The adapter of `module`'s class, else of a class it derives from (whose refusal then explains), else None."""
    adapter = adapters.get(type(module))
    if adapter is None:
        adapter = next((a for original, a in adapters.items() if isinstance(module, original)), None)
    return adapter


def _layer_like(module: nn.Module) -> bool:
    """A module that is not an nn.Linear/ConvNd but computes like one (timm's CondConv2d, ...): listed as left."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2 and bool(_LAYER_LIKE_NAME.search(type(module).__name__))


def layer_arguments(module: nn.Module) -> tuple:
    """The positional constructor arguments of an nn.Linear / nn.ConvNd (or PFA) layer that rebuild its geometry."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    return (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode)


def replace_modules(model: nn.Module, places: dict[int, list[str]], replacements: dict[int, nn.Module]) -> nn.Module:
    """Put replacements[key] at every qualified name in places[key]; returns the model (the replacement itself when
    the model is the one layer, name "")."""
    for key, layer in replacements.items():
        for name in places[key]:
            if not name:
                model = layer
                continue
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, layer)
    return model


def _build_pfa_layer(module: nn.Module, pfa_class, layer_kwargs: dict, device=None) -> nn.Module:
    """The PFA layer holding `module`'s Parameters, its feedback built on `device` (default: the weight's)."""
    weight = module.weight
    layer = pfa_class(*layer_arguments(module), device=device or weight.device, dtype=weight.dtype, **layer_kwargs)
    layer.weight = module.weight
    layer.bias = module.bias
    layer.train(module.training)
    return layer


def convert(model: nn.Module, mode: str = "pfa", exclude=(), return_report: bool = False, strict: bool = False,
            device=None, **layer_kwargs):
    """Replace every Linear/Conv1d/2d/3d in `model` (in place) by its PFA counterpart; return the model.

    Attention modules that use their projections' weights without calling them are replaced too, so that those
    projections train with PFA (ATTENTION_ADAPTERS): nn.MultiheadAttention by a PFAMultiheadAttention holding its
    Parameters (converted as a whole: left when its name or its out_proj's matches exclude), torchvision's
    ShiftedWindowAttention(V2) by an adapter that calls its qkv and proj modules, which are then converted as any
    Linear. The report names a PFAMultiheadAttention's projections "<attention>.in_proj" (or q_proj, k_proj,
    v_proj) and "<attention>.out_proj".

    mode: "pfa" (the default), "pfa-o" (orthogonal B, r = 1), "kp" (Kolen-Pollack: B = I, r = 1), a
    fixed-feedback baseline "fa", "usf", "frsf", "brsf" (baselines.py; these take only backend and
    feedback_seed), or "dfa" (returns a DirectFeedbackAlignment wrapping the model; dfa.py). Layer
    keyword arguments override a mode's presets. exclude: glob patterns (fnmatch) on qualified module
    names ("fc", "layer4.*") to leave alone. layer_kwargs: the feedback keyword arguments of the PFA
    layers (expand_ratio, feedback_init, feedback_density, parametrization, strategy, backend,
    feedback_seed); with feedback_seed=s, the i-th converted layer gets seed s + i. strict=True raises
    instead of leaving a layer whose conversion would change the model's forward. With
    return_report=True, returns (model, [ConversionRecord, ...]): every Linear/Conv-like module, converted or
    not, with the reason. A model that already has PFA layers is refused (build a fresh model, or switch
    parametrization with pk.reparametrize). The model is untouched if the call raises.

    device: where the feedback is built and the model ends up (model.to(device) after the conversion; default:
    each layer's own device, so a model already on a GPU has its feedback built there). B and R are drawn on the
    CPU from each layer's seed (the same values on every device); a projected layer's M = B B^T and Z_0 are
    formed on the device, and checked there against B R before they are used (projection.check_projection).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must be a torch.device or a device string such as 'cuda:0'; got {device!r} "
                             f"({error})") from None
    unknown = sorted(set(layer_kwargs) - set(_LAYER_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; convert accepts {_LAYER_KWARGS}")
    already = [name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, PFA_LAYERS)
               and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)]
    if already:
        raise ValueError(
            f"the model already has PFA layers ({', '.join(already[:5])}{', ...' if len(already) > 5 else ''}): "
            f"convert a fresh model, or switch their parametrization with pk.reparametrize(model, ...)")
    if mode == "dfa":
        extra = sorted(set(layer_kwargs) - {"feedback_seed"})
        if extra or exclude or return_report:
            raise TypeError(f"mode='dfa' wraps the whole model and takes only feedback_seed; got {extra or 'exclude'}")
        return DirectFeedbackAlignment(model if device is None else model.to(device), layer_kwargs.get("feedback_seed"))
    if "rule" in MODE_PRESETS[mode]:
        ignored = sorted(set(layer_kwargs) - set(_FIXED_RULE_KWARGS))
        if ignored:
            raise TypeError(f"mode={mode!r} is a fixed-feedback rule; it takes only {_FIXED_RULE_KWARGS}, "
                            f"not {ignored}")
    layer_kwargs = {**MODE_PRESETS[mode], **layer_kwargs}
    check_feedback_options(layer_kwargs.get("feedback_init", "random"), layer_kwargs.get("feedback_density", 1.0),
                           layer_kwargs.get("parametrization", "auto"),
                           layer_kwargs.get("feedback_groups", "grouped"))
    base_seed = layer_kwargs.pop("feedback_seed", None)

    adapters = attention_adapters()
    # Every place a module stands (a shared module is at several): one PFA layer for all of them.
    places: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    records, replacements, refused = [], {}, []
    left_inside: dict[int, str] = {}  # a projection of an attention module left as it is -> why it stays BP
    called_by: dict[int, str] = {}    # a projection an adapter calls -> the adapter's class
    built_inside: set[int] = set()    # projections PFAMultiheadAttention has rebuilt (recorded with it)
    layer_count = 0                   # PFA layers built so far: the next one's seed is base_seed + layer_count
    for key, names in places.items():
        module = modules[key]
        if isinstance(module, PFA_LAYERS) or key in built_inside:
            continue
        layer_type = type(module).__name__
        adapter = _adapter_for(module, adapters)
        if adapter is not None:
            projections = [getattr(module, child) for child in adapter.weight_users]
            # nn.MultiheadAttention converts as a whole; a Swin adapter's projections follow exclude one by one.
            own = names + ([f"{name}.{child}".lstrip(".") for name in names for child in adapter.weight_users]
                           if isinstance(module, nn.MultiheadAttention) else [])
            excluded = [n for n in own if any(fnmatch.fnmatchcase(n, pattern) for pattern in exclude)]
            reason = f"matches exclude at {excluded}" if excluded else adapter.refusal(module)
            if reason is not None:
                if not excluded:
                    refused.append(f"{names[0]}: {reason}")
                why = (f"{reason}; {adapter.original.__name__} applies its projections through their weights, so "
                       f"they train with backpropagation")
                if isinstance(module, nn.MultiheadAttention):  # its in_proj_weight is a projection too
                    records += [ConversionRecord(name, layer_type, False, why) for name in names]
                left_inside.update((id(p), why) for p in projections)
                continue
            seed = None if base_seed is None else base_seed + layer_count
            if isinstance(module, nn.MultiheadAttention):
                replacement = adapter.from_module(module, **layer_kwargs, feedback_seed=seed, device=device)
                built_inside.update(id(p) for p in projections)
                layers = [(child, layer) for child, layer in replacement.named_children()
                          if isinstance(layer, PFA_LAYERS)]
                layer_count += len(layers)
                shared = f", one module shared by {len(names)} places" if len(names) > 1 else ""
                records += [ConversionRecord(f"{name}.{child}".lstrip("."), layer_type, True,
                                             f"-> {type(layer).__name__} in {type(replacement).__name__}{shared}")
                            for name in names for child, layer in layers]
            else:
                replacement = adapter.from_module(module)
                called_by.update((id(p), type(replacement).__name__) for p in projections)
            replacements[key] = replacement
            continue
        nn_class, pfa_class = layer_classes(module)
        if nn_class is None:
            if _layer_like(module):
                records += [ConversionRecord(name, layer_type, False, "not an nn.Linear/ConvNd subclass: trains with "
                                             "backpropagation") for name in names]
            continue
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"{names[0]} ({layer_type}) is not initialized yet: run one forward pass of the model "
                             f"before pk.convert, so its weight has a shape")
        excluded = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in exclude)]
        refusal = _refusal(module, nn_class)
        if excluded:
            reason = "matches exclude" if len(excluded) == len(names) else \
                f"matches exclude at {excluded} (a shared module is converted everywhere or nowhere)"
            records += [ConversionRecord(name, layer_type, False, reason) for name in names]
        elif key in left_inside:
            records += [ConversionRecord(name, layer_type, False, left_inside[key]) for name in names]
        elif refusal is not None:
            refused.append(f"{names[0]}: {refusal}")
            records += [ConversionRecord(name, layer_type, False, refusal) for name in names]
        else:
            seed = None if base_seed is None else base_seed + layer_count
            layer_count += 1
            # Build every replacement before swapping any, so an error leaves the model as it was.
            replacements[key] = _build_pfa_layer(module, pfa_class, {**layer_kwargs, "feedback_seed": seed}, device)
            shared = f" (one layer shared by {len(names)} places)" if len(names) > 1 else ""
            caller = f", called by {called_by[key]}" if key in called_by else ""
            records += [ConversionRecord(name, layer_type, True, f"-> {pfa_class.__name__}{shared}{caller}")
                        for name in names]
    if strict and refused:
        raise ValueError("strict=True: converting these layers would change what the model computes: "
                         + "; ".join(refused))

    model = replace_modules(model, places, replacements)
    if device is not None:
        model.to(device)  # the weights and everything not converted; the feedback is there already
    return (model, records) if return_report else model
