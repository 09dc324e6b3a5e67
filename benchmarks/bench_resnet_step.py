"""ResNet training step: PFA (fast paths and the literal algorithm) against backpropagation.

    python benchmarks/bench_resnet_step.py [--model resnet18] [--batch 16] [--size 224]
                                           [--expand-ratio 10] [--repeats 5] [--impls projected,explicit]

--impls: comma-separated PFA implementations, each "parametrization[-strategy]": projected, explicit,
explicit-reference (the literal algorithm), projected-sequence, explicit-product, ...

One training step = forward, cross-entropy, backward, SGD step (momentum 0.9, weight decay). All
models start from the same weights; steps are interleaved (BP, PFA, ..., BP, PFA, ...) after one
warm-up step each, so the ratios hold on a noisy machine. Prints median step times and each one's
ratio to BP, and appends one JSON record per implementation to --output (JSON lines).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import pfa_kernels as pk


def training_step(model, optimizer, images, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--expand-ratio", type=float, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="projected,explicit",
                        help="comma-separated PFA implementations to time beside BP: parametrization[-strategy], "
                             "e.g. projected,explicit,explicit-reference")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/resnet_step.jsonl"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    bp_model = getattr(torchvision.models, args.model)()
    models = {"bp": bp_model}
    for impl in args.impls.split(","):
        parametrization, _, strategy = impl.partition("-")
        models[f"pfa-{impl}"] = pk.convert(copy.deepcopy(bp_model), expand_ratio=args.expand_ratio,
                                           parametrization=parametrization, strategy=strategy or "auto",
                                           feedback_seed=0)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                  for name, m in models.items()}
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))

    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up: allocator, oneDNN primitive caches, optimizer state
        training_step(model, optimizers[name], images, labels)
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            training_step(model, optimizers[name], images, labels)
            times[name].append(time.perf_counter() - start)

    bp_median = statistics.median(times["bp"])
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, expand_ratio {args.expand_ratio}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print(f"{'implementation':<24} {'median s':>9} {'min s':>7} {'max s':>7} {'ratio vs BP':>12}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as out:
        for name, samples in times.items():
            median = statistics.median(samples)
            print(f"{name:<24} {median:>9.3f} {min(samples):>7.3f} {max(samples):>7.3f} {median / bp_median:>12.2f}")
            out.write(json.dumps({
                "benchmark": "train_step", "model": args.model, "impl": name, "batch": args.batch,
                "size": args.size, "expand_ratio": args.expand_ratio, "median_s": median, "samples_s": samples,
                "ratio_vs_bp": median / bp_median, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            }) + "\n")


if __name__ == "__main__":
    main()
