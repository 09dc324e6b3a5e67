"""Devices in the compiled ops: every tensor argument on grad_output's device (B's for the feedback product),
else an error naming the stray argument; the CUDA kernels run on their tensors' device, whatever the current
device is.

On CPU the checks are reached two ways: a meta tensor among CPU ones dispatches to the Meta (fake) kernel, which
checks as the C++ op does; redispatching that call to the CPU key reaches the C++ check itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error, requires_cuda, requires_two_gpus

import pfa_kernels as pk
from pfa_kernels.backends import cpp  # noqa: F401  (loads pfa_kernels._C)

CPU_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
MASK = [True, True, True, True]

# op: (anchor argument, the arguments checked against it)
ARGUMENTS = {
    "cpp_feedback_product": ("B", ("R",)),
    "cpp_linear_sequence_input_grad": ("grad_output", ("B", "R")),
    "cpp_linear_backward": ("grad_output", ("x", "weight", "B", "R")),
    "cpp_conv_backward": ("grad_output", ("x", "weight", "B", "R")),
}
CASES = [(op, name) for op, (anchor, names) in ARGUMENTS.items() for name in (anchor, *names)]


def _tensors(op, device="cpu", dtype=torch.float64):
    """{argument name: tensor} for a small call of op, on device."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype).to(device)

    if op == "cpp_feedback_product":
        return {"B": randn(6, 8), "R": randn(8, 2, 3, 3)}
    if op == "cpp_linear_sequence_input_grad":
        return {"grad_output": randn(5, 6), "B": randn(6, 8), "R": randn(8, 7)}
    if op == "cpp_linear_backward":
        return {"grad_output": randn(3, 2, 6), "x": randn(3, 2, 5), "weight": randn(6, 5), "B": randn(6, 8),
                "R": randn(8, 5)}
    return {"grad_output": randn(2, 6, 3, 2), "x": randn(2, 4, 6, 5), "weight": randn(6, 4, 3, 3), "B": randn(6, 8),
            "R": randn(8, 4, 3, 3)}


def _call_arguments(op, t, orders=("sequence", "sequence")):
    if op == "cpp_feedback_product":
        return (t["B"], t["R"], 2)
    if op == "cpp_linear_sequence_input_grad":
        return (t["grad_output"], t["B"], t["R"])
    if op == "cpp_linear_backward":
        return (t["grad_output"], t["x"], t["weight"], t["B"], t["R"], *orders, MASK)
    return (t["grad_output"], t["x"], t["weight"], t["B"], t["R"], [2, 2], [1, 0], [1, 1], 1, *orders, MASK)


def _message(op, stray, stray_device, others_device):
    """The error for `stray` alone on stray_device: it names the first argument off the anchor's device."""
    anchor, names = ARGUMENTS[op]
    if stray == anchor:
        return rf"pfa_kernels::{op}: {names[0]} is on {others_device} but {anchor} is on {stray_device};"
    return rf"pfa_kernels::{op}: {stray} is on {stray_device} but {anchor} is on {others_device};"


def _with_stray(op, stray, stray_device, others_device="cpu"):
    tensors = _tensors(op, others_device)
    tensors[stray] = tensors[stray].to(stray_device)
    return tensors


@pytest.mark.parametrize("op, stray", CASES)
def test_meta_tensor_among_cpu_ones_names_it(op, stray):
    """Meta outranks CPU in dispatch: the fake kernel runs, and checks as the C++ op does (it used to return an
    uninitialized CPU tensor)."""
    tensors = _with_stray(op, stray, "meta")
    with pytest.raises(RuntimeError, match=_message(op, stray, "meta", "cpu")):
        getattr(torch.ops.pfa_kernels, op).default(*_call_arguments(op, tensors))


@pytest.mark.parametrize("orders", [("sequence", "sequence"), ("product", "product")])
@pytest.mark.parametrize("op, stray", CASES)
def test_cpu_kernel_names_a_tensor_on_another_device(op, stray, orders):
    """The same call sent to the CPU kernel itself (redispatch to the CPU key): the C++ check names the argument
    before any ATen call sees a meta tensor."""
    tensors = _with_stray(op, stray, "meta")
    with pytest.raises(RuntimeError, match=_message(op, stray, "meta", "cpu")):
        getattr(torch.ops.pfa_kernels, op).default.redispatch(CPU_KEY, *_call_arguments(op, tensors, orders))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("op, stray", CASES)
def test_cpu_tensor_among_cuda_ones_names_it(op, stray):
    """CUDA outranks CPU: the CUDA kernel runs and names the CPU argument, also when it is grad_output."""
    tensors = _with_stray(op, stray, "cpu", "cuda:0")
    with pytest.raises(RuntimeError, match=_message(op, stray, "cpu", "cuda:0")):
        getattr(torch.ops.pfa_kernels, op).default(*_call_arguments(op, tensors))


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@requires_two_gpus
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("orders", [("sequence", "sequence"), ("product", "product")])
@pytest.mark.parametrize("op", list(ARGUMENTS))
def test_cuda_ops_run_on_their_tensors_device(op, orders, dtype):
    """Tensors on cuda:1 with cuda:0 current, and the reverse: results on the tensors' device, equal to the CPU
    op's in float64 on the same values, and the current device left as it was. float16 takes the tensor-core
    kernel (its bound covers g·B rounded to float16), float32/float64 the FMA one."""
    bound = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2}[dtype]
    values = _tensors(op, "cpu", dtype)
    expected = getattr(torch.ops.pfa_kernels, op).default(
        *_call_arguments(op, {name: t.double() for name, t in values.items()}, orders))
    for tensors_on, current in ((1, 0), (0, 1)):
        with torch.cuda.device(current):
            tensors = {name: t.to(f"cuda:{tensors_on}") for name, t in values.items()}
            result = getattr(torch.ops.pfa_kernels, op).default(*_call_arguments(op, tensors, orders))
            torch.cuda.synchronize(tensors_on)
            assert torch.cuda.current_device() == current
        for got, want in zip(_as_tuple(result), _as_tuple(expected), strict=True):
            assert got.device == torch.device(f"cuda:{tensors_on}") and got.dtype == dtype
            assert got.shape == want.shape and relative_error(got.cpu(), want) < bound


@requires_two_gpus
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["product", "sequence"])
def test_layers_on_the_second_gpu(strategy):
    """backend="cpp" layers on cuda:1 (cuda:0 current) against the literal algorithm there."""
    from conftest import TOLERANCE, assert_matches_reference

    linear = pk.PFALinear(9, 7, backend="cpp", strategy=strategy, dtype=torch.float64).to("cuda:1")
    assert_matches_reference(linear, torch.randn(4, 9, dtype=torch.float64, device="cuda:1"), TOLERANCE[torch.float64])
    conv = pk.PFAConv2d(3, 5, 3, padding=1, backend="cpp", strategy=strategy, dtype=torch.float64).to("cuda:1")
    assert_matches_reference(conv, torch.randn(2, 3, 6, 5, dtype=torch.float64, device="cuda:1"),
                             TOLERANCE[torch.float64])
    assert torch.cuda.current_device() == 0
