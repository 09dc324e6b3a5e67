"""Projected feedback: exact SGD equivalence with explicit R, reparametrize, check_optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import distributed_worker_teardown, relative_error, same_state_entry
from torch import nn

import pfa_kernels as pk


def _small_cnn(dtype=torch.float64, parametrization="explicit"):
    """Convs with stride and groups (grouped feedback; dense feedback with M kept, and with M applied through B), a
    sparse B, a linear head with C_mid < C_out."""
    torch.manual_seed(0)
    explicit = {"dtype": dtype, "parametrization": "explicit"}
    return nn.Sequential(
        pk.PFAConv2d(3, 8, 3, stride=2, padding=1, expand_ratio=10, feedback_seed=1, **explicit), nn.ReLU(),
        pk.PFAConv2d(8, 8, 3, padding=1, groups=2, expand_ratio=2, feedback_seed=2, feedback_groups="dense",
                     **explicit), nn.Tanh(),
        pk.PFAConv2d(8, 8, 3, stride=2, padding=1, groups=4, expand_ratio=1, feedback_density=(0.5, 1.0),
                     feedback_seed=3, feedback_groups="dense", **explicit), nn.ReLU(),
        pk.PFAConv2d(8, 8, 3, padding=1, groups=8, expand_ratio=3, feedback_seed=5, **explicit), nn.Tanh(),
        nn.Flatten(), pk.PFALinear(8 * 2 * 2, 5, expand_ratio=0.5, feedback_seed=4, **explicit))


def _pfa_layers(model):
    return [m for m in model.modules() if isinstance(m, pk.nn.PFA_LAYERS)]


def _sgd(model):
    """Three parameter groups covering momentum with dampening, Nesterov, and weight decay."""
    layers = _pfa_layers(model)
    forward = [p for layer in layers for p in (layer.weight, layer.bias)]
    conv_feedback = [layer.feedback.parameter for layer in layers[:-1]]
    linear_feedback = [layers[-1].feedback.parameter]
    return torch.optim.SGD([
        dict(params=forward, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        dict(params=conv_feedback, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=5e-3),
        dict(params=linear_feedback, lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-2),
    ])


def test_projected_sgd_trajectory_equals_explicit():
    """100 SGD steps in float64 with momentum, Nesterov, dampening and weight decay, lr and weight decay changed
    halfway: forward weights and W_fb of the explicit and the projected model agree to 1e-9 at every step."""
    explicit = _small_cnn()
    projected = pk.reparametrize(copy.deepcopy(explicit), "projected")
    assert all(layer.parametrization == "projected" for layer in _pfa_layers(projected))
    assert _pfa_layers(projected)[2].feedback.M is None  # groups 4, r = 1: M applied through B
    optimizers = {"explicit": _sgd(explicit), "projected": pk.check_optimizer(_sgd(projected), projected)}
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (16,), generator=generator)
    worst = 0.0
    for step in range(100):
        if step == 50:
            for optimizer in optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] *= 0.3
                    group["weight_decay"] *= 4
        batch = slice(8 * (step % 2), 8 * (step % 2) + 8)
        for name, model in (("explicit", explicit), ("projected", projected)):
            optimizers[name].zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizers[name].step()
        for layer_e, layer_p in zip(_pfa_layers(explicit), _pfa_layers(projected), strict=True):
            for expected, actual in ((layer_e.weight, layer_p.weight), (layer_e.bias, layer_p.bias),
                                     (layer_e.feedback.feedback_weight(), layer_p.feedback.feedback_weight())):
                error = relative_error(actual, expected)
                assert error < 1e-9, f"step {step}: relative error {error:.2e}"
                worst = max(worst, error)
    # The trajectory really moved: the feedback weights changed, not just stayed at their start.
    start = _small_cnn()
    moved = relative_error(_pfa_layers(explicit)[0].feedback.feedback_weight(),
                           _pfa_layers(start)[0].feedback.feedback_weight())
    assert moved > 1e-2 and worst < 1e-9


def test_reparametrize_round_trip_returns_the_same_R():
    model = _small_cnn()
    before = {i: (layer.feedback.R.detach().clone(), layer.feedback.feedback_weight().detach())
              for i, layer in enumerate(_pfa_layers(model))}
    pk.reparametrize(model, "projected")
    for i, layer in enumerate(_pfa_layers(model)):
        assert not hasattr(layer.feedback, "R") or "R" not in layer.feedback._parameters
        assert tuple(layer.feedback.Z.shape) == layer.feedback.Z_shape
        assert relative_error(layer.feedback.feedback_weight(), before[i][1]) < 1e-13
    assert _pfa_layers(model)[-1].feedback.R_null is None  # C_mid < C_out: R lies in B^T's range
    assert _pfa_layers(model)[0].feedback.R_null is not None
    pk.reparametrize(model, "explicit")
    for i, layer in enumerate(_pfa_layers(model)):
        assert layer.parametrization == "explicit" and layer.feedback.M is None
        assert relative_error(layer.feedback.R, before[i][0]) < 1e-12


def test_projected_layer_equals_explicit_layer_with_the_same_seed():
    for kwargs in (dict(expand_ratio=10), dict(expand_ratio=0.5), dict(groups=2, expand_ratio=3),
                   dict(groups=4, expand_ratio=1), dict(groups=2, expand_ratio=3, feedback_groups="dense"),
                   dict(groups=4, expand_ratio=1, feedback_groups="dense"), dict(groups=4, expand_ratio=0.5),
                   dict(expand_ratio=1, feedback_init="orthogonal"), dict(groups=4, feedback_init="orthogonal"),
                   dict(expand_ratio=1, feedback_init="identity"), dict(groups=2, expand_ratio=1,
                                                                        feedback_init="identity")):
        explicit = pk.PFAConv2d(8, 8, 3, feedback_seed=7, dtype=torch.float64, parametrization="explicit", **kwargs)
        projected = pk.PFAConv2d(8, 8, 3, feedback_seed=7, dtype=torch.float64, parametrization="projected", **kwargs)
        assert relative_error(projected.feedback.feedback_weight(), explicit.feedback.feedback_weight()) < 1e-12
        # Built projected, the way back to explicit gives the seeded R itself (its null part is re-derived).
        assert relative_error(projected.feedback.explicit_R(), explicit.feedback.R) < 1e-12, kwargs


def test_projected_state_dict_round_trip_keeps_the_null_part():
    model = pk.reparametrize(_small_cnn(), "projected")
    state = model.state_dict()
    assert "0.feedback.Z" in state and "0.feedback.R_null" in state and "0.feedback.M" not in state  # M: from B
    assert not any(key.endswith("feedback.R") for key in state)
    fresh = _small_cnn()
    for layer in _pfa_layers(fresh):
        layer.feedback = layer.feedback.as_projected()
        layer.feedback.R_null = None
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert same_state_entry(value, state[key]), key
    original = _small_cnn()
    pk.reparametrize(fresh, "explicit")
    for layer, expected in zip(_pfa_layers(fresh), _pfa_layers(original), strict=True):
        assert relative_error(layer.feedback.R, expected.feedback.R) < 1e-12


def test_loading_across_parametrizations_explains_itself():
    explicit_state = _small_cnn().state_dict()
    projected = pk.reparametrize(_small_cnn(), "projected")
    with pytest.raises(RuntimeError, match="parametrization='explicit'.*reparametrize"):
        projected.load_state_dict(explicit_state)
    # A backpropagation checkpoint (no feedback state) loads into a projected layer.
    conv = nn.Conv2d(3, 5, 3)
    layer = pk.PFAConv2d(3, 5, 3, parametrization="projected")
    Z = layer.feedback.Z.detach().clone()
    layer.load_state_dict(conv.state_dict())
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.feedback.Z, Z)


def test_masked_R_is_refused_and_nothing_changes():
    with pytest.raises(ValueError, match="masked R.*feedback_density=\\(B_density, 1.0\\)"):
        pk.PFAConv2d(4, 4, 3, feedback_density=0.5, parametrization="projected")
    with pytest.raises(ValueError, match="masked R"):
        pk.convert(nn.Sequential(nn.Linear(3, 4)), feedback_density=(1.0, 0.5), parametrization="projected")
    model = nn.Sequential(pk.PFALinear(3, 4, parametrization="explicit"),
                          pk.PFALinear(4, 2, feedback_density=0.5, parametrization="explicit"))
    with pytest.raises(ValueError, match="layer '1' has a masked R"):
        pk.reparametrize(model, "projected")
    assert all(layer.parametrization == "explicit" for layer in model)
    assert "R" in model[0].feedback._parameters


def test_reference_strategy_is_for_explicit_layers():
    with pytest.raises(ValueError, match="strategy='reference'.*explicit R"):
        pk.PFALinear(3, 4, parametrization="projected", strategy="reference")
    model = nn.Sequential(pk.PFALinear(3, 4, strategy="reference"))
    with pytest.raises(ValueError, match="strategy='reference'"):
        pk.reparametrize(model, "projected")
    with pytest.raises(ValueError, match="parametrization must be one of"):
        pk.reparametrize(model, "implicit")


def test_check_optimizer_accepts_sgd_and_rejects_adam():
    model = pk.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), parametrization="projected")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert pk.check_optimizer(sgd, model) is sgd
    pk.check_optimizer(torch.optim.ASGD(model.parameters()), model)
    for optimizer_class in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        with pytest.raises(ValueError, match=f"{optimizer_class.__name__} updates the projected feedback Z of "
                                             f"layer\\(s\\) '0', '2'.*linear in the gradient"):
            pk.check_optimizer(optimizer_class(model.parameters()), model)
    # Adam on the forward weights alone, or on an explicit model, is fine.
    weights_only = [p for name, p in model.named_parameters() if "feedback" not in name]
    pk.check_optimizer(torch.optim.Adam(weights_only), model)
    explicit = pk.convert(nn.Sequential(nn.Linear(3, 2)), parametrization="explicit")
    pk.check_optimizer(torch.optim.Adam(explicit.parameters()), explicit)
    with pytest.raises(TypeError, match="optimizer must be"):
        pk.check_optimizer("sgd", model)


def test_projected_convert_report_and_metrics():
    import torchvision

    torch.manual_seed(0)
    explicit = pk.convert(torchvision.models.resnet18(num_classes=10), expand_ratio=10, feedback_seed=0)
    torch.manual_seed(0)
    model = pk.convert(torchvision.models.resnet18(num_classes=10), parametrization="projected", expand_ratio=10,
                       feedback_seed=0)
    layers = _pfa_layers(model)
    assert all(layer.parametrization == "projected" for layer in layers)
    assert not any(name.endswith("feedback.R") for name, _ in model.named_parameters())
    # No parameter or per-step buffer with C_mid in its shape: only B (fixed) has it.
    for layer in layers:
        mid = layer.feedback.mid_channels
        assert all(mid not in p.shape for p in layer.feedback.parameters())
        out_channels = layer.weight.shape[0]
        assert layer.feedback.M.shape == (1, out_channels, out_channels)
    rows, explicit_rows = pk.metrics.report(model), pk.metrics.report(explicit)
    assert len(rows) == len(layers) == len(explicit_rows)
    for row, explicit_row in zip(rows, explicit_rows, strict=True):
        assert row["path_alignment"] == pytest.approx(explicit_row["path_alignment"], abs=1e-4)
        assert row["norm_ratio"] == pytest.approx(explicit_row["norm_ratio"], rel=1e-5)


def _ddp_batch():
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(8, 3, 8, 8, dtype=torch.float64, generator=generator)
    return inputs, torch.randint(0, 5, (8,), generator=generator)


def _ddp_worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist

    inputs, labels = _ddp_batch()  # drawn here, not sent: no tensors through spawn's shared-memory channel
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    with distributed_worker_teardown():
        model = nn.parallel.DistributedDataParallel(pk.reparametrize(_small_cnn(), "projected"))
        optimizer = _sgd(model.module)
        shard = slice(rank * len(inputs) // world_size, (rank + 1) * len(inputs) // world_size)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[shard]), labels[shard]).backward()
            optimizer.step()
        if rank == 0:
            torch.save(model.module.state_dict(), result_file)


def test_projected_ddp_equals_one_process(tmp_path):
    """2-process gloo DDP, 3 SGD steps on half batches each: Z's gradient all-reduces like any other, so the
    result equals one process on the whole batch."""
    inputs, labels = _ddp_batch()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2)
    single = pk.reparametrize(_small_cnn(), "projected")
    optimizer = _sgd(single)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(single(inputs), labels).backward()
        optimizer.step()
    distributed = torch.load(tmp_path / "ddp.pt")
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert relative_error(distributed[key], value) < 1e-12, key
        else:
            assert distributed[key] == value, key
    assert relative_error(distributed["0.feedback.Z"], pk.reparametrize(_small_cnn(), "projected")[0].feedback.Z) > 1e-3


class _LoggingSGD(torch.optim.SGD):
    """A subclass that changes nothing in the update (step is SGD's)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.note = "logged"


class _ClippingSGD(torch.optim.SGD):
    """A subclass with its own step: check_optimizer cannot know that it is linear."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-1, 1)
        return super().step(closure)


def _projected_model():
    return pk.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), parametrization="projected")


def test_check_optimizer_accepts_subclasses_that_keep_the_step():
    model = _projected_model()
    logging_sgd = _LoggingSGD(model.parameters(), lr=0.1, momentum=0.9)
    assert pk.check_optimizer(logging_sgd, model) is logging_sgd
    with pytest.raises(ValueError, match="_ClippingSGD updates the projected feedback Z of layer\\(s\\) '0', '2'.*"
                                         "_ClippingSGD overrides step"):
        pk.check_optimizer(_ClippingSGD(model.parameters(), lr=0.1), model)

    class _LoggingAdam(torch.optim.Adam):
        pass

    with pytest.raises(ValueError, match="_LoggingAdam updates the projected feedback Z"):
        pk.check_optimizer(_LoggingAdam(model.parameters()), model)


@pytest.mark.parametrize("switch_to", ["projected", "explicit"])
def test_check_optimizer_detects_an_optimizer_built_before_reparametrize(switch_to):
    """reparametrize replaces each layer's feedback Parameter: an optimizer built before it still holds the old one,
    and the new one would never learn."""
    start = "explicit" if switch_to == "projected" else "projected"
    model = pk.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), parametrization=start)
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    weights_only = torch.optim.SGD([p for name, p in model.named_parameters() if "feedback" not in name], lr=0.1)
    pk.check_optimizer(stale, model)
    pk.reparametrize(model, switch_to)
    with pytest.raises(ValueError, match="holds the feedback parameter of layer\\(s\\) '0', '2' that "
                                         "pk.reparametrize replaced.*Build the optimizer after pk.reparametrize"):
        pk.check_optimizer(stale, model)
    pk.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    pk.check_optimizer(weights_only, model)  # it holds nothing that reparametrize replaced


# ----------------------------------------------------------------------------- parametrization="auto" (the default)


def test_auto_is_projected_wherever_exact():
    """The default: projected (BP's cost) unless R is masked, B is ill-conditioned or the literal algorithm runs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns about conditioning: it does not project then
        assert pk.PFAConv2d(4, 8, 3).parametrization == "projected"
        assert pk.PFALinear(8, 4, expand_ratio=2).parametrization == "projected"
        assert pk.PFAConv2d(8, 8, 3, groups=8).parametrization == "projected"
        assert pk.PFAConv2d(4, 8, 3, feedback_density=0.5).parametrization == "explicit"  # masked R
        assert pk.PFAConv2d(4, 8, 3, feedback_density=(0.5, 1.0)).parametrization == "projected"  # masked B only
        assert pk.PFAConv2d(4, 8, 3, strategy="reference").parametrization == "explicit"
        square = pk.PFALinear(64, 64, expand_ratio=1, feedback_seed=0)  # cond(B) > 100 for this seed
        assert square.parametrization == "explicit"
        assert pk.convert(nn.Sequential(nn.Linear(4, 4)))[0].parametrization == "projected"
    explicit = pk.PFALinear(64, 64, expand_ratio=1, feedback_seed=0, parametrization="explicit")
    assert torch.equal(square.feedback.R, explicit.feedback.R) and torch.equal(square.feedback.B, explicit.feedback.B)
    with pytest.warns(UserWarning, match="ill-conditioned"):  # asked for by name, it projects and says so
        pk.PFALinear(64, 64, expand_ratio=1, feedback_seed=0, parametrization="projected")
    with pytest.raises(ValueError, match="parametrization must be one of \\('auto', 'explicit', 'projected'\\)"):
        pk.PFALinear(4, 4, parametrization="implicit")


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_a_non_sgd_optimizer_on_projected_feedback_raises_at_its_first_step(optimizer_class):
    model = pk.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)))
    assert all(layer.parametrization == "projected" for layer in _pfa_layers(model))
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    before = copy.deepcopy(model.state_dict())
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    name = optimizer_class.__name__
    with pytest.raises(ValueError, match=f"{name} updates the projected feedback .*'Z \\(4, 3, 3, 3\\) \\(a 3 -> 4 "
                                         f"3x3 conv layer\\)'"):
        optimizer.step()
    assert all(same_state_entry(value, before[key]) for key, value in model.state_dict().items())  # nothing stepped
    with pytest.raises(ValueError, match="parametrization='explicit'"):  # and again: it never passes
        optimizer.step()
    # A copy of the model (deepcopy makes new feedback modules) is checked as well.
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="updates the projected feedback"):
        optimizer_class(twin.parameters(), lr=0.1).step()
    # Not for SGD, not for an explicit model, not for an Adam that holds no Z.
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).step()
    explicit = pk.reparametrize(copy.deepcopy(model), "explicit")
    explicit(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer_class(explicit.parameters(), lr=0.1).step()
    optimizer_class([p for n, p in model.named_parameters() if "feedback" not in n], lr=0.1).step()
