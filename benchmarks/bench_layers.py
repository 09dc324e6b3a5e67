"""Per-layer benchmark: forward + backward of every distinct conv/linear shape of ResNet-18, ResNet-50
(224x224) and ViT-B/16, for BP, the literal algorithm and each available PFA implementation.

    python benchmarks/bench_layers.py [--models resnet18,resnet50,vit_b_16] [--batch 16] [--expand-ratio 10]
                                      [--impls bp,reference,explicit-auto,projected-auto,...] [--rounds 5]
                                      [--size 224] [--max-layers N] [--dtype float32] [--output-dir DIR]

An implementation is "bp" (nn.Conv2d / nn.Linear), "reference" (reference.py, the literal algorithm)
or "<parametrization>-<strategy>[-<backend>]" (default backend "auto"); "all" expands to every
parametrization x strategy x available backend. Each call: y = layer(x); y.backward(g), with x
requiring a gradient. Results: layers.jsonl (one record per layer and implementation, with the
cost model's MACs, bytes and H100 roofline time), layers.md and layers.png (ratio vs BP per layer)
in --output-dir.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import swin_transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost_model  # noqa: E402
import harness  # noqa: E402

import pfa_kernels as pk  # noqa: E402

DEFAULT_IMPLS = "bp,reference,explicit-auto,explicit-product,explicit-sequence,projected-auto,projected-product," \
                "projected-sequence"


def _linear_spec(in_features, out_features, bias, tokens) -> cost_model.LayerSpec:
    return cost_model.LayerSpec("linear", in_features, out_features, bias=bias, input_shape=(*tokens, in_features),
                                output_shape=(*tokens, out_features))


def _attention_specs(module, args) -> list[tuple[str, cost_model.LayerSpec]]:
    """The projections an attention module applies through their weights (pk.convert makes them PFA layers):
    nn.MultiheadAttention's packed in_proj and out_proj (self-attention), torchvision's Swin qkv and proj over the
    windows (the feature map padded to a multiple of the window)."""
    if isinstance(module, nn.MultiheadAttention):
        query = args[0]
        tokens = (query.shape[1] if module.batch_first else query.shape[0],)
        return [("in_proj", _linear_spec(module.embed_dim, 3 * module.embed_dim, module.in_proj_bias is not None,
                                         tokens)),
                ("out_proj", _linear_spec(module.embed_dim, module.embed_dim, module.out_proj.bias is not None,
                                          tokens))]
    _, height, width, channels = args[0].shape
    window = module.window_size
    tokens = (math.ceil(height / window[0]) * window[0] * math.ceil(width / window[1]) * window[1],)
    return [("qkv", _linear_spec(channels, 3 * channels, module.qkv.bias is not None, tokens)),
            ("proj", _linear_spec(channels, channels, module.proj.bias is not None, tokens))]


def distinct_layer_specs(model_name: str, size: int) -> list[cost_model.LayerSpec]:
    """Every distinct Conv2d/Linear shape the model runs (on the meta device: no compute), in order, with the
    projections attention applies through their weights (converted to PFA layers like any other)."""
    # ViT's position embedding fixes its image size: build it for `size` (a multiple of 16).
    kwargs = {"image_size": size} if model_name.startswith("vit") else {}
    with torch.device("meta"):
        model = getattr(torchvision.models, model_name)(**kwargs).eval()  # eval: BatchNorm takes a batch of 1
    seen: dict[cost_model.LayerSpec, list[str]] = {}
    attention = (nn.MultiheadAttention, swin_transformer.ShiftedWindowAttention)  # V2 derives from the first

    def hook(name):
        def record(module, args, output):
            x = args[0]
            if isinstance(module, attention):
                for child, spec in _attention_specs(module, args):
                    seen.setdefault(spec, []).append(f"{model_name}.{name}.{child}")
                return
            if isinstance(module, nn.Conv2d):
                spec = cost_model.LayerSpec("conv2d", module.in_channels, module.out_channels, module.kernel_size,
                                            module.stride, module.padding, module.groups, module.bias is not None,
                                            tuple(x.shape[1:]), tuple(output.shape[1:]))
            else:
                spec = cost_model.LayerSpec("linear", module.in_features, module.out_features, bias=module.bias
                                            is not None, input_shape=tuple(x.shape[1:]),
                                            output_shape=tuple(output.shape[1:]))
            seen.setdefault(spec, []).append(f"{model_name}.{name}")
        return record

    for name, module in model.named_modules():
        # Called layers; attention records its own projections (nn's never calls out_proj, Swin neither qkv nor proj).
        if type(module) in (nn.Conv2d, nn.Linear) or isinstance(module, attention):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return [cost_model.LayerSpec(**{**spec.__dict__, "names": tuple(names)}) for spec, names in seen.items()]


def expand_impls(text: str) -> list[str]:
    impls = []
    for impl in text.split(","):
        if impl == "all":
            backends = pk.dispatch.available_backends("cuda" if torch.cuda.is_available() else "cpu")
            impls += [f"{p}-{s}-{b}" for p in ("explicit", "projected") for s in ("auto", "product", "sequence")
                      for b in backends]
        else:
            impls.append(impl)
    return list(dict.fromkeys(impls))


def build_layer(spec: cost_model.LayerSpec, impl: str, expand_ratio: float, device, dtype) -> nn.Module:
    if spec.kind == "linear":
        args = (spec.in_channels, spec.out_channels, spec.bias)
        plain = nn.Linear(*args, device=device, dtype=dtype)
        pfa_class = pk.PFALinear
    else:
        args = (spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding, 1, spec.groups,
                spec.bias)
        plain = nn.Conv2d(*args, device=device, dtype=dtype)
        pfa_class = pk.PFAConv2d
    if impl == "bp":
        return plain
    parametrization, strategy, backend = ("explicit", "reference", "auto") if impl == "reference" else (
        (impl.split("-") + ["auto"])[:3])
    layer = pfa_class(*args, device=device, dtype=dtype, expand_ratio=expand_ratio, parametrization=parametrization,
                      strategy=strategy, backend=backend, feedback_seed=0)
    layer.load_state_dict(plain.state_dict(), strict=False)
    return layer


def bench_spec(spec, impls, args, device, dtype) -> list[dict]:
    layers = {impl: build_layer(spec, impl, args.expand_ratio, device, dtype) for impl in impls}
    x = torch.randn(args.batch, *spec.input_shape, device=device, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(args.batch, *spec.output_shape, device=device, dtype=dtype)

    def step_for(layer):
        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad_output)
        return step

    steps = {impl: step_for(layer) for impl, layer in layers.items()}
    samples = harness.time_interleaved(steps, args.rounds, device)
    bp_median = harness.summarize(samples["bp"])["median_ms"] if "bp" in samples else None
    records = []
    for impl, step in steps.items():
        summary = harness.summarize(samples[impl])
        records.append({
            "benchmark": "layer_fwd_bwd", "shape": spec.label, "layers": list(spec.names), "impl": impl,
            "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "expand_ratio": args.expand_ratio,
            **summary, "peak_mb": harness.peak_memory_mb(step, device),
            "ratio_vs_bp": summary["median_ms"] / bp_median if bp_median else None,
            **cost_model.costs(spec, args.batch, impl, args.expand_ratio),
        })
    return records


def write_report(records: list[dict], output_dir: Path, env: dict) -> None:
    impls = list(dict.fromkeys(r["impl"] for r in records))
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    by_key = {(r["shape"], r["impl"]): r for r in records}
    rows = []
    for shape in shapes:
        row = {"shape": shape}
        bp = by_key.get((shape, "bp"))
        for impl in impls:
            record = by_key.get((shape, impl))
            if record is not None and bp is not None:
                row[impl] = f"{record['ratio_vs_bp']:.2f} / {record['h100_ms'] / bp['h100_ms']:.2f}"
        rows.append(row)
    columns = [("shape", "layer shape", "s")] + [(impl, impl, "s") for impl in impls if impl != "bp"]
    first = records[0]
    text = (f"Forward + backward time / BP's, per layer shape: batch {first['batch']}, expand_ratio "
            f"{first['expand_ratio']}, {first['dtype']}, {env['threads']} threads on {env['device']} "
            f"({env['machine']}), torch {env['torch']}. Each cell: CPU measured (median of interleaved rounds) / "
            f"H100 predicted (cost-model roofline, bf16 989.4 TFLOP/s, 3.35 TB/s).\n\n")
    (output_dir / "layers.md").write_text(text + harness.markdown_table(rows, columns) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [impl for impl in impls if impl != "bp"]
    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(shapes) * max(1, len(shown)) / 2), 4.5))
    width = 0.8 / max(1, len(shown))
    for i, impl in enumerate(shown):
        values = [by_key[(s, impl)]["ratio_vs_bp"] if (s, impl) in by_key else 0 for s in shapes]
        axis.bar([j + i * width for j in range(len(shapes))], values, width, label=impl)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=75, ha="right", fontsize=7)
    axis.set_ylabel("time / BP (log)")
    axis.set_title(f"PFA layers vs BP, batch {first['batch']}, r = {first['expand_ratio']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "layers.png", dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50,vit_b_16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--expand-ratio", type=float, default=10)
    parser.add_argument("--impls", default=DEFAULT_IMPLS, help="comma-separated; 'all' = every PFA combination")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-layers", type=int, default=None, help="only the first N distinct shapes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    impls = expand_impls(args.impls)
    if "bp" not in impls:
        impls.insert(0, "bp")
    specs = list(dict.fromkeys(s for m in args.models.split(",") for s in distinct_layer_specs(m, args.size)))
    specs = specs[:args.max_layers] if args.max_layers else specs
    env = harness.environment()
    torch.manual_seed(0)
    records = []
    from tqdm import tqdm

    for spec in tqdm(specs, desc="layer shapes", file=sys.stderr):
        for record in bench_spec(spec, impls, args, device, dtype):
            records.append({**record, **env})
    args.output_dir.mkdir(parents=True, exist_ok=True)
    harness.write_jsonl(records, args.output_dir / "layers.jsonl")
    write_report(records, args.output_dir, env)
    print((args.output_dir / "layers.md").read_text())


if __name__ == "__main__":
    main()
