"""Training configuration: YAML recipes (configs/*.yaml, the paper's) plus command-line overrides of any key.

    python -m pfa_kernels.train --config cifar10_resnet20 --set optim.lr=0.05 --set rule.mode=fa

A config is a nested dict; DEFAULTS lists every key with its meaning. A recipe file overrides some of them;
each --set key.path=value (parsed as YAML: numbers, lists, true/false, null) overrides one more. Unknown keys
are an error naming the key.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# key -> (default, help). Nested keys are dotted.
DEFAULTS = {
    "data.dataset": ("digits", "digits (scikit-learn's bundled 8x8, no download) | mnist | cifar10 | imagenet "
                               "(ImageFolder) | imagefolder"),
    "data.root": ("data", "folder holding the dataset (MNIST/CIFAR-10 as torchvision stores them; ImageFolder "
                          "with train/ and val/ subfolders)"),
    "data.download": (False, "let torchvision download MNIST/CIFAR-10 into data.root (needs network access)"),
    "data.image_size": (224, "ImageFolder: training crop / validation center-crop size"),
    "data.workers": (2, "DataLoader worker processes"),
    "data.pin_memory": (True, "pinned host memory for faster host-to-GPU copies"),
    "model.name": ("digits_cnn", "digits_cnn | mlp | resnet20 (CIFAR, option-A shortcuts) | resnet18 | resnet50"),
    "model.num_classes": (10, "output classes"),
    "model.hidden": (512, "mlp: width of each hidden layer"),
    "model.depth": (2, "mlp: hidden layers"),
    "model.checkpoint": (None, "a backpropagation state dict (e.g. torchvision's) to start from; the feedback "
                               "of the converted layers is kept as drawn"),
    "rule.mode": ("pfa", "bp | pfa | pfa-o | kp | fa | dfa | usf | frsf | brsf (pk.convert modes; bp = no "
                         "conversion)"),
    "rule.expand_ratio": (10, "PFA: C_mid / C_out (pfa-o and kp use 1)"),
    "rule.parametrization": ("auto", "auto (projected with SGD, else explicit) | explicit | projected"),
    "rule.feedback_density": (1.0, "PFA: density of the fixed sparse masks on B and R"),
    "rule.exclude": ([], "glob patterns of layer names to keep as backpropagation"),
    "rule.backend": ("auto", "auto | torch | triton"),
    "rule.feedback_seed": (0, "seed of every layer's feedback (the i-th layer gets seed + i): the same B on "
                              "every DDP rank"),
    "optim.name": ("sgd", "sgd | adam | adamw (adam-like optimizers need rule.parametrization explicit)"),
    "optim.lr": (0.05, "initial learning rate (for the global batch)"),
    "optim.momentum": (0.9, "SGD momentum"),
    "optim.nesterov": (False, "SGD Nesterov momentum"),
    "optim.weight_decay": (1e-3, "weight decay after the first optim.large_wd_epochs epochs"),
    "optim.large_weight_decay": (1e-2, "weight decay for the first optim.large_wd_epochs epochs (the paper's "
                                       "schedule: large first, then small)"),
    "optim.large_wd_epochs": (1, "epochs with the large weight decay"),
    "optim.lr_milestones": ([], "epochs at which the lr is multiplied by optim.lr_gamma (step schedule)"),
    "optim.lr_gamma": (0.1, "step-schedule factor"),
    "train.epochs": (10, "epochs"),
    "train.batch_size": (64, "global batch size (split across DDP ranks)"),
    "train.amp": ("fp32", "fp32 (no autocast) | bf16 | fp16 (autocast; fp16 uses a GradScaler)"),
    "train.channels_last": (False, "channels_last memory format for images and model"),
    "train.compile": (False, "torch.compile the model"),
    "train.seed": (0, "seed of weights, data order and augmentation"),
    "train.max_steps": (None, "stop after this many optimizer steps in total (for smoke runs)"),
    "train.device": ("auto", "auto | cpu | cuda"),
    "log.dir": ("runs/run", "run folder: metrics.jsonl, checkpoint.pt, plots"),
    "log.every": (50, "steps between progress-bar metric updates"),
    "log.tensorboard": (False, "also write TensorBoard events (needs the tensorboard package)"),
    "log.alignment_batches": (1, "batches of the validation set used for per-layer input-gradient alignment"),
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
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load(recipe: str | None = None, overrides: list[str] = ()) -> dict:
    """DEFAULTS, then the recipe (a name in configs/ or a YAML path), then key=value overrides."""
    flat = {key: default for key, (default, _) in DEFAULTS.items()}
    if recipe:
        path = Path(recipe)
        if not path.suffix:
            path = CONFIG_DIR / f"{recipe}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"config {recipe!r} not found; recipes: {recipes()} or a path to a .yaml file")
        _update(flat, _flatten(yaml.safe_load(path.read_text()) or {}), str(path))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} must look like key.path=value")
        _update(flat, {key.strip(): yaml.safe_load(text)}, "--set")
    return _nest(flat)


def _update(flat: dict, new: dict, source: str) -> None:
    unknown = sorted(set(new) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown} in {source}; known keys: {sorted(DEFAULTS)}")
    flat.update(new)


def describe() -> str:
    """Every key with its default and meaning (for --help)."""
    width = max(map(len, DEFAULTS))
    return "\n".join(f"  {key:<{width}}  {default!r}: {text}" for key, (default, text) in DEFAULTS.items())
