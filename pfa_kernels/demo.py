"""Demo: BP, PFA, PFA-o and Kolen-Pollack on scikit-learn's bundled 8x8 digits (no download).

    python -m pfa_kernels.demo [--epochs 20] [--output-dir demo_output]

Trains the same small CNN (same initial weights) with each rule, using the paper's recipe: SGD with
momentum 0.9 and a large weight decay for the first epochs, then a small one. Prints a table (test
accuracy, final path alignment and norm ratio, seconds per epoch) and writes a PNG plot of test
accuracy and path alignment per epoch, plus the numbers as JSON.

The PFA rules use the projected parametrization, the recommended one for SGD training: it is the same
learning rule as an explicit R (exactly, for SGD; docs/design.md section 2.4) at backpropagation's cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import pfa_kernels as pk

# name -> pk.convert keyword arguments (None: plain backpropagation)
METHODS = {
    "BP": None,
    "PFA (r=10)": dict(expand_ratio=10, feedback_init="random", parametrization="projected"),
    "PFA-o": dict(expand_ratio=1, feedback_init="orthogonal", parametrization="projected"),
    "KP": dict(expand_ratio=1, feedback_init="identity", parametrization="projected"),
}


def load_data(seed: int = 0):
    """Digits as float tensors: (x_train (N, 1, 8, 8), y_train (N,), x_test, y_test); pixels scaled to [0, 1]."""
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.25, random_state=seed,
                                                        stratify=digits.target)
    as_images = lambda a: torch.from_numpy(a).unsqueeze(1)  # noqa: E731
    return as_images(x_train), torch.from_numpy(y_train), as_images(x_test), torch.from_numpy(y_test)


def small_cnn() -> nn.Sequential:
    """Two convs (the second strided) and a two-layer head: 8x8x1 -> 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def weight_decay_for(epoch: int, large_epochs: int, large: float, small: float) -> float:
    return large if epoch < large_epochs else small


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * correct


def mean_alignment(model):
    rows = pk.metrics.report(model)
    if not rows:
        return None, None
    return (float(np.mean([r["path_alignment"] for r in rows])), float(np.mean([r["norm_ratio"] for r in rows])))


def train_one(name, layer_kwargs, data, args, progress):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = small_cnn()  # the same initial weights for every method
    if layer_kwargs is not None:
        model = pk.convert(model, **layer_kwargs)
    optimizer = pk.check_optimizer(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), model)
    generator = torch.Generator().manual_seed(args.seed)
    history = {"accuracy": [], "alignment": [], "norm_ratio": [], "epoch_seconds": []}
    for epoch in range(args.epochs):
        for group in optimizer.param_groups:
            group["weight_decay"] = weight_decay_for(epoch, args.large_wd_epochs, args.large_wd, args.small_wd)
        start = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order.split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history["epoch_seconds"].append(time.perf_counter() - start)
        history["accuracy"].append(accuracy(model, x_test, y_test))
        alignment, ratio = mean_alignment(model)
        history["alignment"].append(alignment)
        history["norm_ratio"].append(ratio)
        progress.set_postfix(method=name, acc=f"{history['accuracy'][-1]:.1f}")
        progress.update(1)
    return history


def format_table(results) -> str:
    header = f"{'method':<12} {'test acc (%)':>12} {'path align (deg)':>17} {'norm ratio':>11} {'s/epoch':>8}"
    lines = [header, "-" * len(header)]
    for name, history in results.items():
        alignment = "-" if history["alignment"][-1] is None else f"{history['alignment'][-1]:.1f}"
        ratio = "-" if history["norm_ratio"][-1] is None else f"{history['norm_ratio'][-1]:.3f}"
        seconds = float(np.mean(history["epoch_seconds"]))
        lines.append(f"{name:<12} {history['accuracy'][-1]:>12.1f} {alignment:>17} {ratio:>11} {seconds:>8.3f}")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_acc, ax_align) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in results.items():
        epochs = range(1, len(history["accuracy"]) + 1)
        ax_acc.plot(epochs, history["accuracy"], label=name)
        if history["alignment"][-1] is not None:
            ax_align.plot(epochs, history["alignment"], label=name)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Digits: test accuracy")
    ax_align.set(xlabel="epoch", ylabel="mean path alignment (degrees)", title="angle between W and B·R")
    for axis in (ax_acc, ax_align):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--large-wd", type=float, default=1e-2, help="weight decay of the first epochs")
    parser.add_argument("--large-wd-epochs", type=int, default=5)
    parser.add_argument("--small-wd", type=float, default=1e-3, help="weight decay afterwards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    args = parser.parse_args(argv)

    data = load_data(args.seed)
    results = {}
    with tqdm(total=args.epochs * len(METHODS), desc="training", unit="epoch") as progress:
        for name, layer_kwargs in METHODS.items():
            results[name] = train_one(name, layer_kwargs, data, args, progress)

    table = format_table(results)
    print(f"\nDigits 8x8 ({len(data[0])} train / {len(data[2])} test), {args.epochs} epochs, SGD momentum 0.9, "
          f"weight decay {args.large_wd} for {args.large_wd_epochs} epochs then {args.small_wd}")
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plot(results, args.output_dir / "digits_demo.png")
    (args.output_dir / "digits_demo.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.output_dir / 'digits_demo.png'} and {args.output_dir / 'digits_demo.json'}")
    return results


if __name__ == "__main__":
    main()
