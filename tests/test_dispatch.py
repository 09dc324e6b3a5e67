"""Measured dispatch (pfa_kernels/dispatch.py): the fastest *agreeing* candidate wins, a wrong one is rejected with
one warning, a raising one is skipped, the first call returns the PyTorch result, decisions round-trip through a
file, static mode measures nothing, nothing is measured while tracing, concurrent first calls measure once."""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import torch
from conftest import DEVICES, assert_matches_reference, requires_cuda

import pfa_kernels as pk
from pfa_kernels import dispatch
from pfa_kernels.planner import Plan


@pytest.fixture(autouse=True)
def _fresh_decisions(monkeypatch):
    monkeypatch.delenv("PFA_KERNELS_DISPATCH", raising=False)
    dispatch.clear()
    yield
    dispatch.clear()


def _key(name="linear", dtype=torch.float32):
    return dispatch.make_key(torch.device("cpu"), dtype, name, (3, 4), 6, (6, 4), "", (), "explicit", "auto",
                             [True, True, True, True], 5)


def _plan(backend, input_order="product", feedback_order="product"):
    return Plan(input_order, feedback_order, backend, {})


class FakeKernels:
    """execute(plan) for synthetic candidates: each backend returns the reference gradients (times `scale`) after
    sleeping `delay` seconds, or raises; every call is counted."""

    def __init__(self, behaviour):
        self.behaviour = behaviour  # backend -> (delay seconds, scale or an exception)
        self.expected = (torch.arange(6.0).reshape(2, 3), torch.ones(3), torch.empty(0), torch.full((4,), 2.0))
        self.calls = {backend: 0 for backend in behaviour}
        self.lock = threading.Lock()

    def __call__(self, plan):
        with self.lock:
            self.calls[plan.backend] += 1
        delay, scale = self.behaviour[plan.backend]
        time.sleep(delay)
        if isinstance(scale, Exception):
            raise scale
        return tuple(t * scale for t in self.expected)


def _run(kernels, key=None, candidates=("torch", "fast", "wrong")):
    reference = _plan("torch")
    return dispatch.run(key or _key(), torch.device("cpu"), reference, [_plan(b) for b in candidates], kernels)


def test_fastest_agreeing_candidate_wins_and_wrong_one_is_rejected_with_one_warning():
    kernels = FakeKernels({"torch": (0.02, 1.0), "fast": (0.001, 1.0 + 1e-7), "wrong": (0.0, 1.5)})
    with pytest.warns(dispatch.DispatchWarning, match=r"wrong:product\+product relative error 0\.5 > 0\.0001"):
        result = _run(kernels)
    for actual, expected in zip(result, kernels.expected, strict=True):
        assert torch.equal(actual, expected)  # the first call returns the PyTorch result itself
    (row,) = dispatch.table()
    assert row["choice"] == "fast:product+product"
    assert set(row["times"]) == {"torch:product+product", "fast:product+product"}
    assert row["times"]["fast:product+product"] < row["times"]["torch:product+product"]
    assert "wrong:product+product" in row["rejected"] and row["errors"]["wrong:product+product"] == pytest.approx(0.5)
    assert kernels.calls["wrong"] == 1  # checked once, never timed again
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once per key, not per call
        before = dict(kernels.calls)
        again = _run(kernels)
    assert kernels.calls["fast"] == before["fast"] + 1 and kernels.calls["torch"] == before["torch"]
    assert torch.allclose(again[0], kernels.expected[0], rtol=1e-6)


def test_a_fast_wrong_candidate_never_wins_even_when_it_is_the_fastest():
    kernels = FakeKernels({"torch": (0.01, 1.0), "wrong": (0.0, 1.0 + 1e-3)})  # 1e-3 > float32's 1e-4
    with pytest.warns(dispatch.DispatchWarning):
        _run(kernels, candidates=("torch", "wrong"))
    assert dispatch.table()[0]["choice"] == "torch:product+product"


def test_tolerance_follows_the_dtype():
    kernels = FakeKernels({"torch": (0.005, 1.0), "fast": (0.0, 1.0 + 1e-3)})
    _run(kernels, key=_key(dtype=torch.bfloat16), candidates=("torch", "fast"))  # within bf16's 5e-2
    assert dispatch.table()[0]["choice"] == "fast:product+product"
    dispatch.clear()
    kernels = FakeKernels({"torch": (0.005, 1.0), "fast": (0.0, 1.0 + 1e-6)})
    with pytest.warns(dispatch.DispatchWarning, match="float64"):
        _run(kernels, key=_key(dtype=torch.float64), candidates=("torch", "fast"))  # beyond float64's 1e-9
    assert dispatch.table()[0]["choice"] == "torch:product+product"


def test_a_raising_candidate_is_skipped_with_the_warning():
    kernels = FakeKernels({"torch": (0.0, 1.0), "broken": (0.0, RuntimeError("invalid configuration argument"))})
    with pytest.warns(dispatch.DispatchWarning, match="broken:product\\+product raised RuntimeError: invalid config"):
        _run(kernels, candidates=("torch", "broken"))
    row = dispatch.table()[0]
    assert row["choice"] == "torch:product+product" and "broken:product+product" in row["rejected"]


def test_non_finite_or_misshapen_results_disagree():
    expected = (torch.ones(3), torch.empty(0))
    assert dispatch.max_relative_error((torch.tensor([1.0, float("nan"), 1.0]), torch.empty(0)), expected) == \
        float("inf")
    assert dispatch.max_relative_error((torch.ones(4), torch.empty(0)), expected) == float("inf")
    assert dispatch.max_relative_error((torch.ones(3), torch.empty(0)), expected) == 0.0


def test_static_mode_measures_nothing(monkeypatch):
    monkeypatch.setenv("PFA_KERNELS_DISPATCH", "static")
    kernels = FakeKernels({"torch": (0.0, 1.0), "fast": (0.0, 1.0)})
    for _ in range(3):
        _run(kernels, candidates=("torch", "fast"))
    assert kernels.calls == {"torch": 3, "fast": 0} and dispatch.table() == []
    monkeypatch.setenv("PFA_KERNELS_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="PFA_KERNELS_DISPATCH must be one of"):
        _run(kernels)


def test_the_mode_follows_every_change_of_the_environment(monkeypatch):
    """dispatch.mode() reads os.environ's entries directly (and remembers what each valid entry means): each change,
    back and forth, and a bad value every time it is set, are seen at the next call."""
    for value, expected in [("static", "static"), ("measure", "measure"), (None, "measure"), ("static", "static"),
                            ("", "measure"), ("fastest", None), ("static", "static"), ("fastest", None)]:
        if value is None:
            monkeypatch.delenv("PFA_KERNELS_DISPATCH", raising=False)
        else:
            monkeypatch.setenv("PFA_KERNELS_DISPATCH", value)  # (os.environ[...] = value, restored afterwards)
        if expected is None:
            with pytest.raises(ValueError, match="PFA_KERNELS_DISPATCH must be one of .* got 'fastest'"):
                dispatch.mode()
        else:
            assert dispatch.mode() == expected, value


def test_nothing_is_measured_while_tracing(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kernels = FakeKernels({"torch": (0.0, 1.0), "fast": (0.0, 1.0)})
    _run(kernels, candidates=("torch", "fast"))
    assert kernels.calls == {"torch": 1, "fast": 0} and dispatch.table() == []


def test_concurrent_first_calls_measure_once():
    kernels = FakeKernels({"torch": (0.01, 1.0), "fast": (0.002, 1.0)})
    measured = []
    original = dispatch._measure

    def counting_measure(*args):
        measured.append(threading.get_ident())
        return original(*args)

    results = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        results.append(_run(kernels, candidates=("torch", "fast")))

    dispatch._measure = counting_measure
    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        dispatch._measure = original
    assert len(measured) == 1 and len(results) == 4 and len(dispatch.table()) == 1


def test_deterministic_mode_never_measures_atomic_kernels():
    plan = _plan("triton", "sequence", "product")
    assert dispatch.nondeterministic(plan, "cuda", "conv2d")
    assert dispatch.nondeterministic(_plan("cpp", "sequence"), "cuda", "linear")
    assert not dispatch.nondeterministic(_plan("cpp", "sequence"), "cpu", "linear")
    assert not dispatch.nondeterministic(_plan("triton", "product"), "cuda", "conv2d")
    kernels = FakeKernels({"torch": (0.01, 1.0), "triton": (0.0, 1.0)})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        key = _key()
        assert key.deterministic
        dispatch.run(key, torch.device("cpu"), _plan("torch"), [plan], kernels)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert kernels.calls["triton"] == 0 and dispatch.table()[0]["choice"] == "torch:product+product"


def test_order_pairs_within_twice_the_fewest_macs():
    macs = {("product", "product"): 100, ("product", "sequence"): 190, ("sequence", "product"): 210,
            ("sequence", "sequence"): 400, "bp": 50}
    plan = Plan("product", "product", "torch", macs)
    assert dispatch.order_pairs(plan, "auto") == [("product", "product"), ("product", "sequence")]
    assert dispatch.order_pairs(plan, "product") == [("product", "product")]
    assert [dispatch.position_bucket(p) for p in (0, 1, 2, 3, 5, 64, 65)] == [0, 1, 2, 4, 8, 64, 128]


def test_save_and_load_round_trip(tmp_path):
    kernels = FakeKernels({"torch": (0.01, 1.0), "fast": (0.0, 1.0)})
    _run(kernels, candidates=("torch", "fast"))
    table = dispatch.table()
    path = tmp_path / "dispatch.json"
    assert dispatch.save(path) == 1
    dispatch.clear()
    assert dispatch.load(path) == 1
    assert dispatch.table()[0]["choice"] == table[0]["choice"] and dispatch.table()[0]["key"] == table[0]["key"]
    calls = dict(kernels.calls)
    _run(kernels, candidates=("torch", "fast"))  # the loaded decision runs; nothing is measured
    assert kernels.calls == {"torch": calls["torch"], "fast": calls["fast"] + 1}

    payload = json.loads(path.read_text())
    payload["versions"]["torch"] = "0.0.1"
    path.write_text(json.dumps(payload))
    dispatch.clear()
    with pytest.warns(dispatch.DispatchWarning, match="not loaded"):
        assert dispatch.load(path) == 0
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a pfa_kernels dispatch table"):
        dispatch.load(path)


# ----------------------------------------------------------------------------- real layers


@pytest.mark.parametrize("parametrization", ["explicit", "projected"])
@pytest.mark.parametrize("device", DEVICES)
def test_auto_layers_match_the_reference_before_and_after_the_decision(device, parametrization):
    layer = pk.PFALinear(9, 5, expand_ratio=3, parametrization=parametrization, dtype=torch.float64, device=device)
    conv = pk.PFAConv2d(3, 6, 3, stride=2, padding=1, parametrization=parametrization, dtype=torch.float64,
                        device=device)
    for module, x in ((layer, torch.randn(4, 9, dtype=torch.float64, device=device)),
                      (conv, torch.randn(2, 3, 7, 6, dtype=torch.float64, device=device))):
        for _ in range(2):  # first call: PyTorch's result while measuring; second: the measured choice
            assert_matches_reference(module, x, 1e-10)
    keys = [row["key"]["op"] for row in dispatch.table()]
    assert "linear" in keys and "conv2d" in keys


def test_backward_plan_shows_the_measured_choice_and_timings():
    layer = pk.PFALinear(16, 8, expand_ratio=4, parametrization="explicit")
    before = layer.backward_plan((5, 16))
    assert before.backend == "torch" and "not measured yet" in before.reason and before.timings == {}
    layer(torch.randn(5, 16, requires_grad=True)).sum().backward()
    after = layer.backward_plan((6, 16))  # P = 6 shares the bucket of P = 5 (8)
    row = dispatch.table()[0]
    assert after.backend == row["choice"].split(":")[0] and "measured on cpu" in after.reason
    assert set(after.timings["seconds"]) == set(row["times"]) and after.timings["rejected"] == {}
    expected_candidates = {f"{b}:{i}+{f}" for b in dispatch.candidate_backends("cpu", torch.float32, "explicit")
                           for i, f in dispatch.order_pairs(before, "auto")}
    assert set(row["candidates"]) == expected_candidates


def test_a_named_backend_is_never_measured():
    layer = pk.PFALinear(6, 4, backend="torch")
    layer(torch.randn(3, 6, requires_grad=True)).sum().backward()
    assert dispatch.table() == []
    assert "measured" not in layer.backward_plan((3, 6)).reason


@pytest.mark.skipif("cpp" not in dispatch.available_backends("cpu"), reason="the compiled extension is not built")
def test_a_wrong_compiled_kernel_is_rejected_and_the_layer_stays_exact(monkeypatch):
    """A cpp op that returns dL/dx 1% off is caught by the check, warned about, and never used."""
    real = torch.ops.pfa_kernels.cpp_linear_backward

    def wrong(*args):
        grads = real(*args)
        return (grads[0] * 1.01, *grads[1:])

    monkeypatch.setattr(torch.ops.pfa_kernels, "cpp_linear_backward", wrong)
    layer = pk.PFALinear(7, 5, expand_ratio=2, dtype=torch.float64, parametrization="explicit")
    x = torch.randn(3, 7, dtype=torch.float64)
    with pytest.warns(dispatch.DispatchWarning, match=r"cpp:\S+ relative error 0\.01 > 1e-09 \(float64\)"):
        assert_matches_reference(layer, x, 1e-10)
    assert_matches_reference(layer, x, 1e-10)
    plan = layer.backward_plan(tuple(x.shape))
    assert plan.backend == "torch" and plan.timings["rejected"]
    assert all(name.startswith("cpp") for name in plan.timings["rejected"])


def test_auto_measures_only_backends_that_take_the_dtype(monkeypatch):
    """float64 on a GPU: "auto" never measures (or picks) Triton, which takes fp32/fp16/bf16; a named Triton backend
    raises naming the dtype. Projected and fixed-feedback layers measure only what computes something different."""
    monkeypatch.setattr(dispatch, "available_backends", lambda device_type, device=None: ("torch", "cpp", "triton"))
    assert dispatch.candidate_backends("cuda", torch.float64, "explicit") == ("torch", "cpp")
    assert dispatch.candidate_backends("cuda", torch.bfloat16, "explicit") == ("torch", "cpp", "triton")
    assert dispatch.candidate_backends("cuda", torch.float32, "projected") == ("torch", "triton")
    assert dispatch.candidate_backends("cuda", torch.float32, "direct") == ("torch",)
    assert dispatch.candidate_backends("cpu", torch.float32, "explicit") == ("torch", "cpp")  # never the interpreter
    assert dispatch.check_backend("auto", "cuda", torch.float64) == "auto"
    with pytest.raises(TypeError, match="takes float32, float16 or bfloat16 tensors; got torch.float64"):
        dispatch.check_backend("triton", "cuda", torch.float64)


@requires_cuda
@pytest.mark.cuda
def test_auto_on_cuda_float64_and_low_precision_run_and_agree():
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        layer = pk.PFAConv2d(16, 32, 3, padding=1, device="cuda", dtype=dtype)
        x = torch.randn(4, 16, 12, 12, device="cuda", dtype=dtype, requires_grad=True)
        for _ in range(2):
            layer(x).sum().backward()
    for row in dispatch.table():
        assert not row["rejected"], row
        if row["key"]["dtype"] == "float64":
            assert all(not name.startswith("triton") for name in row["candidates"])


def test_feedback_weights_auto_takes_every_dtype(monkeypatch):
    """pk.feedback_weights(model) in float64 with Triton available: "auto" forms the products in PyTorch (it used to
    resolve to Triton and raise); backend="triton" raises naming the dtype."""
    monkeypatch.setattr(dispatch, "available_backends", lambda device_type, device=None: ("torch", "cpp", "triton"))
    model = torch.nn.Sequential(pk.PFAConv2d(2, 3, 3, dtype=torch.float64), pk.PFALinear(4, 5, dtype=torch.float64))
    weights = pk.feedback_weights(model)
    assert set(weights) == {"0", "1"}
    for name, layer in model.named_children():
        assert torch.equal(weights[name], layer.feedback_weight())
    with pytest.raises(TypeError, match="backend='triton' takes float32, float16 or bfloat16 tensors; got torch.float"):
        pk.feedback_weights(model, backend="triton")
