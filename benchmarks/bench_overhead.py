"""Per-call cost of a PFA layer where the arithmetic is tiny: a 64x64 linear layer's forward and backward, and a
converted ResNet-18 in eval at batch 1, each against nn in the same process (one thread, medians of 5 runs).

    python benchmarks/bench_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision

import pfa_kernels as pk


def _microseconds(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(64, 64, requires_grad=True)
    layers = {"nn": torch.nn.Linear(64, 64), "pfa explicit": pk.PFALinear(64, 64),
              "pfa projected": pk.PFALinear(64, 64, parametrization="projected")}
    baseline = None
    for name, layer in layers.items():
        cost = _microseconds(lambda layer=layer: layer(x).sum().backward(), 1000)
        baseline = baseline or cost
        print(f"64x64 forward+backward, {name}: {cost:.0f} us ({cost / baseline:.2f}x nn)")
    model = torchvision.models.resnet18().eval()
    converted = pk.convert(torchvision.models.resnet18(), parametrization="projected").eval()
    converted.load_state_dict(model.state_dict(), strict=False)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = _microseconds(lambda: model(image), 20)
        pfa = _microseconds(lambda: converted(image), 20)
    print(f"ResNet-18 eval, batch 1: nn {plain / 1000:.1f} ms, PFA {pfa / 1000:.1f} ms ({pfa / plain:.3f}x)")


if __name__ == "__main__":
    main()
