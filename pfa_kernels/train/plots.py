"""PNG plots of a run folder's metrics.jsonl, per epoch: accuracy, loss, learning rate, and the alignment of each
PFA layer's feedback with its weights. Above STAGE_THRESHOLD layers the alignment plot shows each stage's median and
min-max band (a ResNet-50 has 54 layers), and beside it every layer's angle at the last epoch, in model order."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

FILES = ("accuracy.png", "loss.png", "lr.png", "alignment.png")
# More layers than this: one curve per stage instead of one per layer.
STAGE_THRESHOLD = 12
_INDEX = re.compile(r"\d+$")


def stage_of(layer: str) -> str:
    """The stage a layer belongs to: its name up to the first part that ends in a number ("layer3.1.conv2" ->
    "layer3", "features.4.0.block.1.0" -> "features.4", "blocks.7.attn.qkv" -> "blocks.7", "fc" -> "fc")."""
    parts = layer.split(".")
    for index, part in enumerate(parts):
        if _INDEX.search(part):
            return ".".join(parts[:index + 1])
    return layer


def alignment_curves(records: list[dict]) -> tuple[str, dict]:
    """("layers", {layer: [angle per epoch]}) up to STAGE_THRESHOLD layers, else ("stages", {stage: (median, min,
    max) per epoch}), stages in model order. Epochs without the layer report are skipped."""
    records = [r for r in records if r.get("layers")]
    if not records:
        return "layers", {}
    names = [row["layer"] for row in records[-1]["layers"]]
    angles = [{row["layer"]: row["path_alignment"] for row in r["layers"]} for r in records]
    if len(names) <= STAGE_THRESHOLD:
        return "layers", {name: [a.get(name, float("nan")) for a in angles] for name in names}
    stages = {}
    for name in names:
        stages.setdefault(stage_of(name), []).append(name)
    curves = {}
    for stage, members in stages.items():
        per_epoch = [[a[m] for m in members if m in a] for a in angles]
        curves[stage] = tuple([f(values) if values else float("nan") for values in per_epoch]
                              for f in (statistics.median, min, max))
    return "stages", curves


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = _records(run_dir)
    epochs = [r["epoch"] for r in records]
    paths = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(run_dir / name, dpi=120)
        plt.close(figure)
        paths.append(run_dir / name)

    def curves(axis, keys_labels):
        for key, label in keys_labels:
            if all(key in r for r in records):
                axis.plot(epochs, [r[key] for r in records], marker="o", markersize=3, label=label)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)

    figure, axis = plt.subplots(figsize=(5, 3.5))
    curves(axis, [("train_top1", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5"),
                  ("ema_val_top1", "EMA val top-1")])
    axis.set_ylabel("accuracy (%)")
    save(figure, "accuracy.png")

    figure, axis = plt.subplots(figsize=(5, 3.5))
    curves(axis, [("train_loss", "train loss"), ("val_loss", "val loss"), ("ema_val_loss", "EMA val loss")])
    axis.set_ylabel("cross-entropy")
    save(figure, "loss.png")

    figure, axis = plt.subplots(figsize=(5, 3.5))
    rates = [r["lr"] for r in records]
    axis.plot(epochs, rates, marker="o", markersize=3, label="lr (last step of the epoch)")
    if rates and min(rates) > 0 and max(rates) / min(rates) > 20:
        axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("learning rate")
    if any("weight_decay" in r for r in records):
        twin = axis.twinx()
        twin.plot(epochs, [r.get("weight_decay", float("nan")) for r in records], color="tab:gray",
                  linestyle="--", label="weight decay")
        twin.set_ylabel("weight decay")
        lines = axis.get_legend_handles_labels(), twin.get_legend_handles_labels()
        axis.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8)
    save(figure, "lr.png")

    kind, alignment = alignment_curves(records)
    with_layers = [r for r in records if r.get("layers")]
    layer_epochs = [r["epoch"] for r in with_layers]
    if kind == "layers":
        figure, axis = plt.subplots(figsize=(6, 4))
        for name, values in alignment.items():
            axis.plot(layer_epochs, values, label=name)
        if alignment:
            axis.legend(fontsize=6)
        axis.set_xlabel("epoch")
        axes = [axis]
    else:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
        axis, profile = axes
        for stage, (median, low, high) in alignment.items():
            line, = axis.plot(layer_epochs, median, label=stage)
            axis.fill_between(layer_epochs, low, high, color=line.get_color(), alpha=0.15)
        axis.legend(fontsize=6, ncol=1 + len(alignment) // 12)
        axis.set_title("per stage: median and min-max band", fontsize=9)
        axis.set_xlabel("epoch")
        last = with_layers[-1]
        profile.plot(range(len(last["layers"])), [row["path_alignment"] for row in last["layers"]], marker=".")
        starts = {}
        for index, row in enumerate(last["layers"]):
            starts.setdefault(stage_of(row["layer"]), index)
        for index in list(starts.values())[1:]:
            profile.axvline(index - 0.5, color="0.85", linewidth=0.8)
        profile.set_xlabel("layer, in model order (lines between stages)")
        profile.set_title(f"every layer at epoch {last['epoch']}", fontsize=9)
    for axis in axes:
        axis.set_ylabel("alignment of W_fb with W (degrees)")
    save(figure, "alignment.png")
    return paths
