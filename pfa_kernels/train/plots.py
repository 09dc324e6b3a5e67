"""PNG plots of a run folder's metrics.jsonl: accuracy per epoch, and per-layer alignment per epoch."""

from __future__ import annotations

import json
from pathlib import Path


def write(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(epochs, [r["train_top1"] for r in records], marker="o", label="train top-1")
    axis.plot(epochs, [r["val_top1"] for r in records], marker="o", label="val top-1")
    axis.plot(epochs, [r["val_top5"] for r in records], marker="o", label="val top-5")
    axis.set_xlabel("epoch")
    axis.set_ylabel("accuracy (%)")
    axis.legend()
    figure.tight_layout()
    accuracy_path = run_dir / "accuracy.png"
    figure.savefig(accuracy_path, dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    layer_names = [row["layer"] for row in records[-1].get("layers", [])]
    for name in layer_names:
        values = [next(row["path_alignment"] for row in r["layers"] if row["layer"] == name) for r in records]
        axis.plot(epochs, values, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("alignment of W_fb with W (degrees)")
    if 0 < len(layer_names) <= 12:
        axis.legend(fontsize=6)
    figure.tight_layout()
    alignment_path = run_dir / "alignment.png"
    figure.savefig(alignment_path, dpi=120)
    plt.close(figure)
    return [accuracy_path, alignment_path]
