"""Run folders: a new run never mixes with an earlier one, --resume needs a checkpoint and a compatible config, and
nothing is written before the config has been validated."""

from __future__ import annotations

import json

import pytest
import torch

from pfa_kernels.train import config as train_config
from pfa_kernels.train import loop
from pfa_kernels.train.__main__ import main
from pfa_kernels.train.config import ConfigError

# 3 steps per epoch: 1347 training digits in global batches of 448.
EPOCH = ["train.batch_size=448", "train.epochs=1"]


def _config(run_dir, *overrides):
    return train_config.load("digits", [f"log.dir={run_dir}", "train.batch_size=32", "rule.backend=torch",
                                        *overrides])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_new_run_refuses_a_folder_holding_an_earlier_run(tmp_path, capsys):
    loop.run(_config(tmp_path, "train.max_steps=1"), progress=False)
    with pytest.raises(ConfigError, match=f"log.dir={tmp_path}.*checkpoint.pt.*--resume.*--set log.dir=.*--overwrite"):
        loop.run(_config(tmp_path, "train.max_steps=1"), progress=False)
    metrics_only = tmp_path / "metrics_only"
    metrics_only.mkdir()
    (metrics_only / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        loop.run(_config(metrics_only, "train.max_steps=1"), progress=False)
    # The CLI: a clear message and exit status 2; --overwrite replaces the earlier run.
    argv = ["--set", f"log.dir={metrics_only}", "--set", "train.max_steps=1", "--set", "rule.backend=torch",
            "--no-progress"]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert not (metrics_only / "metrics.jsonl").exists() and (metrics_only / loop.CHECKPOINT).exists()
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        loop.run(_config(tmp_path), resume=True, overwrite=True, progress=False)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=f"--resume.*no checkpoint {tmp_path / loop.CHECKPOINT}"):
        loop.run(_config(tmp_path, "train.max_steps=1"), resume=True, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("override", "message"), [
    ("train.batch_size=2000", "train.batch_size=2000 is larger than the training set \\(1347 samples of "
                              "data.dataset='digits'\\)"),
    ("model.num_classes=5", "model.num_classes=5, but data.dataset='digits' has 10 classes"),
])
def test_config_json_is_written_only_after_validation(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        loop.run(_config(tmp_path / "run", override), progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_applies_lr_momentum_and_epochs_and_records_them(tmp_path):
    loop.run(_config(tmp_path, *EPOCH, "optim.lr_milestones=[1]"), progress=False)
    metrics = loop.run(_config(tmp_path, *EPOCH, "optim.lr_milestones=[1]", "optim.lr=0.01", "train.epochs=2",
                               "optim.momentum=0.5"), resume=True, progress=False)
    assert metrics["epoch"] == 1 and [r["epoch"] for r in _records(tmp_path)] == [0, 1]
    assert _records(tmp_path)[1]["lr"] == pytest.approx(0.01 * 0.1)  # the new lr, past the milestone at epoch 1
    state = torch.load(tmp_path / loop.CHECKPOINT, weights_only=False)
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.5 and state["config"]["optim"]["lr"] == 0.01
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 2
    resumes = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert resumes == [{"epoch": 1, "step": 3, "changed": {"optim.lr": [0.05, 0.01], "optim.momentum": [0.9, 0.5],
                                                            "train.epochs": [1, 2]}}]


def test_resume_refuses_what_it_cannot_honour(tmp_path):
    loop.run(_config(tmp_path, "train.max_steps=2"), progress=False)
    config_json = (tmp_path / "config.json").read_text()
    checkpoint = tmp_path / loop.CHECKPOINT
    for override, message in (
            ("rule.mode=fa", f"rule.mode='fa'.*{checkpoint} was trained with rule.mode='pfa'"),
            ("model.name=mlp", "model.name='mlp'.*trained with model.name='digits_cnn'"),
            ("rule.exclude=7", "rule.exclude=\\['7'\\].*trained with rule.exclude=\\[\\]"),
            ("train.batch_size=64", "train.batch_size=64.*mid-epoch.*trained with train.batch_size=32")):
        with pytest.raises(ConfigError, match=message):
            loop.run(_config(tmp_path, "train.max_steps=3", override), resume=True, progress=False)
    assert (tmp_path / "config.json").read_text() == config_json
    assert torch.load(checkpoint, weights_only=False)["step"] == 2


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    """A run that wrote an epoch's metrics and died before its checkpoint (or while writing a line): the resumed run
    records that epoch once."""
    loop.run(_config(tmp_path, *EPOCH), progress=False)
    with (tmp_path / "metrics.jsonl").open("a") as out:
        out.write(json.dumps({**_records(tmp_path)[0], "epoch": 1, "val_top1": -1.0}) + "\n")
        out.write('{"epoch": 2, "train_lo')  # a line cut short when the run died
    loop.run(_config(tmp_path, *EPOCH, "train.epochs=2"), resume=True, progress=False)
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["val_top1"] >= 0
