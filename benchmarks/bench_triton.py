"""Triton kernels: timed against the PyTorch backend and cuBLAS/cuDNN backpropagation when a GPU is present,
otherwise the static resource table of every kernel and configuration compiled for a real GPU.

    python benchmarks/bench_triton.py [--arch 80|90|all] [--output-dir benchmarks/results]

Without a GPU (this machine): registers per thread and spills (ptxas), shared memory (Triton), the occupancy
they allow and the memory fences, for every kernel, layer case and configuration compiled for sm_<arch>; written
to triton_resources_sm<arch>.md, or with --arch all to triton_aot_resources.md. With a GPU: triton.testing.do_bench of
the fused sequence input gradient and the grouped feedback products against the torch backend and BP's dgrad,
on ResNet-18's last-stage shapes, written to triton.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def resource_table(arches) -> str:
    """Markdown: one row per kernel x layer case x arguments x configuration x dtype x architecture."""
    from pfa_kernels.backends.triton import aot

    rows = [row for arch in arches for row in aot.compile_all(arch)]
    worst = max(rows, key=lambda row: row.registers)
    lines = [f"Triton kernels compiled ahead of time for {', '.join(f'sm_{arch}' for arch in arches)} (no GPU needed): "
             f"registers and spills from ptxas (with Triton's options), shared memory from Triton, occupancy = "
             f"resident warps / {aot.MAX_WARPS_PER_SM}, gpu/system-scope fences in the PTX and SASS (pattern in "
             f"aot.py), atomic instructions in the SASS. Case: the layer call whose arguments were specialized "
             f"('runtime': as Triton's launcher does, integers of 1 as constants, 16-divisible integers and aligned "
             f"pointers marked; 'generic': types only).", "",
             f"{len(rows)} kernels; {sum(row.spill_bytes > 0 for row in rows)} spill "
             f"({sum(row.spill_bytes for row in rows)} bytes in all); most registers {worst.registers} "
             f"({worst.kernel} {worst.case} {worst.arguments} [{worst.config}] {worst.dtype} sm_{worst.arch}); "
             f"{sum(row.registers == 255 for row in rows)} at 255; {sum(row.sass_fences for row in rows)} SASS and "
             f"{sum(row.ptx_fences for row in rows)} PTX fences.", "",
             "| kernel | case | arguments | configuration | dtype | arch | registers | spills (bytes) | "
             "shared memory (KB) | occupancy | PTX fences | SASS fences | atomics |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.kernel} | {row.case} | {row.arguments} | {row.config} | {row.dtype} | sm_{row.arch} | "
                     f"{row.registers} | {row.spill_bytes} | {row.shared_bytes / 1024:.0f} | {row.occupancy:.2f} | "
                     f"{row.ptx_fences} | {row.sass_fences} | {row.atomics} |")
    return "\n".join(lines) + "\n"


def _time_shape(positions, out_channels, in_channels, expand_ratio) -> list[dict]:
    import triton.testing

    device, dtype = torch.device("cuda"), torch.bfloat16
    mid = out_channels * expand_ratio
    grad = torch.randn(positions, out_channels, device=device, dtype=dtype)
    B = torch.randn(out_channels, mid, device=device, dtype=dtype)
    R = torch.randn(mid, in_channels, device=device, dtype=dtype)
    W = torch.randn(out_channels, in_channels, device=device, dtype=dtype)
    candidates = {
        "bp dgrad (cuBLAS)": lambda: grad @ W,
        "torch sequence (g B) R": lambda: (grad @ B) @ R,
        "triton fused sequence": lambda: torch.ops.pfa_kernels.triton_sequence_input_grad(
            grad, B, R, [positions, in_channels], [], [], []),
        "torch product B R": lambda: B @ R,
        "triton grouped B R": lambda: torch.ops.pfa_kernels.triton_grouped_matmul([B], [R]),
    }
    times = {name: triton.testing.do_bench(fn) for name, fn in candidates.items()}
    return [{"benchmark": "triton_kernels", "shape": f"P={positions} C_out={out_channels} C_in={in_channels}",
             "impl": name, "dtype": "bfloat16", "batch": positions, "expand_ratio": expand_ratio, "median_ms": ms,
             "p20_ms": ms, "p80_ms": ms, "peak_mb": None, "ratio_vs_bp": ms / times["bp dgrad (cuBLAS)"]}
            for name, ms in times.items()]


def gpu_timings() -> list[dict]:
    """ResNet-18's last 3x3 conv as a GEMM at batch 16 (P = 784) and its fc layer (P = 16)."""
    return _time_shape(784, 512, 4608, 10) + _time_shape(16, 1000, 512, 10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", choices=["80", "90", "all"],
                        help="resource table for sm_80, sm_90 (triton_resources_sm<arch>.md) or both "
                             "(triton_aot_resources.md)")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        records = [{**r, **harness.environment()} for r in gpu_timings()]
        harness.write_jsonl(records, args.output_dir / "triton.jsonl")
        for record in records:
            print(json.dumps({k: record[k] for k in ("shape", "impl", "median_ms", "ratio_vs_bp")}))
    arches = (80, 90) if args.arch == "all" else (int(args.arch),)
    table = resource_table(arches)
    name = "triton_aot_resources.md" if args.arch == "all" else f"triton_resources_sm{args.arch}.md"
    (args.output_dir / name).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
