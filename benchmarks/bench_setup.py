"""What a user waits for before the first step: pk.convert's time, and backend="auto"'s first-step measurement.

    python benchmarks/bench_setup.py --models resnet18,resnet50 --parametrizations projected   # convert time
    python benchmarks/bench_setup.py --steps 6 --models resnet18 --parametrizations explicit,projected

With --steps N, trains N SGD steps (batch 16, 112x112, 10 classes) after converting and prints the first step, the
median of the later ones, and the same in a child process under PFA_KERNELS_DISPATCH=static. Each row runs in a
fresh process (the dispatch cache and the allocator start empty). Nothing else should run on the machine.

    python benchmarks/bench_setup.py --arithmetic --models resnet50,vit_b_16   # what a projected conversion must do

With --arithmetic, counts instead what the initial projections of a model's layers (r = 10, no conversion) compute:
the multiply-adds of M = B_j B_j^T as projection.py forms it (its blocks on and below the diagonal) and at the least
any symmetric product needs (n (n + 1) / 2 entries), of B_j R_j, and the values drawn; and the time of the least
multiply-adds at this machine's float32 GEMM rate, measured here on one ResNet-50-sized M: a floor for these
products on this machine, before any draw or factorization.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_layers, for --arithmetic


def _one(model_name: str, parametrization: str, steps: int) -> dict:
    import torch
    import torchvision

    import pfa_kernels as pk
    from pfa_kernels import uniform_draw

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10)
    start = time.perf_counter()
    pk.convert(model, expand_ratio=10, parametrization=parametrization)
    row = {"model": model_name, "parametrization": parametrization, "dispatch": pk.dispatch.mode(),
           "convert_s": round(time.perf_counter() - start, 2), "draw": uniform_draw.route()}
    if steps:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images, labels = torch.randn(16, 3, 112, 112), torch.randint(0, 10, (16,))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        row.update(first_step_s=round(times[0], 2), later_step_s=round(statistics.median(times[1:]), 3),
                   keys=len(pk.dispatch.table()))
    return row


def _arithmetic(model_name: str, expand_ratio: float = 10) -> dict:
    """The multiply-adds of a projected conversion at expand_ratio: M (as formed: its lower blocks), M_least (its
    n (n + 1) / 2 entries), BR (B_j R_j), and the values drawn (B and R_0)."""
    from bench_layers import distinct_layer_specs

    from pfa_kernels import projection
    from pfa_kernels.feedback_options import mid_channels_for

    M_macs = M_least = BR_macs = drawn = 0
    for spec in distinct_layer_specs(model_name, 224):
        groups, count = spec.groups, len(spec.names)
        mid_per_group = mid_channels_for(spec.out_channels, expand_ratio, groups) // groups
        rows = spec.out_channels // groups if groups > 1 else spec.out_channels  # grouped feedback for groups > 1
        columns = spec.in_channels // groups * math.prod(spec.kernel_size or (1,))
        lower = sum((row_block.stop - row_block.start) * (column_block.stop - column_block.start)
                    for row_block, column_block in projection.symmetric_blocks(rows))
        M_macs += count * groups * lower * mid_per_group
        M_least += count * groups * rows * (rows + 1) // 2 * mid_per_group
        BR_macs += count * groups * rows * mid_per_group * columns
        drawn += count * groups * mid_per_group * (rows + columns)
    return {"M": M_macs, "M_least": M_least, "BR": BR_macs, "drawn": drawn}


def _gemm_gflops() -> float:
    """float32 GEMM rate of this machine on a ResNet-50-sized M = B B^T (2048 x 20480), best of 3."""
    import torch

    B = torch.randn(2048, 20480)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        B @ B.T
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 2048 * 20480 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--parametrizations", default="projected")
    parser.add_argument("--steps", type=int, default=0, help="SGD steps after converting (0: convert time only)")
    parser.add_argument("--arithmetic", action="store_true", help="count the conversion's arithmetic instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arithmetic:
        rate = _gemm_gflops()
        for model_name in args.models.split(","):
            counts = _arithmetic(model_name)
            floor = 2 * (counts["M_least"] + counts["BR"]) / (rate * 1e9)
            print(json.dumps({"model": model_name, **{f"{key}_TMAC": round(counts[key] / 1e12, 3)
                                                      for key in ("M", "M_least", "BR")},
                              "values_drawn_G": round(counts["drawn"] / 1e9, 3), "gemm_GFLOPs": round(rate),
                              "gemm_floor_s": round(floor, 1)}))
        return
    if args.child:
        model_name, parametrization = args.child.split(":")
        print(json.dumps(_one(model_name, parametrization, args.steps)))
        return
    modes = ("measure", "static") if args.steps else ("measure",)
    for model_name in args.models.split(","):
        for parametrization in args.parametrizations.split(","):
            for mode in modes:
                env = {**os.environ, "PFA_KERNELS_DISPATCH": mode}
                output = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child",
                                         f"{model_name}:{parametrization}"], env=env, capture_output=True, text=True,
                                        check=True).stdout
                print(output.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
