"""Training options: torchvision/timm models, the cosine schedule with warmup, label smoothing, no weight decay on
norm layers and biases, the weight average (EMA), --eval, best.pt, the per-epoch line, plots, and FSDP2."""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_distributed_run_equals_single, train_digits_rank
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import pfa_kernels as pk
from pfa_kernels.train import config as train_config
from pfa_kernels.train import data, loop, models, optimization, plots
from pfa_kernels.train.__main__ import main
from pfa_kernels.train.config import ConfigError

# 3 steps per epoch: 1347 training digits in global batches of 448.
EPOCH = ["train.batch_size=448", "train.epochs=1"]


def _config(run_dir, *overrides):
    # The torch backend: exact comparisons need the same kernels in every run (auto may measure and switch).
    return train_config.load("digits", [f"log.dir={run_dir}", "train.batch_size=32", "rule.backend=torch",
                                        *overrides])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir, name=loop.CHECKPOINT):
    return torch.load(run_dir / name, weights_only=False)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k]
                                        for k, v in a.items())


def test_torchvision_model_trains_with_its_kwargs(tmp_path):
    """model.name=torchvision.<name> on digits (gray repeated to RGB, resized to 32x32): converted to PFA and trained
    for 2 steps, with model.kwargs reaching the constructor (width_mult 0.5 halves the stem's 16 channels). Explicit
    feedback: the projected setup's per-layer factorizations would take most of the time, for nothing tested here."""
    config = _config(tmp_path, "model.name=torchvision.mobilenet_v3_small", "model.kwargs={width_mult: 0.5}",
                     "data.channels=3", "data.resize=32", "train.max_steps=2", "rule.parametrization=explicit",
                     "train.batch_size=8")
    result = loop.run(config, progress=False)
    assert result["step"] == 2 and math.isfinite(result["loss"])
    state = _checkpoint(tmp_path)["model"]
    assert state["features.0.0.weight"].shape == (8, 3, 3, 3)  # width_mult 0.5, 3 input channels
    assert state["classifier.3.weight"].shape[0] == 10  # model.num_classes outputs
    assert "features.0.0.feedback.R" in state and "classifier.3.feedback.R" in state  # converted to PFA


def test_unknown_torchvision_model_and_missing_timm_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.name='torchvision.resnet_18'.*no classification model 'resnet_18'"
                                          ".*close matches: torchvision.resnet18"):
        loop.run(_config(tmp_path / "unknown", "model.name=torchvision.resnet_18"), progress=False)
    assert not (tmp_path / "unknown").exists()
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` fails, installed or not
    missing = "model.name='timm.resnet18' needs the timm package.*pip install timm"
    with pytest.raises(ConfigError, match=missing) as info:
        loop.run(_config(tmp_path / "timm", "model.name=timm.resnet18"), progress=False)
    assert isinstance(info.value, ImportError) and not (tmp_path / "timm").exists()


def test_cosine_schedule_warms_up_linearly_then_reaches_min_lr(tmp_path):
    """optim.schedule=cosine, 3 epochs of 3 steps, warmup 1 epoch: the lr of each optimizer step (recorded by a step
    hook) is lr/3, 2lr/3, lr, then the half cosine down to min_lr, which the schedule reaches at the end."""
    lr, min_lr = 0.1, 0.01
    used = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    try:
        loop.run(_config(tmp_path, "train.batch_size=448", "train.epochs=3", "optim.schedule=cosine",
                         f"optim.lr={lr}", f"optim.min_lr={min_lr}", "optim.warmup_epochs=1"), progress=False)
    finally:
        hook.remove()
    cosine = [min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert used == pytest.approx([lr / 3, 2 * lr / 3, lr, *cosine], rel=1e-12)
    assert cosine[-1] > min_lr and all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    assert [r["lr"] for r in _records(tmp_path)] == pytest.approx([used[2], used[5], used[8]])  # each epoch's last
    assert _checkpoint(tmp_path)["scheduler"]["_last_lr"] == pytest.approx([min_lr])


def test_label_smoothing_applies_to_the_training_loss_only(tmp_path):
    """With lr 0 the weights stay as they start, so the epoch's train loss is the mean of
    cross_entropy(label_smoothing=0.2) of the checkpointed model over the epoch's 3 batches, and the validation loss
    plain cross-entropy. The start (model.checkpoint) is a briefly trained network: confident and mostly right, where
    smoothing changes the loss by much (at initialization the outputs are near uniform, and it changes little)."""
    start = models.build(train_config.load("digits"), (1, 8, 8))
    images, labels = data.digits(0)[0].tensors
    optimizer = torch.optim.Adam(start.parameters(), lr=2e-2)
    for _ in range(15):
        optimizer.zero_grad()
        F.cross_entropy(start(images[:256]), labels[:256]).backward()
        optimizer.step()
    torch.save(start.state_dict(), tmp_path / "start.pt")
    config = _config(tmp_path / "run", *EPOCH, "optim.lr=0.0", "optim.label_smoothing=0.2",
                     f"model.checkpoint={tmp_path / 'start.pt'}")
    metrics = loop.run(config, progress=False)
    train_set, val_set = data.digits(config["train"]["seed"])
    model = loop.build_model(config, train_set[0][0])
    model.load_state_dict(_checkpoint(tmp_path / "run")["model"])
    sampler = data.GlobalBatchSampler(len(train_set), 448, 0, 1, config["train"]["seed"])
    smoothed, plain = [], []
    with torch.no_grad():
        for indices in sampler:
            images, labels = train_set[indices]
            logits = model(images)
            smoothed.append(F.cross_entropy(logits, labels, label_smoothing=0.2).item())
            plain.append(F.cross_entropy(logits, labels).item())
        val_loss = F.cross_entropy(model(val_set.tensors[0]), val_set.tensors[1]).item()
    assert metrics["train_loss"] == pytest.approx(statistics.mean(smoothed), rel=1e-6)
    assert abs(statistics.mean(smoothed) - statistics.mean(plain)) > 0.1
    assert metrics["val_loss"] == pytest.approx(val_loss, rel=1e-6)


def test_no_weight_decay_on_norm_layers_and_biases():
    """Norm-layer parameters and biases (also nn.MultiheadAttention's in_proj_bias) in a group with weight decay 0
    that the weight-decay schedule leaves alone; every other parameter, a PFA layer's feedback Z or R included (weight
    decay aligns B R with W), decayed; each parameter in exactly one group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    model = pk.convert(model, mode="pfa", parametrization="explicit", backend="torch")
    model.append(nn.MultiheadAttention(4, 1))  # not run: only its parameters matter here
    names = {id(p): name for name, p in model.named_parameters()}
    assert {"0.feedback.R", "4.feedback.R", "6.feedback.R"} <= set(names.values())
    optim = train_config.load("digits", ["optim.no_weight_decay_norm_bias=true"])["optim"]
    optimizer = optimization.optimizer(model, optim)
    decayed, exempt = ([names[id(p)] for p in group["params"]] for group in optimizer.param_groups)
    assert sorted(exempt) == ["1.bias", "1.weight", "4.bias", "5.bias", "5.weight", "6.bias", "7.in_proj_bias",
                              "7.out_proj.bias"]
    assert sorted(decayed) == ["0.feedback.R", "0.weight", "4.feedback.R", "4.weight", "6.feedback.R", "6.weight",
                               "7.in_proj_weight", "7.out_proj.weight"]
    optimization.set_weight_decay(optimizer, 0.5)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.5, 0.0]
    projected = pk.convert(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), mode="pfa", backend="torch")
    groups = optimization.parameter_groups(projected, True)
    assert [p is projected[0].feedback.Z for p in groups[0]["params"]].count(True) == 1
    assert all(p is not projected[0].feedback.Z for p in groups[1]["params"])
    assert optimization.parameter_groups(projected, False)[0]["params"] == list(projected.parameters())


def test_ema_is_the_moving_average_of_the_weights(tmp_path):
    """train.ema_decay=0.5 over an epoch of 2 steps: the checkpoint's average is 0.5 w1 + 0.5 w2 (the first update
    copies the weights), w1 from a run stopped after one step; it is evaluated beside the model each epoch."""
    common = ["train.batch_size=672", "train.epochs=1", "train.ema_decay=0.5"]  # 1347 // 672 = 2 steps
    loop.run(_config(tmp_path / "one", *common, "train.max_steps=1"), progress=False)
    loop.run(_config(tmp_path / "two", *common), progress=False)
    w1, state = _checkpoint(tmp_path / "one")["model"], _checkpoint(tmp_path / "two")
    w2, ema = state["model"], state["ema"]["module"]
    assert state["ema"]["n_averaged"] == 2 and ema.keys() == w2.keys()
    for key, value in w2.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(ema[key], 0.5 * w1[key] + 0.5 * value, rtol=1e-6, atol=1e-7, msg=key)
        else:  # a feedback's seed and checksum
            assert ema[key] == value, key
    assert not torch.allclose(ema["0.weight"], w2["0.weight"])
    record = _records(tmp_path / "two")[0]
    assert {"ema_val_loss", "ema_val_top1", "ema_val_top5"} <= record.keys()
    assert record["ema_val_loss"] != record["val_loss"]


def test_eval_reproduces_the_last_epochs_validation_metrics(tmp_path, capsys):
    """--eval checkpoint.pt prints (and writes to checkpoint.eval.json) the validation metrics, and those of the
    weight average, that the training run recorded for its last epoch."""
    loop.run(_config(tmp_path, "train.batch_size=448", "train.epochs=2", "train.ema_decay=0.9"), progress=False)
    last = _records(tmp_path)[-1]
    capsys.readouterr()
    assert main(["--eval", str(tmp_path / loop.CHECKPOINT), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["epochs_completed"], printed["step"]) == (2, 6)
    for key in ("val_top1", "val_top5", "val_samples", "ema_val_top1", "ema_val_top5"):
        assert printed[key] == last[key], key
    for key in ("val_loss", "ema_val_loss"):
        assert printed[key] == pytest.approx(last[key], rel=1e-9), key
    written = json.loads((tmp_path / "checkpoint.eval.json").read_text())
    assert {key: written[key] for key in printed} == printed


def test_best_checkpoint_holds_the_epoch_with_the_best_val_top1(tmp_path, monkeypatch):
    """Validation top-1 of 40, 60, 50 (scripted; the real evaluation runs): best.pt is the state after epoch 1, and
    checkpoint.pt the one after epoch 2. log.keep_best=false writes no best.pt."""
    scripted, evaluated = iter([40.0, 60.0, 50.0]), []
    real_evaluate = loop.evaluate

    def scripted_evaluate(model, *args, **kwargs):
        evaluated.append(copy.deepcopy(model.state_dict()))
        return {**real_evaluate(model, *args, **kwargs), "val_top1": next(scripted)}

    monkeypatch.setattr(loop, "evaluate", scripted_evaluate)
    loop.run(_config(tmp_path / "run", "train.batch_size=448", "train.epochs=3"), progress=False)
    best, last = _checkpoint(tmp_path / "run", "best.pt"), _checkpoint(tmp_path / "run")
    assert best["best"] == last["best"] == {"epoch": 1, "val_top1": 60.0}
    assert (best["epoch"], best["step"]) == (2, 6) and (last["epoch"], last["step"]) == (3, 9)
    assert _same_state(best["model"], evaluated[1]) and _same_state(last["model"], evaluated[2])
    assert not _same_state(best["model"], last["model"])
    monkeypatch.undo()
    loop.run(_config(tmp_path / "off", *EPOCH, "log.keep_best=false"), progress=False)
    assert (tmp_path / "off" / loop.CHECKPOINT).exists() and not (tmp_path / "off" / "best.pt").exists()


def test_epoch_summary_prints_one_line_per_epoch(tmp_path, capsys):
    loop.run(_config(tmp_path / "on", "train.batch_size=448", "train.epochs=2"), progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for epoch, (line, record) in enumerate(zip(lines, _records(tmp_path / "on"), strict=True)):
        assert line.startswith(f"epoch {epoch} ({epoch + 1}/2) | train loss {record['train_loss']:.4f} ")
        assert f"val loss {record['val_loss']:.4f} top-1 {record['val_top1']:.2f}%" in line
        assert f"lr {record['lr']:.4g}" in line
    loop.run(_config(tmp_path / "off", "train.batch_size=448", "train.epochs=2", "log.epoch_summary=false"),
             progress=False)
    assert capsys.readouterr().out == ""


def _resnet50_like_layers():
    """60 layer names of a ResNet-50 with 8 blocks in its third stage: conv1, layer1-4 (3 convs a block, a
    downsample in each first block), fc."""
    names = ["conv1"]
    for stage, blocks in enumerate((3, 4, 8, 3), start=1):
        for block in range(blocks):
            names += [f"layer{stage}.{block}.conv{i}" for i in (1, 2, 3)]
            names += [f"layer{stage}.0.downsample.0"] if block == 0 else []
    return [*names, "fc"]


def test_plots_show_loss_and_lr_and_group_many_layers_by_stage(tmp_path, monkeypatch):
    """plots.write on a 3-epoch history of 60 layers: loss.png holds the train and val loss, lr.png the lr and weight
    decay, and alignment.png one median curve (with a min-max band) per stage beside every layer at the last epoch."""
    from matplotlib.figure import Figure

    names = _resnet50_like_layers()
    assert len(names) == 60
    records = [{"epoch": epoch, "train_loss": 2.0 - epoch, "val_loss": 2.5 - epoch, "train_top1": 10.0 + epoch,
                "val_top1": 12.0 + epoch, "val_top5": 50.0 + epoch, "lr": 0.1 / 10 ** epoch,
                "weight_decay": 1e-2 if epoch == 0 else 1e-3,
                "layers": [{"layer": name, "path_alignment": 80.0 - epoch * 10 + (index * 7) % 13}
                           for index, name in enumerate(names)]} for epoch in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = {}
    real_savefig = Figure.savefig

    def recording_savefig(figure, path, *args, **kwargs):
        # Per axis, its lines as (label, y values); matplotlib labels unlabelled lines "_child<n>".
        drawn[Path(path).name] = [[(line.get_label(), list(line.get_ydata())) for line in axis.get_lines()]
                                  for axis in figure.axes]
        return real_savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    paths = plots.write(tmp_path)
    assert paths == [tmp_path / name for name in plots.FILES] and all(p.stat().st_size > 0 for p in paths)
    assert drawn["loss.png"] == [[("train loss", [2.0, 1.0, 0.0]), ("val loss", [2.5, 1.5, 0.5])]]
    (lr_axis, decay_axis) = drawn["lr.png"]
    assert lr_axis == [("lr (last step of the epoch)", pytest.approx([0.1, 0.01, 0.001]))]
    assert decay_axis == [("weight decay", [1e-2, 1e-3, 1e-3])]

    kind, curves = plots.alignment_curves(records)
    stages = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert kind == "stages" and list(curves) == stages
    for stage in stages:
        members = [[row["path_alignment"] for row in r["layers"] if row["layer"].split(".")[0] == stage]
                   for r in records]
        assert curves[stage] == tuple([f(values) for values in members] for f in (statistics.median, min, max))
    band_axis, profile_axis = drawn["alignment.png"]
    assert band_axis == [(stage, curves[stage][0]) for stage in stages]  # the medians; bands are not lines
    profile, *separators = profile_axis
    assert profile[1] == [row["path_alignment"] for row in records[-1]["layers"]]
    assert len(separators) == len(stages) - 1  # a vertical line between consecutive stages
    few = [{**r, "layers": r["layers"][:plots.STAGE_THRESHOLD]} for r in records]
    assert plots.alignment_curves(few)[0] == "layers" and len(plots.alignment_curves(few)[1]) == 12


def test_fsdp_needs_two_processes(tmp_path):
    with pytest.raises(ConfigError, match="train.fsdp=true .*needs 2 or more.*this run has 1"):
        loop.run(_config(tmp_path / "run", *EPOCH, "train.fsdp=true"), progress=False)
    assert not (tmp_path / "run").exists()


def test_fsdp_two_processes_equal_one(tmp_path):
    """train.fsdp=true with 2 gloo processes, one epoch of 3 steps of 448 (224 per rank) == 1 process with batch 448:
    the gathered weights in the checkpoint, the epoch's metrics, and rank 0's per-layer path alignment (from its
    whole copy of the model)."""
    overrides = ["train.batch_size=448", "train.epochs=1", "rule.mode=pfa", "rule.backend=torch"]
    torch.multiprocessing.spawn(train_digits_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "fsdp"),
                                                    [*overrides, "train.fsdp=true"]), nprocs=2)
    single_metrics = loop.run(train_config.load("digits", [f"log.dir={tmp_path / 'single'}", *overrides]),
                              progress=False)
    rows = assert_distributed_run_equals_single(tmp_path / "fsdp", tmp_path / "single", single_metrics)["layers"]
    assert single_metrics["step"] == 3
    assert [row["layer"] for row in rows] == [row["layer"] for row in single_metrics["layers"]]
    for row, expected in zip(rows, single_metrics["layers"], strict=True):
        assert row["path_alignment"] == pytest.approx(expected["path_alignment"], rel=1e-5)


@pytest.mark.parametrize("optimizer, density, expected", [
    ("sgd", "1.0", "projected"),
    ("sgd", "[1.0, 0.5]", "explicit"),  # a masked R: the layers' auto keeps it explicit instead of raising
    ("adam", "1.0", "explicit"),
])
def test_rule_parametrization_auto_follows_the_optimizer_and_the_mask(tmp_path, optimizer, density, expected):
    config = _config(tmp_path, f"optim.name={optimizer}", f"rule.feedback_density={density}")
    model = loop.apply_rule(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), config)
    layers = [m for m in model.modules() if isinstance(m, pk.nn.PFA_LAYERS)]
    assert len(layers) == 2 and {layer.parametrization for layer in layers} == {expected}
