"""The demo runs end to end (one short epoch per method) and writes its table, plot and numbers."""

from __future__ import annotations

import json

from pfa_kernels import demo


def test_demo_runs_and_writes_outputs(tmp_path, capsys):
    results = demo.main(["--epochs", "2", "--large-wd-epochs", "1", "--output-dir", str(tmp_path)])
    assert set(results) == set(demo.METHODS)
    for name, history in results.items():
        assert len(history["accuracy"]) == 2
        assert history["accuracy"][-1] > 50, (name, history["accuracy"])  # chance is 10%
        assert (history["alignment"][-1] is None) == (name == "BP")
    assert (tmp_path / "digits_demo.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "digits_demo.json").read_text()).keys() == results.keys()
    table = capsys.readouterr().out
    assert "path align (deg)" in table and "PFA (r=10)" in table
