"""checkpoint.pt: an interrupted save keeps the previous checkpoint; an unreadable or foreign file is an error that
names the file and what is wrong with it."""

from __future__ import annotations

import os

import pytest
import torch

from pfa_kernels.train import config as train_config
from pfa_kernels.train import loop
from pfa_kernels.train.config import ConfigError


def _config(run_dir, *overrides):
    # The torch backend: exact comparisons need the same kernels in every run (auto may measure and switch).
    return train_config.load("digits", [f"log.dir={run_dir}", "train.batch_size=32", "rule.backend=torch",
                                        *overrides])


def _failing_save(obj, f, *args, **kwargs):
    """torch.save that dies half-way through writing (a full disk, a killed process)."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04" + bytes(64))
    else:
        f.write(b"PK\x03\x04" + bytes(64))
    raise OSError(28, "No space left on device")


def test_a_save_that_fails_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    loop.run(_config(tmp_path, "train.max_steps=2"), progress=False)
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(OSError, match="No space left"):
        loop.run(_config(tmp_path, "train.max_steps=3"), resume=True, progress=False)
    monkeypatch.undo()
    state = torch.load(tmp_path / loop.CHECKPOINT, weights_only=False)
    assert state["step"] == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    resumed = loop.run(_config(tmp_path, "train.max_steps=3"), resume=True, progress=False)
    assert resumed["step"] == 3


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("good")
    loop.run(_config(run_dir, "train.max_steps=1"), progress=False)
    return run_dir / loop.CHECKPOINT


def _resume_from(tmp_path, content: bytes, *overrides):
    (tmp_path / loop.CHECKPOINT).write_bytes(content)
    return loop.run(_config(tmp_path, "train.max_steps=2", *overrides), resume=True, progress=False)


def test_an_empty_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / loop.CHECKPOINT}.*is empty"):
        _resume_from(tmp_path, b"")
    assert not (tmp_path / "config.json").exists()


def test_a_truncated_checkpoint_is_named(tmp_path, good_checkpoint):
    content = good_checkpoint.read_bytes()
    with pytest.raises(ConfigError, match=f"{tmp_path / loop.CHECKPOINT}.*truncated or corrupt"):
        _resume_from(tmp_path, content[:len(content) // 2])


def test_a_foreign_checkpoint_is_named(tmp_path):
    path = tmp_path / loop.CHECKPOINT
    torch.save(loop.models.build(train_config.load("digits"), (1, 8, 8)).state_dict(), path)
    with pytest.raises(ConfigError, match=f"{path} is not a training checkpoint.*model state dict.*model.checkpoint"):
        loop.run(_config(tmp_path, "train.max_steps=2"), resume=True, progress=False)
    torch.save({"epoch": 3}, path)
    with pytest.raises(ConfigError, match=f"{path} is not a training checkpoint.*lacks.*'model'"):
        loop.run(_config(tmp_path, "train.max_steps=2"), resume=True, progress=False)
    torch.save([1, 2], path)
    with pytest.raises(ConfigError, match=f"{path} is not a training checkpoint.*list"):
        loop.run(_config(tmp_path, "train.max_steps=2"), resume=True, progress=False)


def test_resuming_into_another_rule_names_the_checkpoints_rule(tmp_path, good_checkpoint):
    path = tmp_path / loop.CHECKPOINT
    with pytest.raises(ConfigError, match=f"rule.mode='fa'.*{path} was trained with rule.mode='pfa'"):
        _resume_from(tmp_path, good_checkpoint.read_bytes(), "rule.mode=fa")
