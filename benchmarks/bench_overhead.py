"""Per-call cost of a PFA layer where the arithmetic is tiny: a 64x64 linear layer's forward and backward, and a
converted ResNet-18 in eval at batch 1, each against nn in the same process (one thread). The candidates are timed
in interleaved rounds (each round times every one once), so a slow spell of the machine falls on all of them alike,
and each figure is the fastest round: interference only ever adds time (as timeit's documentation advises), and on
this shared machine the median of a candidate moves by up to 1.6x from one run to the next.

    python benchmarks/bench_overhead.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import pfa_kernels as pk


def _interleaved_microseconds(fns: dict, calls: int, rounds: int) -> dict:
    """Microseconds per call of each function in its fastest round, timed round-robin."""
    for fn in fns.values():
        for _ in range(min(50, calls)):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: min(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(64, 64, requires_grad=True)
    layers = {"nn": torch.nn.Linear(64, 64), "pfa auto (projected)": pk.PFALinear(64, 64),
              "pfa explicit": pk.PFALinear(64, 64, parametrization="explicit")}

    # Gradients accumulate across calls (as in gradient accumulation): the timed work is the layer's alone.
    costs = _interleaved_microseconds({name: lambda layer=layer: layer(x).sum().backward()
                                       for name, layer in layers.items()}, 500, args.rounds)
    for name, cost in costs.items():
        print(f"64x64 forward+backward, {name}: {cost:.0f} us ({cost / costs['nn']:.2f}x nn)")
    model = torchvision.models.resnet18().eval()
    converted = pk.convert(torchvision.models.resnet18()).eval()
    converted.load_state_dict(model.state_dict(), strict=False)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        eval_costs = _interleaved_microseconds({"nn": lambda: model(image), "pfa": lambda: converted(image)}, 10,
                                               args.rounds)
    plain, pfa = eval_costs["nn"], eval_costs["pfa"]
    print(f"ResNet-18 eval, batch 1: nn {plain / 1000:.1f} ms, PFA {pfa / 1000:.1f} ms ({pfa / plain:.3f}x)")


if __name__ == "__main__":
    main()
