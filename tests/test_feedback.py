"""Feedback initialisation, masks and seeding."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import same_state_entry

import pfa_kernels as pk
from pfa_kernels.backends import torch_ops
from pfa_kernels.demo import small_cnn
from pfa_kernels.feedback import mid_channels_for
from pfa_kernels.feedback_choice import make_feedback


def test_random_B_has_identity_second_moment():
    """Var(B_ij) = 1/C_mid, so E[B B^T] = I (docs/design.md §1), for several expand ratios."""
    for expand_ratio in (1, 3, 10):
        feedback = make_feedback(64, 8, (3, 3), expand_ratio=expand_ratio, seed=0)
        B = feedback.B.double()
        variance = B.var().item()
        assert abs(variance * feedback.mid_channels - 1) < 0.05, (expand_ratio, variance)
        second_moment = B @ B.t()
        assert abs(second_moment.diagonal().mean().item() - 1) < 0.05


def test_sparse_B_keeps_its_variance_and_masks_hold():
    feedback = make_feedback(64, 8, (3, 3), expand_ratio=4, feedback_density=0.25, seed=3)
    B = feedback.B.double()
    assert abs(B.pow(2).mean().item() * feedback.mid_channels - 1) < 0.1
    assert torch.equal(feedback.B != 0, feedback.B_mask)
    assert abs(feedback.R_mask.double().mean().item() - 0.25) < 0.02
    assert torch.all(feedback.R[~feedback.R_mask] == 0)
    assert torch.all(feedback.effective_R()[~feedback.R_mask] == 0)


def test_masked_R_entries_stay_zero_through_training():
    layer = pk.PFAConv2d(4, 6, 3, expand_ratio=2, feedback_density=0.3, padding=1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(2, 4, 5, 5)).square().sum().backward()
        optimizer.step()
    mask = layer.feedback.R_mask
    assert torch.all(layer.feedback.R[~mask] == 0)
    assert torch.any(layer.feedback.R[mask] != 0)


def test_orthogonal_and_identity():
    orthogonal = make_feedback(16, 4, (3,), expand_ratio=1, feedback_init="orthogonal", seed=1)
    torch.testing.assert_close(orthogonal.B @ orthogonal.B.t(), torch.eye(16), atol=1e-5, rtol=0)
    wide = make_feedback(16, 4, (3,), expand_ratio=4, feedback_init="orthogonal", seed=1)
    torch.testing.assert_close(wide.B @ wide.B.t(), torch.eye(16), atol=1e-5, rtol=0)
    identity = make_feedback(16, 4, (3,), expand_ratio=1, feedback_init="identity", seed=1)
    assert torch.equal(identity.B, torch.eye(16))


def test_same_seed_same_feedback_on_any_device_and_dtype():
    a = make_feedback(8, 3, (3, 3), expand_ratio=2, feedback_density=0.5, seed=42)
    b = make_feedback(8, 3, (3, 3), expand_ratio=2, feedback_density=0.5, seed=42, dtype=torch.float64)
    assert torch.equal(a.B, b.B.float()) and torch.equal(a.R_mask, b.R_mask)
    torch.manual_seed(7)
    layer_a = pk.PFALinear(6, 4)
    torch.manual_seed(7)
    layer_b = pk.PFALinear(6, 4)
    assert torch.equal(layer_a.feedback.B, layer_b.feedback.B) and torch.equal(layer_a.weight, layer_b.weight)
    assert not torch.equal(pk.PFALinear(6, 4).feedback.B, layer_a.feedback.B)


@pytest.mark.parametrize("feedback_groups", ["grouped", "dense"])
def test_feedback_weight_matches_literal_product(feedback_groups):
    """W_fb against the literal product with the literal (dense, block-diagonal for grouped feedback) B: dense
    feedback's W_fb is that product, grouped feedback's is its diagonal blocks (zeros elsewhere)."""
    for groups in (1, 3):
        feedback = make_feedback(6, 2, (3, 3), groups=groups, expand_ratio=2, seed=0, dtype=torch.float64,
                                 feedback_groups=feedback_groups, parametrization="explicit")
        expected = pk.reference.feedback_weight(feedback.dense_B(), feedback.R, groups)
        if feedback.grouped:
            assert feedback.B.shape == (6, 4) and feedback.feedback_weight().shape == (6, 2, 3, 3)
            blocks = expected.reshape(groups, 2, groups, 2, 3, 3)
            off_diagonal = ~torch.eye(groups, dtype=torch.bool)
            assert blocks.permute(0, 2, 1, 3, 4, 5)[off_diagonal].abs().max() == 0
            expected = torch_ops.weight_grad_from_correlation(expected, groups)
        else:
            assert feedback.B.shape == (6, 12) and feedback.feedback_weight().shape == (6, 2 * groups, 3, 3)
        torch.testing.assert_close(feedback.feedback_weight(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("expand_ratio, out_channels, expected", [(10, 7, 70), (0.5, 7, 4), (0.01, 7, 1), (2.5, 3, 8)])
def test_mid_channels_rounding(expand_ratio, out_channels, expected):
    assert mid_channels_for(out_channels, expand_ratio) == expected
    assert mid_channels_for(out_channels, expand_ratio) == max(1, math.floor(expand_ratio * out_channels + 0.5))


@pytest.mark.parametrize("expand_ratio, out_channels, groups, expected",
                         [(10, 32, 32, 320), (0.25, 16, 16, 16), (1.3, 4, 2, 6), (0.5, 6, 3, 3), (0.7, 12, 4, 8)])
def test_mid_channels_with_groups_is_the_nearest_multiple(expand_ratio, out_channels, groups, expected):
    """Wherever round(r * C_out) is a multiple of groups it is C_mid; elsewhere the nearest multiple, at least one
    channel per group (a depthwise layer at r = 0.25 gets one), and the layer builds."""
    mid_channels = mid_channels_for(out_channels, expand_ratio, groups)
    assert mid_channels == expected and mid_channels % groups == 0
    plain = max(1, math.floor(expand_ratio * out_channels + 0.5))
    assert plain % groups or mid_channels == plain
    layer = pk.PFAConv2d(out_channels, out_channels, 3, groups=groups, expand_ratio=expand_ratio)
    assert layer.feedback.mid_channels == expected


def test_bad_seed_raises():
    with pytest.raises(TypeError, match="feedback_seed"):
        make_feedback(4, 4, (), seed="abc")


def test_feedback_is_identical_in_another_process():
    """What DDP relies on: a fresh process that seeds and builds the same model draws the same B and masks."""
    script = ("import torch, torchvision, pfa_kernels as pk\n"
              "torch.manual_seed(0)\n"
              "m = pk.convert(torchvision.models.resnet18(num_classes=10), expand_ratio=0.25, feedback_density=0.5)\n"
              "print(repr(sum(float(b.double().abs().sum()) for n, b in m.named_buffers() if 'feedback' in n)))\n")
    torch.manual_seed(0)
    model = pk.convert(torchvision.models.resnet18(num_classes=10), expand_ratio=0.25, feedback_density=0.5)
    expected = sum(float(b.double().abs().sum()) for n, b in model.named_buffers() if "feedback" in n)
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    assert float(output.strip()) == expected


def test_density_pair_masks_B_and_R_separately():
    B_only = make_feedback(6, 3, (3,), expand_ratio=2, feedback_density=(0.5, 1.0), seed=1)
    both = make_feedback(6, 3, (3,), expand_ratio=2, feedback_density=0.5, seed=1)
    assert B_only.R_mask is None and B_only.B_mask is not None
    assert torch.equal(B_only.B, both.B)  # a scalar density is the pair (d, d): the same draws for B
    R_only = make_feedback(6, 3, (3,), expand_ratio=2, feedback_density=(1, 0.5), seed=1)
    assert R_only.B_mask is None and not R_only.R_mask.all()
    for bad, error in (((0.5,), TypeError), ((0.5, 0), ValueError), (("a", 1), TypeError), ((1, 1.5), ValueError)):
        with pytest.raises(error, match="feedback_density"):
            make_feedback(6, 3, feedback_density=bad)


def test_projection_matrix_is_kept_only_when_cheaper():
    """Dense feedback keeps M (G, C_out, C_out) when G * C_out <= 2 * C_mid, else M·Z is applied as B_j (B_j^T Z_j);
    grouped feedback's M_j is (C_out/G, C_out/G), kept when C_out/G <= 2 * C_mid/G (expand_ratio >= 1/2)."""
    kept = make_feedback(8, 2, (3, 3), groups=2, expand_ratio=1, parametrization="projected", seed=0,
                         feedback_groups="dense")
    assert kept.M.shape == (2, 8, 8) and kept.Z.shape == (8, 4, 3, 3)
    through_B = make_feedback(8, 1, (3, 3), groups=8, expand_ratio=1, parametrization="projected", seed=0,
                              feedback_groups="dense")
    assert through_B.M is None and through_B.Z.shape == (8, 8, 3, 3)
    assert "M" not in through_B.state_dict() and "parametrization='projected'" in repr(through_B)
    explicit = make_feedback(8, 1, (3, 3), groups=8, expand_ratio=1, seed=0, feedback_groups="dense")
    torch.testing.assert_close(through_B.feedback_weight(), explicit.feedback_weight())
    with pytest.raises(RuntimeError, match="projected"):
        through_B.effective_R()
    grouped = make_feedback(8, 1, (3, 3), groups=8, expand_ratio=1, parametrization="projected", seed=0)
    assert grouped.M.shape == (8, 1, 1) and grouped.Z.shape == (8, 1, 3, 3)
    grouped_explicit = make_feedback(8, 1, (3, 3), groups=8, expand_ratio=1, seed=0)
    torch.testing.assert_close(grouped.feedback_weight(), grouped_explicit.feedback_weight())
    thin = make_feedback(8, 1, (3, 3), groups=2, expand_ratio=0.25, parametrization="projected", seed=0)
    assert thin.M is None and thin.Z.shape == (8, 1, 3, 3)  # C_out/G = 4 > 2 * C_mid/G = 2


def test_projected_reset_parameters_redraws_the_same_feedback():
    feedback = make_feedback(6, 3, (3, 3), expand_ratio=4, parametrization="projected", seed=9)
    Z, M = feedback.Z.detach().clone(), feedback.M.clone()
    with torch.no_grad():
        feedback.Z.mul_(2)
    feedback.reset_parameters()
    assert torch.equal(feedback.Z, Z) and torch.equal(feedback.M, M)


def test_ill_conditioned_projection_warns():
    """Rounding in M·Z grows with cond(B): a random square B (r = 1) warns, r = 10 and orthogonal B do not."""
    with pytest.warns(UserWarning, match="ill-conditioned B"):
        square = make_feedback(64, 64, expand_ratio=1, parametrization="projected", seed=0)
    assert square.condition_number > 100
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide = make_feedback(64, 64, expand_ratio=10, parametrization="projected", seed=0)
        orthogonal = make_feedback(64, 64, expand_ratio=1, feedback_init="orthogonal", parametrization="projected",
                                 seed=0)
    # A float32 layer's condition number comes from float32 eigenvalues of M: 1 to about 1e-6.
    assert wide.condition_number < 2.5 and orthogonal.condition_number == pytest.approx(1.0, rel=1e-5)


def _converted_cnn(mode="pfa", **kwargs):
    return pk.convert(small_cnn(), mode=mode, feedback_seed=0, **kwargs)


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
def test_a_checkpoint_missing_one_layers_feedback_is_an_error(parametrization):
    """A PFA checkpoint without one layer's feedback (rule.exclude differed when it was saved) is not a
    backpropagation checkpoint: strict loading names that layer's keys instead of keeping its feedback as drawn."""
    state = _converted_cnn(parametrization=parametrization).state_dict()
    partial = {key: value for key, value in state.items() if not key.startswith("2.feedback.")}
    model = _converted_cnn(parametrization=parametrization)
    with pytest.raises(RuntimeError, match='Missing key\\(s\\).*"2.feedback.(R|Z)"'):
        model.load_state_dict(partial)
    model = _converted_cnn(parametrization=parametrization)
    drawn = model[2].feedback.B.clone()
    result = model.load_state_dict(partial, strict=False)
    assert {key for key in result.missing_keys} == {key for key in state if key.startswith("2.feedback.")}
    saved_first = _converted_cnn(parametrization=parametrization)[0].feedback.B
    assert torch.equal(model[2].feedback.B, drawn) and torch.equal(model[0].feedback.B, saved_first)
    # The first layer's feedback missing: found out when a later layer turns out to have its feedback.
    first_missing = {key: value for key, value in state.items() if not key.startswith("0.feedback.")}
    with pytest.raises(RuntimeError, match='Missing key\\(s\\).*"0.feedback.(R|Z)"'):
        _converted_cnn(parametrization=parametrization).load_state_dict(first_missing)


@pytest.mark.parametrize("mode", ["pfa", "fa", "frsf"])
def test_a_backpropagation_checkpoint_loads_into_every_converted_model(mode):
    """No feedback keys at all: weights and biases load, every layer keeps its feedback as drawn."""
    bp = small_cnn()
    model = _converted_cnn(mode)
    drawn = copy.deepcopy({key: value for key, value in model.state_dict().items() if ".feedback." in key})
    B_drawn = [m.feedback.B.clone() for m in model.modules() if isinstance(m, pk.nn.PFA_LAYERS) and m.rule == "pfa"]
    model.load_state_dict(bp.state_dict())
    for key, value in model.state_dict().items():
        assert same_state_entry(value, drawn[key] if key in drawn else bp.state_dict()[key]), key
    B_after = [m.feedback.B for m in model.modules() if isinstance(m, pk.nn.PFA_LAYERS) and m.rule == "pfa"]
    assert all(torch.equal(a, b) for a, b in zip(B_after, B_drawn, strict=True))
    # A second load into the same model starts afresh (a PFA load before it does not make this one partial).
    model.load_state_dict(model.state_dict())
    model.load_state_dict(bp.state_dict())


# ----------------------------------------------------------------------------- B from the seed, not the checkpoint


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
def test_checkpoint_holds_the_seed_not_B(parametrization):
    """B, M and the masks are not saved: the state dict keeps the learned tensor and {seed, checksum}; loading into a
    model built with other seeds draws the checkpoint's B again (and M from it), bit for bit."""
    model = _converted_cnn(parametrization=parametrization, feedback_density=(0.5, 1.0))
    state = model.state_dict()
    assert not any(key.rsplit(".", 1)[-1] in ("B", "M", "B_mask", "R_mask") for key in state)
    assert state["0.feedback._extra_state"]["seed"] == model[0].feedback.seed
    other = pk.convert(small_cnn(), feedback_seed=99, parametrization=parametrization, feedback_density=(0.5, 1.0))
    assert not torch.equal(other[0].feedback.B, model[0].feedback.B)
    other.load_state_dict(state)
    for mine, theirs in zip(model.modules(), other.modules(), strict=True):
        if isinstance(mine, pk.nn.PFA_LAYERS):
            for name in ("B", "B_mask", "M"):
                expected, got = getattr(mine.feedback, name, None), getattr(theirs.feedback, name, None)
                assert (expected is None and got is None) or torch.equal(got, expected), name
            assert theirs.feedback.seed == mine.feedback.seed
            torch.testing.assert_close(theirs.feedback_weight(), mine.feedback_weight(), rtol=0, atol=0)


def test_checksum_mismatch_fails_loudly(monkeypatch):
    """A B drawn differently from the one the checkpoint was written with (another torch RNG) is refused, never used."""
    state = _converted_cnn().state_dict()
    tampered = copy.deepcopy(state)
    tampered["2.feedback._extra_state"]["checksum"] = "0123456789abcdef"
    with pytest.raises(RuntimeError, match="2.feedback: the feedback B drawn from the checkpoint's feedback_seed"):
        _converted_cnn().load_state_dict(tampered)
    # A generator that draws differently: loading into a model of other seeds redraws B, whose checksum differs.
    from pfa_kernels.feedback import PFAFeedback

    real_draw = PFAFeedback._draw

    def other_generator(self, *args, **kwargs):
        drawn = real_draw(self, *args, **kwargs)
        return dataclasses.replace(drawn, B=drawn.B + 1e-3)

    other = pk.convert(small_cnn(), feedback_seed=7)
    monkeypatch.setattr(PFAFeedback, "_draw", other_generator)
    with pytest.raises(RuntimeError, match="draws different random numbers"):
        other.load_state_dict(state)


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
def test_a_checkpoint_that_carries_B_still_loads(parametrization):
    """A checkpoint written before B left it (B, the masks and M as entries, no "_extra_state") loads with B as
    saved, also when its B is not the one the layer's seed draws."""
    model = _converted_cnn(parametrization=parametrization, feedback_density=(0.5, 1.0))
    old = {key: value for key, value in model.state_dict().items() if not key.endswith("_extra_state")}
    for name, layer in model.named_modules():
        if isinstance(layer, pk.nn.PFA_LAYERS):
            for key in ("B", "B_mask", "M"):
                if getattr(layer.feedback, key, None) is not None:
                    old[f"{name}.feedback.{key}"] = getattr(layer.feedback, key) * (1.5 if key != "B_mask" else 1)
    fresh = _converted_cnn(parametrization=parametrization, feedback_density=(0.5, 1.0))
    fresh.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    assert torch.equal(fresh[0].feedback.B, 1.5 * model[0].feedback.B)
    if parametrization == "projected":
        assert torch.equal(fresh[0].feedback.M, 1.5 * model[0].feedback.M)
    # Written out again, it carries the seed and the checksum of the B it now holds.
    assert fresh.state_dict()["0.feedback._extra_state"]["checksum"] != model[0].feedback.fixed_checksum


def test_checkpoint_of_other_feedback_groups_explains_itself():
    grouped = pk.PFAConv2d(4, 4, 3, groups=2, expand_ratio=2, parametrization="explicit")
    dense = pk.PFAConv2d(4, 4, 3, groups=2, expand_ratio=2, feedback_groups="dense", parametrization="explicit")
    with pytest.raises(RuntimeError, match="this layer 'dense'; build the model with feedback_groups='grouped'"):
        dense.load_state_dict(grouped.state_dict())
    old = {**{k: v for k, v in dense.state_dict().items() if not k.endswith("_extra_state")},
           "feedback.B": dense.feedback.B}
    with pytest.raises(RuntimeError, match="need feedback_groups='dense'"):
        grouped.load_state_dict(old)


def test_checksum_samples_reach_the_last_entry_of_a_large_B():
    """A ResNet-50 layer's B has 41,943,040 entries: the sampled positions end at its last entry, not past it."""
    from pfa_kernels.feedback_state import fixed_state_checksum

    B = torch.zeros(2048, 20480)
    before = fixed_state_checksum(B, None)
    B[-1, -1] = 1.0
    assert fixed_state_checksum(B, None) != before
    assert fixed_state_checksum(B.double(), None) == fixed_state_checksum(B, None)


def _device_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("kind", ["linear", "conv-grouped", "conv-dense-groups", "masked-B"])
def test_projected_feedback_with_M_holds_no_B(kind):
    """A projected layer whose M suffices holds W, b, Z and M alone: B (and B's mask) is drawn from the seed where it
    is read, equal to the B its explicit twin holds, and the layer's gradients are unchanged."""
    options = dict(expand_ratio=10, feedback_seed=3)
    if kind == "linear":
        make = lambda parametrization: pk.PFALinear(12, 7, parametrization=parametrization, **options)  # noqa: E731
        x = torch.randn(5, 12)
    else:
        density = (0.5, 1.0) if kind == "masked-B" else 1.0
        groups = 1 if kind == "masked-B" else 2
        grouping = "dense" if kind == "conv-dense-groups" else "grouped"
        make = lambda parametrization: pk.PFAConv2d(  # noqa: E731
            4, 6, 3, padding=1, groups=groups, feedback_density=density, feedback_groups=grouping,
            parametrization=parametrization, **options)
        x = torch.randn(2, 4, 5, 5)
    projected, explicit = make("projected"), make("explicit")
    feedback = projected.feedback
    assert feedback.M is not None and feedback.B_held is None and feedback.B_mask_held is None
    own = {id(t) for t in [projected.weight, projected.bias, feedback.Z, feedback.M]}
    assert {id(t) for t in [*projected.parameters(), *projected.buffers()]} == own
    assert _device_bytes(projected) == sum(t.numel() * t.element_size()
                                           for t in [projected.weight, projected.bias, feedback.Z, feedback.M])
    assert torch.equal(feedback.B, explicit.feedback.B)
    if kind == "masked-B":
        assert torch.equal(feedback.B_mask, explicit.feedback.B_mask) and not feedback.B_mask.all()
    # Gradients against the explicit twin (W_fb = M Z = B R): the B the ops never see changes nothing.
    twin = pk.reparametrize(copy.deepcopy(projected), "explicit")
    for layer in (projected, twin):
        layer.zero_grad()
        layer(x.clone().requires_grad_()).square().sum().backward()
    torch.testing.assert_close(projected.weight.grad, twin.weight.grad)
    torch.testing.assert_close(projected.feedback.feedback_weight(), twin.feedback.feedback_weight())


def test_a_drawn_B_is_rounded_as_a_held_one():
    """.double() of a float32 layer: a held B keeps its float32 rounding, and so does the B a projected layer draws
    (so that its explicit twin, its M refreshed from B, and verify's literal twin all see one B)."""
    projected = pk.PFALinear(9, 6, expand_ratio=10, parametrization="projected", feedback_seed=1).double()
    explicit = pk.PFALinear(9, 6, expand_ratio=10, parametrization="explicit", feedback_seed=1).double()
    assert projected.feedback.B.dtype == torch.float64
    assert torch.equal(projected.feedback.B, explicit.feedback.B)
    assert not torch.equal(projected.feedback.B, projected.feedback._draw().B)  # the float64 draw differs
    born_double = pk.PFALinear(9, 6, expand_ratio=10, parametrization="projected", feedback_seed=1,
                               dtype=torch.float64)
    assert torch.equal(born_double.feedback.B, born_double.feedback._draw().B)


def test_reparametrize_holds_B_only_where_the_ops_read_it():
    """explicit -> projected drops the seed's B (M suffices); a B from an older checkpoint is not the seed's, so a
    projected layer holds it; projected -> explicit holds B again."""
    explicit = pk.PFALinear(8, 5, expand_ratio=10, parametrization="explicit", feedback_seed=2)
    projected = pk.reparametrize(copy.deepcopy(explicit), "projected")
    assert projected.feedback.B_held is None and torch.equal(projected.feedback.B, explicit.feedback.B)
    back = pk.reparametrize(copy.deepcopy(projected), "explicit")
    assert back.feedback.B_held is not None and torch.equal(back.feedback.B, explicit.feedback.B)
    old = {**{k: v for k, v in projected.state_dict().items() if not k.endswith("_extra_state")},
           "feedback.B": 2 * explicit.feedback.B}
    loaded = pk.PFALinear(8, 5, expand_ratio=10, parametrization="projected", feedback_seed=2)
    loaded.load_state_dict(old)
    assert torch.equal(loaded.feedback.B_held, 2 * explicit.feedback.B) and not loaded.feedback.B_from_seed
    torch.testing.assert_close(loaded.feedback.M[0], 4 * explicit.feedback.B @ explicit.feedback.B.T)
    assert pk.reparametrize(copy.deepcopy(loaded), "explicit").feedback.B_held is not None


def test_functional_projected_takes_B_none_with_M():
    x, weight, B = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), \
        torch.randn(4, 40, dtype=torch.float64)
    M, Z = (B @ B.T).unsqueeze(0), torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    pk.functional.pfa_linear_projected(x, weight, None, None, M, Z).sum().backward()
    grad_without_B = x.grad.clone()
    x.grad = None
    pk.functional.pfa_linear_projected(x, weight, None, B, M, Z).sum().backward()
    torch.testing.assert_close(x.grad, grad_without_B, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="B must be a torch.Tensor"):
        pk.functional.pfa_linear_projected(x, weight, None, None, None, Z)
