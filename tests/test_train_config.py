"""Training config: every key has a declared type and range; values from recipes and --set are coerced to it, and a
bad value is an error naming its key before anything runs."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from pfa_kernels import dispatch
from pfa_kernels.train import config as train_config
from pfa_kernels.train.config import ConfigError


@pytest.mark.parametrize(("override", "message"), [
    ("optim.large_weight_decay=-1e-3", "optim.large_weight_decay must be >= 0; got -0.001"),
    ("log.every=0", "log.every must be >= 1; got 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1; got 0"),
    ("optim.lr=fast", "optim.lr must be a number; got 'fast'"),
    ("train.epochs=ten", "train.epochs must be an integer; got 'ten'"),
    ("train.epochs=2.5", "train.epochs must be an integer; got 2.5"),
    ("train.max_steps=0", "train.max_steps must be >= 1 or null; got 0"),
    ("optim.lr=nan", "optim.lr must be a finite number; got 'nan'"),
    ("train.channels_last=maybe", "train.channels_last must be true or false; got 'maybe'"),
    ("rule.mode=pfa2", "rule.mode must be one of bp, pfa, pfa-o"),
    ("rule.feedback_density=0", "rule.feedback_density must be in \\(0, 1\\]"),
    ("rule.feedback_density=[0.5, 2]", "rule.feedback_density must be in \\(0, 1\\]"),
    ("optim.lr_milestones=[10, x]", "optim.lr_milestones must be a list of integers >= 0; got \\[10, 'x'\\]"),
    ("log.dir=", "log.dir must be a non-empty string"),
    ("train.device=gpu", "train.device must be auto or a torch device"),
])
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        train_config.load("digits", [override])


def test_values_are_coerced_to_their_declared_type():
    """YAML 1.1 reads 1e-3 as a string; torch.optim would then fail deep inside the first step."""
    config = train_config.load("digits", ["optim.lr=1e-3", "optim.weight_decay=0", "train.epochs=3.0",
                                          "rule.exclude=fc", "optim.lr_milestones=5", "train.max_steps=null",
                                          "rule.expand_ratio=2", "train.compile=no"])
    assert config["optim"]["lr"] == 1e-3 and type(config["optim"]["lr"]) is float
    assert config["optim"]["weight_decay"] == 0.0 and type(config["optim"]["weight_decay"]) is float
    assert config["train"]["epochs"] == 3 and type(config["train"]["epochs"]) is int
    assert config["rule"]["exclude"] == ["fc"]  # one glob pattern, not the characters ('f', 'c')
    assert config["optim"]["lr_milestones"] == [5]
    assert config["train"]["max_steps"] is None and config["train"]["compile"] is False
    assert config["rule"]["expand_ratio"] == 2.0
    assert train_config.load("digits", ["rule.exclude=[fc, '0']"])["rule"]["exclude"] == ["fc", "0"]
    assert train_config.load("digits", ["rule.feedback_density=[0.5, 1]"])["rule"]["feedback_density"] == [0.5, 1.0]


def test_every_default_and_recipe_is_valid():
    for name in train_config.recipes():
        config = train_config.load(name)
        assert train_config.check(config) == config, name
    defaults = {key: default for key, (default, _, _) in train_config.DEFAULTS.items()}
    assert train_config._flatten(train_config.check({})) == defaults


def test_check_validates_a_config_dict():
    """loop.run takes a config dict; check() coerces it the same way, fills missing keys and refuses unknown ones."""
    config = train_config.load("digits")
    config["optim"]["lr"] = "2e-2"
    assert train_config.check(config)["optim"]["lr"] == 0.02
    config["train"]["batch_size"] = -4
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1; got -4"):
        train_config.check(config)
    with pytest.raises(KeyError, match="train.batchsize"):
        train_config.check({"train": {"batchsize": 4}})


def test_rule_choices_match_the_library():
    convert = importlib.import_module("pfa_kernels.convert")  # pk.convert is the function
    assert set(train_config.DEFAULTS["rule.mode"][1].options) == {"bp", *convert.MODES}
    assert set(train_config.DEFAULTS["rule.backend"][1].options) == set(dispatch.BACKENDS)


def test_help_lists_types():
    text = subprocess.run([sys.executable, "-m", "pfa_kernels.train", "--help"], capture_output=True, text=True,
                          check=True).stdout
    line = next(line for line in text.splitlines() if line.strip().startswith("optim.lr "))
    assert "float >= 0" in line and "0.05" in line
    assert "log.checkpoint_every" in text
