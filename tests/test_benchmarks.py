"""Benchmark scripts: a fast smoke run of each (no timing assertions) and the cost model against the planner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cost_model  # noqa: E402
import harness  # noqa: E402

from pfa_kernels import planner  # noqa: E402


def _run(script, *args):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=600)


def _records(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        assert all(key in record for key in harness.RECORD_KEYS), record
        assert record["median_ms"] > 0 and record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["peak_mb"] > 0 and record["threads"] >= 1 and record["torch"]
    return records


def test_bench_layers_smoke(tmp_path):
    _run("bench_layers.py", "--models", "resnet18,vit_b_16", "--batch", "1", "--size", "32", "--rounds", "1",
         "--max-layers", "3", "--impls", "bp,reference,all", "--output-dir", str(tmp_path))
    records = _records(tmp_path / "layers.jsonl")
    impls = {r["impl"] for r in records}
    assert {"bp", "reference", "explicit-auto-torch", "projected-sequence-torch"} <= impls
    assert len({r["shape"] for r in records}) == 3
    assert all(r["ratio_vs_bp"] == 1.0 for r in records if r["impl"] == "bp")
    assert (tmp_path / "layers.md").read_text().count("\n|") >= 4 and (tmp_path / "layers.png").stat().st_size > 0


def test_bench_model_smoke(tmp_path):
    _run("bench_model.py", "--batch", "2", "--size", "32", "--expand-ratios", "1,2", "--repeats", "1",
         "--impls", "projected,explicit", "--output-dir", str(tmp_path))
    records = _records(tmp_path / "model.jsonl")
    assert [(r["expand_ratio"], r["impl"]) for r in records] == [
        (1, "bp"), (1, "projected"), (1, "explicit"), (2, "bp"), (2, "projected"), (2, "explicit")]
    assert all(r["images_per_s"] > 0 and r["h100_ms"] > 0 for r in records)
    assert (tmp_path / "model.md").exists() and (tmp_path / "model.png").stat().st_size > 0


def test_distinct_shapes_cover_every_layer():
    import bench_layers

    specs = bench_layers.distinct_layer_specs("resnet18", 224)
    assert sum(len(spec.names) for spec in specs) == 21  # 20 convs and the fc layer
    assert len(specs) < 21 and {spec.kind for spec in specs} == {"conv2d", "linear"}
    vit = bench_layers.distinct_layer_specs("vit_b_16", 224)
    assert any(spec.kind == "linear" and spec.input_shape == (197, 768) and spec.out_channels == 3072 for spec in vit)


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
@pytest.mark.parametrize("strategy", ["auto", "product", "sequence"])
def test_cost_model_backward_macs_equal_the_planners(strategy, parametrization):
    """The cost model's kernels, minus the forward, add up to the planner's MACs for the plan it takes."""
    specs = [cost_model.LayerSpec("conv2d", 64, 128, (3, 3), (2, 2), (1, 1), 1, False, (64, 56, 56), (128, 28, 28)),
             cost_model.LayerSpec("conv2d", 32, 32, (3, 3), (1, 1), (1, 1), 4, True, (32, 14, 14), (32, 14, 14)),
             cost_model.LayerSpec("linear", 512, 1000, input_shape=(512,), output_shape=(1000,))]
    for spec in specs:
        for expand_ratio in (0.5, 1, 10):
            work = cost_model.kernels(spec, 16, f"{parametrization}-{strategy}", expand_ratio, "dense")
            _, P, kernel, C_mid = cost_model._sizes(spec, 16, expand_ratio)
            K = spec.in_channels // spec.groups * kernel
            width = spec.out_channels if spec.groups * spec.out_channels <= 2 * C_mid else 2 * (C_mid // spec.groups)
            shape = planner.LayerShape(P, spec.out_channels, C_mid, K, spec.groups, parametrization,
                                       width if parametrization == "projected" else 0)
            plan = planner.choose_orders(shape, strategy, True, True, True)
            assert sum(m for name, m, _ in work if name != "forward") == plan.macs[
                (plan.input_order, plan.feedback_grad_order)], (spec.label, expand_ratio)
    bp = cost_model.costs(specs[0], 16, "bp", 10)
    assert bp["macs"] == 3 * 16 * 28 * 28 * 128 * 64 * 9 and bp["h100_ms"] > 0


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
@pytest.mark.parametrize("expand_ratio", [0.25, 1, 10])
def test_cost_model_of_grouped_feedback_counts_the_layers_own_products(parametrization, expand_ratio):
    """Grouped feedback (a grouped layer's default): BP's three GEMMs plus, per group, B_j R_j and B_j^T dW_j
    (explicit) or M_j Z_j (projected), counted from the shapes a PFAConv2d actually holds."""
    import pfa_kernels as pk

    spec = cost_model.LayerSpec("conv2d", 32, 32, (3, 3), (1, 1), (1, 1), 8, True, (32, 14, 14), (32, 14, 14))
    layer = pk.PFAConv2d(32, 32, 3, padding=1, groups=8, expand_ratio=expand_ratio, parametrization=parametrization)
    K = 32 // 8 * 9
    work = cost_model.kernels(spec, 16, f"{parametrization}-auto", expand_ratio)
    bp = 16 * 14 * 14 * 32 * K
    kept = parametrization == "projected" and layer.feedback.M is not None
    feedback = layer.feedback.M.numel() * K if kept else 2 * layer.feedback.B.numel() * K  # B_j (B_j^T Z_j) without M
    assert sum(m for _, m, _ in work) == 3 * bp + feedback
    assert cost_model._sizes(spec, 16, expand_ratio)[3] == layer.feedback.mid_channels


def test_bench_triton_resource_table(tmp_path):
    """Without a GPU the Triton benchmark prints the static resource table of every kernel and configuration."""
    _run("bench_triton.py", "--arch", "80", "--output-dir", str(tmp_path))
    table = (tmp_path / "triton_resources_sm80.md").read_text()
    assert table.count("| sequence_input_grad") >= 3 and table.count("| grouped_matmul") >= 3


def test_bench_cpp_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpp.py"), "--rounds", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=True)
    assert result.stdout.count("batch") == 3


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v3_small"])
def test_setup_arithmetic_counts_what_a_conversion_draws_and_multiplies(model_name):
    """bench_setup --arithmetic's counts (the figures behind a conversion's floor) are those of the layers pk.convert
    builds: values drawn = B's and R's sizes; B_j R_j = B's size times R's columns; M as formed between its least
    (n (n + 1) / 2 entries) and the whole product. Grouped and depthwise layers included (MobileNetV3)."""
    import math

    import bench_setup
    import torchvision

    import pfa_kernels as pk

    counts = bench_setup._arithmetic(model_name)
    model = pk.convert(getattr(torchvision.models, model_name)(), expand_ratio=10, parametrization="explicit")
    drawn = BR = M_whole = 0
    for module in model.modules():
        if isinstance(module, (pk.PFALinear, pk.PFAConv2d)):
            feedback = module.feedback
            columns = math.prod(feedback.R_shape[1:])
            drawn += feedback.B.numel() + feedback.R.numel()
            BR += feedback.B.numel() * columns
            M_whole += feedback.groups * feedback.rows_per_group ** 2 * feedback.B_by_group().shape[2]
    assert counts["drawn"] == drawn and counts["BR"] == BR
    assert counts["M_least"] <= counts["M"] <= M_whole and counts["M_least"] > M_whole // 2 > 0
