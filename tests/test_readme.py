"""The README's drop-in example runs as printed, with the defaults it relies on."""

from __future__ import annotations

import re
from pathlib import Path

import pfa_kernels as pk

README = Path(__file__).resolve().parents[1] / "README.md"


def test_drop_in_example_runs_and_is_projected_by_default():
    section = README.read_text().split("## Drop-in example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    model, report = namespace["model"], namespace["report"]
    assert report and all(record.converted for record in report)
    layers = [m for m in model.modules() if isinstance(m, pk.nn.PFA_LAYERS)]
    assert len(layers) == 21 and all(layer.parametrization == "projected" for layer in layers)
    assert all(layer.feedback.parameter.grad is not None for layer in layers)
