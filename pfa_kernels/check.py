"""First run on a GPU: `python -m pfa_kernels.check` (or `make gpu-check`).

1. Runs the CUDA subset of the test suite (`pytest -m cuda tests/`, when the repository's tests are beside the
   package): every backend x strategy x parametrization x dtype against the literal algorithm on the device, no
   host synchronization in a backward, a CUDA-graph training step, a second GPU, concurrent first calls.
2. Reports, per kernel (backend x order) x dtype x representative ResNet-50 / ViT-B/16 layer shape: the relative
   error of every gradient against the literal algorithm (reference.py, float64), its time against the PyTorch
   backend's, and what backend="auto" chose after measuring. Written as JSON lines and a markdown table to
   benchmarks/results/check_<device>.{jsonl,md}.

Without a GPU it says so, reports the CPU kernels (torch, cpp) on the same shapes at a small batch, and exits 0.
Exit status 1 if a test fails or a kernel exceeds its dtype's tolerance (dispatch.TOLERANCE).

    python -m pfa_kernels.check [--no-tests] [--rounds 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import dispatch, reference
from .nn import PFAConv2d, PFALinear

# (name, layer constructor arguments, input shape per sample): ResNet-50's distinct conv kinds and its head, and
# ViT-B/16's projections at 197 tokens. Batch 32 on a GPU; on a CPU batch 1 at a quarter of the spatial size.
SHAPES = [
    ("resnet50 layer1 3x3 64->64 @56", ("conv", 64, 64, 3, 1, 1), (64, 56, 56)),
    ("resnet50 layer1 1x1 256->64 @56", ("conv", 256, 64, 1, 1, 0), (256, 56, 56)),
    ("resnet50 layer3 3x3 256->256 s2 @28", ("conv", 256, 256, 3, 2, 1), (256, 28, 28)),
    ("resnet50 layer4 1x1 512->2048 @7", ("conv", 512, 2048, 1, 1, 0), (512, 7, 7)),
    ("resnet50 fc 2048->1000", ("linear", 2048, 1000), (2048,)),
    ("vit_b_16 qkv 768->2304 x197", ("linear", 768, 2304), (197, 768)),
    ("vit_b_16 mlp 3072->768 x197", ("linear", 3072, 768), (197, 3072)),
]
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CPU_DTYPES = (torch.float32,)


def _layer(spec, device, dtype, expand_ratio):
    if spec[0] == "linear":
        return PFALinear(spec[1], spec[2], expand_ratio=expand_ratio, device=device, dtype=dtype,
                         parametrization="explicit")
    _, c_in, c_out, kernel, stride, padding = spec
    return PFAConv2d(c_in, c_out, kernel, stride=stride, padding=padding, expand_ratio=expand_ratio, device=device,
                     parametrization="explicit",
                     dtype=dtype)


def _input_shape(spec, per_sample, batch, cpu):
    if cpu and spec[0] == "conv":
        per_sample = (per_sample[0], max(4, per_sample[1] // 4), max(4, per_sample[2] // 4))
    if cpu and spec[0] == "linear" and len(per_sample) == 2:
        per_sample = (max(8, per_sample[0] // 8), per_sample[1])
    return (batch, *per_sample)


def _gradients(layer, x, grad_output):
    x = x.detach().clone().requires_grad_(True)
    params = [x, layer.weight, layer.bias, layer.feedback.parameter]
    return torch.autograd.grad(layer(x), params, grad_output)


def _literal_gradients(layer, x, grad_output):
    """The literal algorithm (reference.py) in float64 on the same values."""
    exact = copy.deepcopy(layer).double()
    x = x.detach().double().requires_grad_(True)
    R = exact.feedback.effective_R()
    if isinstance(exact, PFALinear):
        y = reference.pfa_linear(x, exact.weight, exact.bias, exact.feedback.dense_B(), R)
    else:
        y = reference.pfa_conv(x, exact.weight, exact.bias, exact.feedback.dense_B(), R, exact.stride, exact.padding,
                               exact.dilation, exact.groups)
    return torch.autograd.grad(y, [x, exact.weight, exact.bias, exact.feedback.parameter], grad_output.double())


def _seconds(layer, x, grad_output, rounds):
    """Median wall time of `rounds` forward + backward calls after one untimed warm-up call."""
    device = x.device
    _gradients(layer, x, grad_output)
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _gradients(layer, x, grad_output)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def report(device: torch.device, rounds: int = 5, expand_ratio: float = 10) -> list[dict]:
    """One row per shape x dtype x kernel (backend:order) with errors against the literal algorithm, time ratio to
    the PyTorch backend with the planner's order, and the choice of backend="auto"."""
    cpu = device.type == "cpu"
    rows = []
    for dtype in CPU_DTYPES if cpu else GPU_DTYPES:
        for name, spec, per_sample in SHAPES:
            torch.manual_seed(0)
            layer = _layer(spec, device, dtype, expand_ratio)
            x = torch.randn(_input_shape(spec, per_sample, 1 if cpu else 32, cpu), device=device, dtype=dtype)
            grad_output = torch.randn_like(layer(x))
            exact = _literal_gradients(layer, x, grad_output)
            layer.backend, layer.strategy = "torch", "auto"
            torch_seconds = _seconds(layer, x, grad_output, rounds)
            layer.backend = "auto"
            for _ in range(2):
                _gradients(layer, x, grad_output)
            choice = layer.backward_plan(tuple(x.shape))
            for backend in dispatch.candidate_backends(device.type, dtype, "explicit"):
                for strategy in ("product", "sequence"):
                    layer.backend, layer.strategy = backend, strategy
                    row = {"device": dispatch.device_name(device), "dtype": str(dtype).replace("torch.", ""),
                           "shape": name, "input": list(x.shape), "kernel": f"{backend}:{strategy}",
                           "auto_choice": f"{choice.backend}:{choice.input_order}+{choice.feedback_grad_order}"}
                    try:
                        grads = _gradients(layer, x, grad_output)
                        seconds = _seconds(layer, x, grad_output, rounds)
                    except Exception as error:  # noqa: BLE001  (a failing kernel is a finding, not a crash)
                        rows.append({**row, "error": f"{type(error).__name__}: {error}", "ok": False})
                        continue
                    errors = {label: dispatch.max_relative_error((g,), (e.to(g.dtype).to(g.device),))
                              if dtype != torch.float64 else dispatch.max_relative_error((g,), (e,))
                              for label, g, e in zip(("x", "weight", "bias", "feedback"), grads, exact, strict=True)}
                    worst = max(errors.values())
                    rows.append({**row, "max_relative_error": worst, "errors": errors,
                                 "time_vs_torch": seconds / torch_seconds,
                                 "ok": worst <= _bound(dtype)})
            layer.backend, layer.strategy = "auto", "auto"
    return rows


def _bound(dtype):
    """Against the float64 literal algorithm: dispatch.TOLERANCE, with fp16/bf16's inputs already rounded."""
    return dispatch.TOLERANCE[dtype]


def markdown(rows) -> str:
    lines = ["| device | dtype | shape | kernel | max rel. error | time vs torch | auto's choice | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        error = f"{row['max_relative_error']:.2e}" if "max_relative_error" in row else row.get("error", "")
        ratio = f"{row['time_vs_torch']:.2f}" if "time_vs_torch" in row else "-"
        lines.append(f"| {row['device']} | {row['dtype']} | {row['shape']} | {row['kernel']} | {error} | {ratio} | "
                     f"{row['auto_choice']} | {'yes' if row['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def run_cuda_tests() -> int:
    """pytest -m cuda on the repository's tests (beside the package); 0 when they pass or are not there."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not tests.is_dir():
        print("check: no tests/ beside the package (an installed copy): skipping the CUDA test subset")
        return 0
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(tests)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfa_kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-tests", action="store_true", help="skip the CUDA test subset")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per kernel (median)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for check_<device>.{jsonl,md}")
    args = parser.parse_args(argv)
    has_gpu = torch.cuda.is_available()
    status = 0
    if not has_gpu:
        print("check: no CUDA device here: the GPU tests and the GPU report need one. Reporting the CPU kernels.")
    elif not args.no_tests:
        status = run_cuda_tests()
    device = torch.device("cuda" if has_gpu else "cpu")
    rows = report(device, rounds=args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"check_{device.type}"
    stem.with_suffix(".jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = markdown(rows)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"check: {len(rows)} rows written to {stem}.jsonl and {stem}.md")
    failed = [row for row in rows if not row["ok"]]
    if failed:
        print(f"check: {len(failed)} kernel(s) outside their dtype's tolerance or raising; see the rows marked NO")
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
