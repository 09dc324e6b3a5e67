"""Training CLI and loop: digits run, exact resume, DDP equal to one process, ImageFolder smoke, configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_distributed_run_equals_single, train_digits_rank

from pfa_kernels.train import config as train_config
from pfa_kernels.train import loop, models


def _config(tmp_path, *overrides):
    # The torch backend: exact comparisons need the same kernels in every run (auto may measure and switch).
    return train_config.load("digits", [f"log.dir={tmp_path}", "train.batch_size=32", "rule.backend=torch",
                                        *overrides])


def test_cli_on_digits(tmp_path):
    """The CLI end to end (3 epochs): PFA learns, and metrics.jsonl has accuracy, throughput, lr, weight decay
    and per-layer alignment each epoch; plots are written."""
    result = subprocess.run([sys.executable, "-m", "pfa_kernels.train", "--set", f"log.dir={tmp_path}", "--set",
                             "train.epochs=3", "--no-progress"], capture_output=True, text=True, timeout=300,
                            check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["epoch"] == 2 and summary["val_top1"] > 50  # chance is 10 %
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["train_loss"] < records[0]["train_loss"]
    record = records[0]
    for key in ("train_loss", "train_top1", "val_top1", "val_top5", "images_per_s", "lr", "weight_decay"):
        assert key in record
    assert record["weight_decay"] == 1e-2  # the large weight decay of the first epochs
    assert len(record["layers"]) == 4 and all(0 < row["path_alignment"] < 180 for row in record["layers"])
    # log.alignment_batches (1 by default): PFA's input gradients against backpropagation's, per layer.
    assert all(0 < row["input_gradient_alignment"] < 180 for row in record["layers"][1:])
    assert record["val_samples"] == 450
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "alignment.png").stat().st_size > 0


def test_help_documents_every_key():
    text = subprocess.run([sys.executable, "-m", "pfa_kernels.train", "--help"], capture_output=True, text=True,
                          check=True).stdout
    assert all(key in text for key in train_config.DEFAULTS) and "imagenet_resnet18" in text


def test_config_overrides_and_errors():
    config = train_config.load("cifar10_resnet20", ["optim.lr=0.2", "rule.mode=fa", "optim.lr_milestones=[1, 2]"])
    assert config["optim"]["lr"] == 0.2 and config["rule"]["mode"] == "fa"
    assert config["optim"]["lr_milestones"] == [1, 2]
    assert config["model"]["name"] == "resnet20" and config["optim"]["momentum"] == 0.9
    with pytest.raises(KeyError, match="optim.learning_rate"):
        train_config.load("digits", ["optim.learning_rate=1"])
    with pytest.raises(FileNotFoundError, match="recipes"):
        train_config.load("cifar100")
    assert loop.weight_decay_for(0, config["optim"]) == 1e-3 and loop.weight_decay_for(1, config["optim"]) == 1e-4


@pytest.mark.parametrize("mode", ["pfa", "brsf", "dfa"])
def test_resume_continues_exactly(tmp_path, mode):
    """4 steps in one go == 2 steps, a checkpoint, a new process state, and 2 more steps (mid-epoch)."""
    common = ["train.epochs=1", f"rule.mode={mode}", "optim.lr_milestones=[1]"]
    straight = loop.run(_config(tmp_path / "a", "train.max_steps=4", *common), progress=False)
    loop.run(_config(tmp_path / "b", "train.max_steps=2", *common), progress=False)
    torch.manual_seed(12345)  # the resumed run must not depend on the state it starts in
    resumed = loop.run(_config(tmp_path / "b", "train.max_steps=4", *common), resume=True, progress=False)
    assert resumed["step"] == straight["step"] == 4
    a = torch.load(tmp_path / "a" / loop.CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "b" / loop.CHECKPOINT, weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]) if torch.is_tensor(value) else value == b["model"][key], key
    assert a["batch_in_epoch"] == b["batch_in_epoch"] == 4


def test_ddp_two_processes_equal_one(tmp_path):
    """2-process gloo DDP, one epoch of 3 steps, global batch 448 (224 per rank) == 1 process with batch 448: the
    weights, and the metrics of the epoch (each rank validates its half of the 450 digits; the counts are summed)."""
    overrides = ["train.batch_size=448", "train.epochs=1", "rule.mode=pfa", "rule.backend=torch"]
    torch.multiprocessing.spawn(train_digits_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), overrides),
                                nprocs=2)
    single_metrics = loop.run(train_config.load("digits", [f"log.dir={tmp_path / 'single'}", *overrides]),
                              progress=False)
    assert_distributed_run_equals_single(tmp_path / "ddp", tmp_path / "single", single_metrics)


def test_imagefolder_smoke(tmp_path):
    """A tiny generated ImageFolder (train/ and val/, 2 classes of 32x32 PNGs) trains a ResNet-18 for 2 steps."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 255, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    config = train_config.load("imagenet_resnet18", [f"data.root={tmp_path / 'images'}", "data.image_size=32",
                                                     "data.workers=0", "model.num_classes=2", "train.batch_size=4",
                                                     "train.epochs=1", "train.amp=fp32", f"log.dir={tmp_path / 'run'}",
                                                     "train.channels_last=true", "rule.expand_ratio=2"])
    metrics = loop.run(config, progress=False)
    assert metrics["epoch"] == 0 and 0 <= metrics["val_top1"] <= 100 and metrics["val_top5"] == 100


def test_resnet20_option_a():
    model = models.resnet20()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.02)  # He et al.: 0.27M
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_starts_from_a_backpropagation_checkpoint(tmp_path):
    """model.checkpoint: a BP state dict (nn layers) loads into the converted model before training."""
    bp = models.build(train_config.load("digits"), (1, 8, 8))
    torch.save(bp.state_dict(), tmp_path / "bp.pt")
    config = _config(tmp_path / "run", f"model.checkpoint={tmp_path / 'bp.pt'}", "train.max_steps=1",
                     "optim.lr=0.0", "optim.large_weight_decay=0.0")
    loop.run(config, progress=False)
    state = torch.load(tmp_path / "run" / loop.CHECKPOINT, weights_only=False)["model"]
    for key, value in bp.state_dict().items():
        assert torch.equal(state[key], value), key
    assert any(key.endswith("feedback.Z") for key in state)  # converted, projected under SGD


def test_checkpoint_every_resumes_exactly_mid_epoch(tmp_path, monkeypatch):
    """A run killed after step 3 of an epoch, with log.checkpoint_every=2, resumes from step 2 and ends exactly where
    an uninterrupted run does: the weights and the epoch's training metrics."""
    common = ["train.batch_size=224", "train.epochs=1"]  # 6 steps in the epoch
    straight = loop.run(_config(tmp_path / "a", *common), progress=False)
    calls = []
    real_to_device = loop._to_device

    def dies_at_the_fourth_batch(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_to_device(*args)

    monkeypatch.setattr(loop, "_to_device", dies_at_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        loop.run(_config(tmp_path / "b", *common, "log.checkpoint_every=2"), progress=False)
    monkeypatch.undo()
    state = torch.load(tmp_path / "b" / loop.CHECKPOINT, weights_only=False)
    assert (state["step"], state["batch_in_epoch"]) == (2, 2)
    torch.manual_seed(12345)
    resumed = loop.run(_config(tmp_path / "b", *common, "log.checkpoint_every=2"), resume=True, progress=False)
    a = torch.load(tmp_path / "a" / loop.CHECKPOINT, weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / loop.CHECKPOINT, weights_only=False)["model"]
    for key, value in a.items():  # tensors, and each feedback's _extra_state (its seed and checksum of B)
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key
    for key in ("step", "train_loss", "train_top1", "val_loss", "val_top1"):
        assert resumed[key] == straight[key], key
