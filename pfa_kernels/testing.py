"""pytest-friendly checks for a user's own test suite.

    def test_my_model_is_pfa():
        model = pk.convert(MyNet(), expand_ratio=10)
        pk.testing.assert_matches_reference(model, (torch.randn(2, 3, 32, 32),))
"""

from __future__ import annotations

from torch import nn

from .verify import VerifyReport, verify


def assert_matches_reference(model: nn.Module, example_inputs, tolerance: float = 1e-8) -> VerifyReport:
    """Raise AssertionError (with pk.verify's table) unless every PFA layer of `model` ran its forward, its feedback
    received a gradient, and every gradient equals the literal algorithm within `tolerance` (float64, relative)."""
    report = verify(model, example_inputs, tolerance)
    if not report.ok:
        raise AssertionError(f"the model does not compute PFA as the literal algorithm does:\n{report}")
    return report
