"""What a user waits for before the first step: pk.convert's time, and backend="auto"'s first-step measurement.

    python benchmarks/bench_setup.py --models resnet18,resnet50 --parametrizations projected   # convert time
    python benchmarks/bench_setup.py --steps 6 --models resnet18 --parametrizations explicit,projected

With --steps N, trains N SGD steps (batch 16, 112x112, 10 classes) after converting and prints the first step, the
median of the later ones, and the same in a child process under PFA_KERNELS_DISPATCH=static. Each row runs in a
fresh process (the dispatch cache and the allocator start empty). Nothing else should run on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--parametrizations", default="projected")
    parser.add_argument("--steps", type=int, default=0, help="SGD steps after converting (0: convert time only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
