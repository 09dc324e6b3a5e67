"""`python -m pfa_kernels.check` (make gpu-check) on this machine: says there is no GPU, reports the CPU kernels
against the literal algorithm on small stand-ins of its shapes, writes JSON lines and markdown, exits 0."""

from __future__ import annotations

import json

import torch

from pfa_kernels import check, dispatch


def test_check_reports_every_cpu_kernel(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(check, "SHAPES", [("conv 3x3 6->5", ("conv", 6, 5, 3, 2, 1), (6, 9, 8)),
                                          ("linear 7->4 x3", ("linear", 7, 4), (3, 7))])
    monkeypatch.setattr(check, "GPU_DTYPES", (torch.float32,))
    dispatch.clear()
    status = check.main(["--no-tests", "--rounds", "1", "--out", str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [json.loads(line) for line in (tmp_path / f"check_{device}.jsonl").read_text().splitlines()]
    backends = dispatch.candidate_backends(device, torch.float32, "explicit")
    assert status == 0 and len(rows) == 2 * 2 * len(backends)
    assert {row["kernel"] for row in rows} == {f"{b}:{s}" for b in backends for s in ("product", "sequence")}
    for row in rows:
        assert row["ok"] and row["max_relative_error"] < 1e-4 and row["time_vs_torch"] > 0, row
        assert row["auto_choice"].split(":")[0] in backends
    assert "| float32 | conv 3x3 6->5 |" in (tmp_path / f"check_{device}.md").read_text()
    if device == "cpu":
        assert "no CUDA device here" in capsys.readouterr().out
