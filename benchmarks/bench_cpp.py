"""Compiled backend vs PyTorch backend on CPU: the fused linear sequence kernel, and whole PFA layer backward.

    python benchmarks/bench_cpp.py [--rounds 20]

Ratios cpp / torch, timed side by side (interleaved rounds, torch.utils.benchmark). The linear sequence
path is dL/dx = (g·B)·R: torch forms g·B (an activation-sized P x C_mid tensor) with two MKL GEMMs; the
compiled kernel never stores g·B but uses plain loops (no MKL), so it trades memory for arithmetic speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import pfa_kernels as pk  # noqa: E402

# (label, P rows, C_out, expand_ratio, C_in): a small-batch linear layer, where the planner takes the sequence
# order (ResNet's fc head and a transformer MLP block at batch 8).
SHAPES = [("fc 512->1000, batch 16", 16, 1000, 10, 512), ("mlp 768->3072, batch 8", 8, 3072, 1, 768),
          ("linear 1024->1024, batch 8", 8, 1024, 10, 1024)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    if "cpp" not in pk.dispatch.available_backends("cpu"):
        raise SystemExit("the compiled extension is not built: run `make setup`")
    device = torch.device("cpu")
    print(f"{torch.get_num_threads()} threads; ratio = cpp time / torch time (median of {args.rounds} rounds)")
    print(f"{'shape':<28} {'fused kernel':>13} {'layer backward (sequence)':>27}")
    for label, rows, out_features, expand_ratio, in_features in SHAPES:
        kernel_ratio, layer_ratio = _ratios(rows, out_features, expand_ratio, in_features, args.rounds, device)
        print(f"{label:<28} {kernel_ratio:>13.2f} {layer_ratio:>27.2f}")


def _ratios(rows, out_features, expand_ratio, in_features, rounds, device):
    mid = out_features * expand_ratio
    g, B, R = torch.randn(rows, out_features), torch.randn(out_features, mid), torch.randn(mid, in_features)
    layers = {backend: pk.PFALinear(in_features, out_features, expand_ratio=expand_ratio, strategy="sequence",
                                    backend=backend, feedback_seed=0) for backend in ("torch", "cpp")}
    x = torch.randn(rows, in_features, requires_grad=True)
    grad_output = torch.randn(rows, out_features)

    def layer_step(layer):
        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad_output)
        return step

    samples = harness.time_interleaved({
        "kernel torch": lambda: (g @ B) @ R,
        "kernel cpp": lambda: torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R),
        "layer torch": layer_step(layers["torch"]), "layer cpp": layer_step(layers["cpp"])}, rounds, device)
    median = {name: harness.summarize(values)["median_ms"] for name, values in samples.items()}
    return median["kernel cpp"] / median["kernel torch"], median["layer cpp"] / median["layer torch"]


if __name__ == "__main__":
    main()
