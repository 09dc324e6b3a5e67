"""Whole training step (forward, cross-entropy, backward, SGD step) of any torchvision classification model
(--models resnet18,resnet50,mobilenet_v3_small,efficientnet_b0,convnext_tiny,vit_b_16): BP vs PFA implementations vs
the literal algorithm, at one or more expand ratios.

    python benchmarks/bench_model.py [--models resnet18] [--batch 16] [--size 224] [--expand-ratios 1,10,100]
                                     [--impls projected,explicit] [--repeats 5] [--output-dir DIR]

An implementation is "<parametrization>[-<strategy>[-<backend>]]" (projected, explicit, explicit-product,
projected-auto-torch, ...) or "reference" (the literal algorithm; slow: about 17x BP at r = 10). BP is
timed beside every expand ratio's implementations, steps interleaved after a warm-up step each. All
models start from the same weights; SGD with momentum 0.9 and weight decay 1e-4. Writes model.jsonl
(images/s, peak memory, ratio to BP, and the cost model's MACs (the floor: PFA's conv and linear
multiply-adds over BP's) and H100 roofline time of the conv and linear layers), model.md and model.png
(step time / BP vs expand_ratio) to --output-dir.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layers  # noqa: E402
import cost_model  # noqa: E402
import harness  # noqa: E402

import pfa_kernels as pk  # noqa: E402


def build_model(bp_model: nn.Module, impl: str, expand_ratio: float) -> nn.Module:
    if impl == "bp":
        return copy.deepcopy(bp_model)
    parametrization, strategy, backend = (("explicit", "reference", "auto") if impl == "reference"
                                          else (impl.split("-") + ["auto", "auto"])[:3])
    return pk.convert(copy.deepcopy(bp_model), expand_ratio=expand_ratio, parametrization=parametrization,
                      strategy=strategy, backend=backend, feedback_seed=0)


def model_costs(specs, batch: int, impl: str, expand_ratio: float) -> dict:
    """Cost-model totals over every conv/linear layer of the model (each distinct shape times its count)."""
    totals = {"macs": 0, "bytes": 0, "h100_ms": 0.0}
    for spec in specs:
        layer = cost_model.costs(spec, batch, impl, expand_ratio)
        for key in totals:
            totals[key] += layer[key] * len(spec.names)
    return totals


def training_step_fn(model, optimizer, images, labels):
    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return step


def bench(model_name: str, expand_ratio: float, impls: list[str], args, device) -> list[dict]:
    torch.manual_seed(0)
    kwargs = {"image_size": args.size} if model_name.startswith("vit") else {}  # ViT's position embedding
    bp_model = getattr(torchvision.models, model_name)(**kwargs).to(device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    steps = {}
    for impl in ["bp", *impls]:
        model = build_model(bp_model, impl, expand_ratio)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        pk.check_optimizer(optimizer, model)
        steps[impl] = training_step_fn(model, optimizer, images, labels)
    samples = harness.time_interleaved(steps, args.repeats, device)
    specs = bench_layers.distinct_layer_specs(model_name, args.size)
    bp_median = harness.summarize(samples["bp"])["median_ms"]
    bp_costs = model_costs(specs, args.batch, "bp", expand_ratio)
    records = []
    for impl, step in steps.items():
        summary = harness.summarize(samples[impl])
        costs = model_costs(specs, args.batch, impl, expand_ratio)
        records.append({
            "benchmark": "train_step", "shape": f"{model_name} {args.size}x{args.size}", "model": model_name,
            "impl": impl, "dtype": "float32", "batch": args.batch, "expand_ratio": expand_ratio, **summary,
            "images_per_s": args.batch / (summary["median_ms"] / 1e3), "peak_mb": harness.peak_memory_mb(step, device),
            "ratio_vs_bp": summary["median_ms"] / bp_median, **costs,
            "h100_ratio_vs_bp": costs["h100_ms"] / bp_costs["h100_ms"],
            # The floor on this CPU, where the GEMMs are compute-bound: conv and linear multiply-adds over BP's.
            "macs_ratio_vs_bp": costs["macs"] / bp_costs["macs"],
        })
    return records


def write_report(records: list[dict], output_dir: Path, env: dict) -> None:
    columns = [("shape", "model", "s"), ("expand_ratio", "r", "g"), ("impl", "implementation", "s"),
               ("median_ms", "step ms (median)", ".0f"), ("p20_ms", "p20", ".0f"), ("p80_ms", "p80", ".0f"),
               ("images_per_s", "images/s", ".1f"), ("peak_mb", "peak MB", ".0f"),
               ("ratio_vs_bp", "time / BP (CPU)", ".2f"), ("macs_ratio_vs_bp", "floor: MACs / BP", ".2f"),
               ("h100_ratio_vs_bp", "conv+linear / BP (H100 roofline)", ".2f")]
    first = records[0]
    text = (f"Training step (forward, backward, SGD step), batch {first['batch']}, float32, {env['threads']} threads "
            f"on {env['device']} ({env['machine']}), torch {env['torch']}; medians of interleaved steps. The last "
            f"column is the cost model's roofline for an H100 (bf16 989.4 TFLOP/s, 3.35 TB/s), conv and linear "
            f"layers only.\n\n")
    (output_dir / "model.md").write_text(text + harness.markdown_table(records, columns) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for (model, impl) in dict.fromkeys((r["shape"], r["impl"]) for r in records):
        points = sorted((r["expand_ratio"], r["ratio_vs_bp"]) for r in records
                        if r["shape"] == model and r["impl"] == impl)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{model}: {impl}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("expand_ratio r")
    axis.set_ylabel("training step time / BP")
    axis.set_title(f"PFA training step vs BP, batch {first['batch']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "model.png", dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--expand-ratios", default="10")
    parser.add_argument("--impls", default="projected,explicit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = [impl for impl in args.impls.split(",") if impl != "bp"]
    env = harness.environment()
    records = []
    for model_name in args.models.split(","):
        for expand_ratio in (float(r) for r in args.expand_ratios.split(",")):
            print(f"{model_name}, r = {expand_ratio:g}: timing bp, {', '.join(impls)}", file=sys.stderr)
            measured = [{**record, **env} for record in bench(model_name, expand_ratio, impls, args, device)]
            records += measured
            # Written after every model (model.jsonl is appended to): a later one that runs out of memory
            # (ViT-B/16 explicit at r = 10 needs more than 24 GB beside its BP and projected twins) loses nothing
            # measured before it.
            harness.write_jsonl(measured, args.output_dir / "model.jsonl")
            write_report(records, args.output_dir, env)
    print((args.output_dir / "model.md").read_text())


if __name__ == "__main__":
    main()
