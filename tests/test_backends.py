"""Every backend on every device against the literal algorithm: layers x strategies x parametrizations x backends
(torch, cpp, triton, auto) x dtypes x devices (cpu; cuda when present, where the Triton kernels compile natively and
the compiled ops run their CUDA kernels). Then what only a GPU can show: no host-device synchronization in a
backward, a training step captured in a CUDA graph, a second GPU, concurrent first calls.

On CPU the Triton rows are skipped (its interpreter runs in tests/test_triton.py); GPU rows are skipped without a
GPU and are meant to run there: `make gpu-check` runs every test marked `cuda`.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import (
    DEVICES,
    LOW_PRECISION_ERROR_FACTOR,
    LOW_PRECISION_FLOOR,
    TOLERANCE,
    build,
    explicit_twin,
    feedback_group_runs,
    layer_gradients,
    literal_forward,
    projected_to_R_grad,
    relative_error,
    requires_cuda,
    requires_two_gpus,
)

import pfa_kernels as pk
from pfa_kernels import dispatch
from pfa_kernels.feedback import PARAMETRIZATIONS

CASES = ("linear", "2d-k1", "2d-k3-pad1", "2d-k5-stride2", "2d-dilation2", "2d-groups2", "2d-depthwise-stride2",
         "1d-stride2", "3d-stride2")
BACKENDS = ("torch", "cpp", "triton", "auto")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _skip_unavailable(device, backend):
    if backend != "auto" and backend not in dispatch.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available for {device} here")


def _skip_unrunnable(device, backend, dtype):
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton on CPU runs only under its interpreter: tests/test_triton.py, in its own process")
    _skip_unavailable(device, backend)
    if backend == "triton" and not dispatch.takes_dtype("triton", dtype):
        pytest.skip("Triton takes fp32/fp16/bf16 (float64 raising is tested below)")


def _float64_layer(case, strategy, parametrization, dtype=torch.float64, feedback_groups="grouped"):
    # Projected rounding grows with cond(B) (5.6 at r = 2, 1.9 at the paper's r = 10): fp16/bf16 rows of projected
    # layers use r = 10, as tests/test_functional.py's autocast test does, so the bound measures the kernels.
    ratio = {"expand_ratio": 10} if parametrization == "projected" and dtype not in TOLERANCE else {}
    if case == "linear":
        layer = pk.PFALinear(9, 7, dtype=torch.float64, strategy=strategy, parametrization=parametrization,
                             **{"expand_ratio": 3, **ratio})
        return layer, torch.randn(2, 5, 9, dtype=torch.float64)
    layer, _, _, x = build(case, strategy=strategy, parametrization=parametrization, feedback_groups=feedback_groups,
                           **ratio)
    return layer, x


def _gradients_in_R_terms(layer, grads):
    """A projected layer's dL/dZ as dL/dR = B^T dL/dZ (float64), so every layer compares with the literal R."""
    grads = {name: grad.double().cpu() for name, grad in grads.items()}
    if layer.parametrization == "projected":
        grads["R"] = projected_to_R_grad(_cpu64(layer), grads["R"])
    return grads


def _cpu64(layer):
    return copy.deepcopy(layer).to("cpu", torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("case, strategy, feedback_groups", feedback_group_runs(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_backend_matches_reference(device, case, strategy, feedback_groups, parametrization, backend, dtype):
    """float64/float32: relative error against the float64 literal algorithm on the same (rounded) values below
    TOLERANCE; fp16/bf16: at most 3x the error of the literal algorithm run in that dtype on that device."""
    _skip_unrunnable(device, backend, dtype)
    exact_layer, x = _float64_layer(case, strategy, parametrization, dtype, feedback_groups)
    layer = copy.deepcopy(exact_layer).to(device, dtype)
    layer.backend = backend
    exact_layer.load_state_dict(_cpu64(layer).state_dict())  # the reference sees the rounded values
    x = x.to(dtype)
    grad_output = None
    for _ in range(2 if backend == "auto" else 1):  # "auto": the measuring call, then the measured choice
        _, grads, grad_output = layer_gradients(layer, x.to(device), grad_output)
    assert all(grad.dtype == dtype and grad.device.type == device for grad in grads.values())
    grads = _gradients_in_R_terms(layer, grads)
    twin = explicit_twin(exact_layer) if parametrization == "projected" else exact_layer
    _, exact, _ = layer_gradients(twin, x.double(), grad_output.double().cpu(), literal_forward(twin))
    if dtype in TOLERANCE:
        for name, expected in exact.items():
            error = relative_error(grads[name], expected)
            assert error < TOLERANCE[dtype], f"grad {name}: relative error {error:.3e}"
        return
    low_twin = copy.deepcopy(twin).to(device, dtype)
    _, low, _ = layer_gradients(low_twin, x.to(device), grad_output, literal_forward(low_twin))
    for name, expected in exact.items():
        error, reference_error = relative_error(grads[name], expected), relative_error(low[name], expected)
        bound = LOW_PRECISION_ERROR_FACTOR * reference_error + LOW_PRECISION_FLOOR[dtype]
        assert error <= bound, f"grad {name}: {error:.3e} > {bound:.3e} (reference's own error {reference_error:.3e})"


@pytest.mark.parametrize("device", DEVICES)
def test_triton_refuses_float64_and_auto_takes_it(device):
    layer = pk.PFAConv2d(3, 4, 3, dtype=torch.float64, device=device, backend="triton")
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, device=device)
    with pytest.raises((TypeError, RuntimeError), match="triton"):
        layer(x)
    layer.backend = "auto"
    layer(x.requires_grad_()).sum().backward()
    layer(x).sum().backward()
    assert all(not row["choice"].startswith("triton") for row in dispatch.table())


# ----------------------------------------------------------------------------- GPU only


def _small_cnn(parametrization, backend, device="cuda"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        pk.PFAConv2d(3, 16, 3, padding=1, parametrization=parametrization, backend=backend),
        torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        pk.PFAConv2d(16, 32, 3, stride=2, padding=1, parametrization=parametrization, backend=backend),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        pk.PFALinear(32, 10, parametrization=parametrization, backend=backend))
    return model.to(device)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_no_host_device_synchronization_in_a_backward(parametrization, backend):
    _skip_unavailable("cuda", backend)
    model = _small_cnn(parametrization, backend)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    for strategy in ("product", "sequence", "auto"):
        for layer in model:
            if hasattr(layer, "strategy"):
                layer.strategy = strategy
        model(x).sum().backward()  # "auto" measures here (measuring synchronizes); the call below must not
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_training_step_captured_in_a_cuda_graph(parametrization, backend):
    """Forward, PFA backward and an SGD step captured once and replayed equal the same steps run eagerly."""
    _skip_unavailable("cuda", backend)
    eager, graphed = _small_cnn(parametrization, backend), _small_cnn(parametrization, backend)
    graphed.load_state_dict(eager.state_dict())
    inputs = [torch.randn(8, 3, 16, 16, device="cuda") for _ in range(4)]
    targets = [torch.randint(0, 10, (8,), device="cuda") for _ in range(4)]

    def step(model, optimizer, x, y):
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    graph_opt = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    static_x, static_y = inputs[0].clone(), targets[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and "auto"'s measurement) outside the capture
        step(graphed, graph_opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, eager_opt, inputs[0], targets[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, graph_opt, static_x, static_y)
    for x, y in zip(inputs[1:], targets[1:], strict=True):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        loss = step(eager, eager_opt, x, y)
        torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@requires_two_gpus
@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_on_the_second_gpu(backend):
    _skip_unavailable("cuda", backend)
    for strategy in ("product", "sequence"):
        for parametrization in PARAMETRIZATIONS:
            layer, x = _float64_layer("2d-k3-pad1", strategy, parametrization)
            fast = copy.deepcopy(layer).to("cuda:1", torch.float32)
            fast.backend = backend
            with torch.cuda.device(0):  # the current device is not the tensors' device
                _, grads, grad_output = layer_gradients(fast, x.float().to("cuda:1"))
            assert all(grad.device == torch.device("cuda:1") for grad in grads.values())
            layer.load_state_dict(_cpu64(fast).state_dict())
            twin = explicit_twin(layer) if parametrization == "projected" else layer
            _, exact, _ = layer_gradients(twin, x.float().double(), grad_output.double().cpu(), literal_forward(twin))
            grads = _gradients_in_R_terms(fast, grads)
            for name, expected in exact.items():
                assert relative_error(grads[name], expected) < TOLERANCE[torch.float32], name


@requires_cuda
@pytest.mark.cuda
def test_concurrent_first_calls_on_one_gpu():
    """Backward on several threads at once (as DataParallel's replicas run it), each the first call of its key:
    every result equals the literal algorithm and each key is measured once."""
    layer64, _ = _float64_layer("2d-k3-pad1", "auto", "explicit")
    layer = copy.deepcopy(layer64).to("cuda", torch.float32)
    inputs = [torch.randn(2 + i, 5, 7, 6, device="cuda") for i in range(4)]
    results, errors = {}, []

    def worker(i):
        try:
            x = inputs[i].clone().requires_grad_(True)
            grad_output = torch.randn_like(layer(x))
            results[i] = (torch.autograd.grad(layer(x), (x, layer.weight), grad_output), grad_output)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    layer64.load_state_dict(_cpu64(layer).state_dict())
    for i, ((grad_x, grad_weight), grad_output) in results.items():
        x = inputs[i].double().cpu().requires_grad_(True)
        expected = torch.autograd.grad(literal_forward(layer64)(x), (x, layer64.weight), grad_output.double().cpu())
        assert relative_error(grad_x, expected[0]) < 1e-5 and relative_error(grad_weight, expected[1]) < 1e-5
    keys = [tuple(row["key"].values()) for row in dispatch.table()]
    assert len(keys) == len(set(keys))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_model_feedback_weights_on_the_gpu(parametrization):
    """pk.feedback_weights with the Triton grouped GEMM (its tables in one pinned, non-blocking copy) equals every
    layer's B·R (or M·Z) formed in float64, and makes no host-device synchronization."""
    _skip_unavailable("cuda", "triton")
    model = _small_cnn(parametrization, "auto")
    with torch.no_grad():  # warm-up: Triton compiles (and synchronizes) on a kernel's first launch
        pk.feedback_weights(model, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights = pk.feedback_weights(model, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, layer in model.named_modules():
        if isinstance(layer, pk.nn.PFA_LAYERS):
            expected = _cpu64(layer).feedback_weight()
            assert relative_error(weights[name].double().cpu(), expected) < 1e-5, name
