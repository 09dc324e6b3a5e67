"""The cost model and the backend choice."""

from __future__ import annotations

import pytest

from pfa_kernels import dispatch, planner


def _shape(P, C_out, C_mid, K, G=1):
    return planner.LayerShape(P, C_out, C_mid, K, G)


def test_costs_follow_the_design_formulas():
    P, C_out, C_mid, K = 784, 512, 5120, 4608  # ResNet-18 layer4 3x3 conv, batch 16, r = 10
    macs = planner.candidate_macs(_shape(P, C_out, C_mid, K), True, True, True)
    assert macs[("product", "product")] == P * C_out * K + (C_out * C_mid * K + P * C_out * K) + C_out * C_mid * K
    assert macs[("sequence", "sequence")] == P * C_out * K + 2 * P * C_mid * K + P * C_out * C_mid
    assert macs["bp"] == 2 * P * C_out * K


def test_auto_picks_product_for_convolutions_and_sequence_for_small_batch_linear():
    conv = planner.choose_orders(_shape(16 * 56 * 56, 64, 640, 576), "auto", True, True, True)
    assert (conv.input_order, conv.feedback_grad_order) == ("product", "product")
    linear = planner.choose_orders(_shape(8, 1024, 10240, 1024), "auto", True, True, True)
    assert (linear.input_order, linear.feedback_grad_order) == ("sequence", "sequence")
    assert linear.macs[("sequence", "sequence")] < linear.macs[("product", "product")] / 50


def test_bottleneck_feedback_population_prefers_sequence():
    # C_mid = C_out / 4: forming B·R is no cheaper than running through the small population.
    plan = planner.choose_orders(_shape(10_000, 256, 64, 256), "auto", True, True, True)
    assert plan.input_order == "sequence"


def test_grouped_product_pays_the_dense_dgrad():
    depthwise = _shape(16 * 56 * 56, 64, 64, 9, G=64)
    macs = planner.candidate_macs(depthwise, True, True, True)
    assert macs[("product", "sequence")] > macs[("sequence", "sequence")]
    assert planner.choose_orders(depthwise, "auto", True, True, True).input_order == "sequence"


def test_forced_strategies_and_missing_gradients():
    shape = _shape(100, 8, 80, 72)
    assert planner.choose_orders(shape, "sequence", True, True, True).input_order == "sequence"
    plan = planner.choose_orders(shape, "product", False, True, False)
    assert (plan.input_order, plan.feedback_grad_order) == (None, None)
    assert "requested" in plan.reason
    with pytest.raises(ValueError, match="strategy"):
        planner.choose_orders(shape, "reference", True, True, True)


def test_backend_resolution():
    assert dispatch.check_backend("auto", "cpu") == "auto"
    assert dispatch.check_backend("torch", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="backend='triton' is not available"):
        dispatch.check_backend("triton", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.check_backend("numpy", "cpu")
    with pytest.raises(ValueError, match="strategy must be one of"):
        planner.check_strategy("fast")


def test_projected_costs_do_not_grow_with_expand_ratio():
    """Projected layers (docs/design.md §2.4): no term scales with C_mid; sequence order pays M per position."""
    P, C_out, K = 784, 512, 4608
    for C_mid in (5120, 51200):
        shape = planner.LayerShape(P, C_out, C_mid, K, 1, "projected", C_out)
        macs = planner.candidate_macs(shape, True, True, True)
        assert set(macs) == {("product", "correlation"), ("sequence", "correlation"), "bp"}
        assert macs[("product", "correlation")] == P * C_out * K + C_out * C_out * K + P * C_out * K
        assert macs[("sequence", "correlation")] == P * C_out * K + P * C_out * C_out + P * C_out * K
        plan = planner.choose_orders(shape, "auto", True, True, True)
        assert (plan.input_order, plan.feedback_grad_order) == ("sequence", "correlation")  # P < K
    early = planner.LayerShape(16 * 56 * 56, 64, 640, 576, 1, "projected", 64)
    assert planner.choose_orders(early, "auto", True, True, True).input_order == "product"
    forced = planner.choose_orders(early, "sequence", True, False, True)
    assert (forced.input_order, forced.feedback_grad_order) == ("sequence", "correlation")
    # Without dL/dW, dL/dZ still costs the weight-gradient correlation.
    assert planner.candidate_macs(early, False, False, True)[(None, "correlation")] == 16 * 56 * 56 * 64 * 576
