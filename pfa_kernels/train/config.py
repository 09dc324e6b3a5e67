"""Training configuration: YAML recipes (configs/*.yaml, the paper's) plus command-line overrides of any key.

    python -m pfa_kernels.train --config cifar10_resnet20 --set optim.lr=0.05 --set rule.mode=fa

A config is a nested dict; DEFAULTS lists every key with its default, its type and its meaning. A recipe file
overrides some of them; each --set key.path=value (parsed as YAML: numbers, lists, true/false, null) overrides one
more. Every value is coerced to its key's type and range-checked as it is read (values.py), so a bad one is an
error naming the key before anything runs; unknown keys are an error naming the key.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .values import (
    Boolean,
    Choice,
    ConfigError,
    Density,
    Device,
    Integer,
    Many,
    Mapping,
    ModelName,
    Real,
    Text,
    UnknownKeyError,
)

__all__ = ["CONFIG_DIR", "DEFAULTS", "ConfigError", "check", "describe", "load", "override", "recipes"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The layers' backends (pfa_kernels.dispatch.BACKENDS) and pk.convert's modes; tests keep these in step.
BACKENDS = ("auto", "torch", "triton", "cpp")
MODES = ("bp", "pfa", "pfa-o", "kp", "fa", "dfa", "usf", "frsf", "brsf")

# key -> (default, type, help). Nested keys are dotted.
DEFAULTS = {
    "data.dataset": ("digits", Choice("digits", "mnist", "cifar10", "imagenet", "imagefolder"),
                     "digits is scikit-learn's bundled 8x8 (no download); imagenet and imagefolder read an "
                     "ImageFolder"),
    "data.root": ("data", Text(), "folder holding the dataset (MNIST/CIFAR-10 as torchvision stores them; "
                                  "ImageFolder with train/ and val/ subfolders)"),
    "data.download": (False, Boolean(), "let torchvision download MNIST/CIFAR-10 into data.root (needs network "
                                        "access)"),
    "data.image_size": (224, Integer(1), "ImageFolder: training crop / validation center-crop size"),
    "data.channels": (None, Integer(1, optional=True),
                      "image channels the model gets: 3 repeats a grayscale dataset (digits, MNIST) for a model built "
                      "for RGB, 1 averages RGB to gray (null: as stored)"),
    "data.resize": (None, Integer(1, optional=True),
                    "digits, MNIST, CIFAR-10: resize the images to this size (bilinear) for a model that needs larger "
                    "inputs (null: as stored; ImageFolder uses data.image_size)"),
    "data.workers": (2, Integer(0), "DataLoader worker processes"),
    "data.pin_memory": (True, Boolean(), "pinned host memory for faster host-to-GPU copies"),
    "model.name": ("digits_cnn", ModelName("digits_cnn", "mlp", "resnet20", "resnet18", "resnet50"),
                   "resnet20 is CIFAR's, with option-A shortcuts; torchvision.<name> is any torchvision classification "
                   "model (torchvision.models.list_models(module=torchvision.models)), timm.<name> any timm model "
                   "(pip install timm); all built untrained, with model.num_classes outputs"),
    "model.kwargs": ({}, Mapping(), "torchvision.<name> and timm.<name>: more keyword arguments of "
                                    "torchvision.models.get_model / timm.create_model (e.g. {image_size: 32} for "
                                    "torchvision's ViT, {drop_path_rate: 0.1} for timm's)"),
    "model.num_classes": (10, Integer(1), "output classes: the dataset's number of classes"),
    "model.hidden": (512, Integer(1), "mlp: width of each hidden layer"),
    "model.depth": (2, Integer(0), "mlp: hidden layers"),
    "model.checkpoint": (None, Text(optional=True),
                         "a backpropagation state dict (e.g. torchvision's) to start from; the feedback of the "
                         "converted layers is kept as drawn"),
    "rule.mode": ("pfa", Choice(*MODES), "pk.convert's modes; bp = no conversion"),
    "rule.expand_ratio": (10, Real(0, open_minimum=True), "PFA: C_mid / C_out (pfa-o and kp use 1)"),
    "rule.parametrization": ("auto", Choice("auto", "explicit", "projected"),
                             "auto = with SGD, the layers' auto (projected wherever exact: no masked R, a "
                             "well-conditioned B); with Adam-like optimizers, explicit"),
    "rule.feedback_density": (1.0, Density(), "PFA: density of the fixed sparse masks on B and R"),
    "rule.exclude": ([], Many(Text(), "strings"), "glob patterns of layer names to keep as backpropagation "
                                                  "(one pattern, or a YAML list: [fc, 'layer4.*'])"),
    "rule.backend": ("auto", Choice(*BACKENDS), "the PFA layers' backward backend"),
    "rule.feedback_seed": (0, Integer(0), "seed of every layer's feedback (the i-th layer gets seed + i): the "
                                          "same B on every DDP rank"),
    "optim.name": ("sgd", Choice("sgd", "adam", "adamw"), "adam-like optimizers need rule.parametrization "
                                                          "explicit"),
    "optim.lr": (0.05, Real(0), "initial learning rate (for the global batch)"),
    "optim.momentum": (0.9, Real(0, 1), "SGD momentum"),
    "optim.nesterov": (False, Boolean(), "SGD Nesterov momentum"),
    "optim.weight_decay": (1e-3, Real(0), "weight decay after the first optim.large_wd_epochs epochs"),
    "optim.large_weight_decay": (1e-2, Real(0), "weight decay for the first optim.large_wd_epochs epochs (the "
                                                "paper's schedule: large first, then small)"),
    "optim.large_wd_epochs": (1, Integer(0), "epochs with the large weight decay"),
    "optim.lr_milestones": ([], Many(Integer(0), "integers >= 0"),
                            "epochs at which the lr is multiplied by optim.lr_gamma (step schedule)"),
    "optim.lr_gamma": (0.1, Real(0, open_minimum=True), "step-schedule factor"),
    "optim.schedule": ("step", Choice("step", "cosine"),
                       "step: x optim.lr_gamma at each of optim.lr_milestones (per epoch); cosine: from optim.lr down "
                       "to optim.min_lr over train.epochs, updated every step, after optim.warmup_epochs of linear "
                       "warmup"),
    "optim.warmup_epochs": (0.0, Real(0), "cosine: epochs (fractions allowed) of linear warmup, per step, from "
                                          "optim.lr / warmup steps up to optim.lr"),
    "optim.min_lr": (0.0, Real(0), "cosine: the learning rate the schedule ends at"),
    "optim.label_smoothing": (0.0, Real(0, 1), "label smoothing of the training loss (the validation loss is "
                                               "plain cross-entropy)"),
    "optim.no_weight_decay_norm_bias": (False, Boolean(),
                                        "no weight decay on normalization-layer parameters and biases (the paper's "
                                        "recipes decay every parameter)"),
    "train.epochs": (10, Integer(1), "epochs"),
    "train.batch_size": (64, Integer(1), "global batch size (split across DDP ranks); at most the training set"),
    "train.amp": ("fp32", Choice("fp32", "bf16", "fp16"), "fp32 = no autocast; fp16 adds a GradScaler"),
    "train.channels_last": (False, Boolean(), "channels_last memory format for images and model"),
    "train.compile": (False, Boolean(), "torch.compile the model"),
    "train.seed": (0, Integer(0, 2**32 - 1), "seed of weights, data order and augmentation"),
    "train.max_steps": (None, Integer(1, optional=True), "stop after this many optimizer steps in total (for smoke "
                                                         "runs); a checkpoint is written there"),
    "train.device": ("auto", Device(), "auto = cuda when available, else cpu"),
    "train.ema_decay": (None, Real(0, 1, optional=True),
                        "keep an exponential moving average of the weights (and buffers) with this decay, e.g. "
                        "0.9999, updated every step, evaluated each epoch beside the model and checkpointed (null: "
                        "none)"),
    "train.fsdp": (False, Boolean(), "shard parameters, gradients and optimizer state over the ranks with FSDP2 "
                                     "(fully_shard per block, then the root) instead of DDP; needs 2+ processes"),
    "log.dir": ("runs/run", Text(), "run folder: config.json, metrics.jsonl, checkpoint.pt, plots"),
    "log.every": (50, Integer(1), "steps between progress-bar metric updates"),
    "log.checkpoint_every": (None, Integer(1, optional=True),
                             "also write checkpoint.pt every this many steps, so that --resume continues exactly "
                             "from within an epoch (null: at the end of each epoch and at train.max_steps only)"),
    "log.tensorboard": (False, Boolean(), "also write TensorBoard events (needs the tensorboard package)"),
    "log.keep_best": (True, Boolean(), "also write best.pt (the whole training state, as checkpoint.pt) after each "
                                       "epoch whose validation top-1 beats every earlier epoch's"),
    "log.epoch_summary": (True, Boolean(), "print one line per epoch (rank 0): train loss, validation loss and "
                                           "accuracy, lr, seconds"),
    "log.alignment_batches": (1, Integer(0), "validation batches (on rank 0) over which each epoch records every "
                                             "PFA layer's input-gradient alignment with backpropagation (0: none)"),
}


def _nest(flat: dict) -> dict:
    nested = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = copy.deepcopy(value)
    return nested


def _flatten(nested: dict, prefix="") -> dict:
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in DEFAULTS:  # a section, not a mapping-valued key
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def coerce(key: str, value):
    """value in key's declared type (ConfigError naming the key if it has none)."""
    return DEFAULTS[key][1].coerce(key, value)


def load(recipe: str | None = None, overrides: list[str] = ()) -> dict:
    """DEFAULTS, then the recipe (a name in configs/ or a YAML path), then key=value overrides; every value coerced
    to its key's type."""
    flat = {key: default for key, (default, _, _) in DEFAULTS.items()}
    if recipe:
        path = Path(recipe)
        if not path.suffix:
            path = CONFIG_DIR / f"{recipe}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"config {recipe!r} not found; recipes: {recipes()} or a path to a .yaml file")
        _update(flat, _flatten(yaml.safe_load(path.read_text()) or {}), str(path))
    _apply(flat, overrides)
    return _nest(flat)


def override(config: dict, overrides: list[str] = ()) -> dict:
    """A validated copy of a nested config with key=value overrides applied (as load applies them to a recipe)."""
    flat = _flatten(check(config))
    _apply(flat, overrides)
    return _nest(flat)


def _apply(flat: dict, overrides) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        _update(flat, {key.strip(): yaml.safe_load(text)}, "--set")


def check(config: dict) -> dict:
    """A validated copy of a nested config (as loop.run takes it): missing keys take their defaults, every value is
    coerced to its key's type, an unknown key is an UnknownKeyError (a KeyError) naming it."""
    flat = {key: default for key, (default, _, _) in DEFAULTS.items()}
    _update(flat, _flatten(config), "the config")
    return _nest(flat)


def _update(flat: dict, new: dict, source: str) -> None:
    unknown = sorted(set(new) - set(DEFAULTS))
    if unknown:
        raise UnknownKeyError(f"unknown config key(s) {unknown} in {source}; known keys: {sorted(DEFAULTS)}")
    # Coerce all before changing any: a bad value leaves `flat` as it was.
    flat.update({key: coerce(key, value) for key, value in new.items()})


def describe() -> str:
    """Every key with its type, default and meaning (for --help)."""
    width = max(map(len, DEFAULTS))
    return "\n".join(f"  {key:<{width}}  {kind.describe()}, default {'null' if default is None else repr(default)}: "
                     f"{text}" for key, (default, kind, text) in DEFAULTS.items())
