"""The compiled extension (csrc/): opcheck on every op, backend="cpp" against the literal algorithm, and the fused
CPU kernel. `make test` builds it first. Its device code: test_cpp_device_code.py; zero-size inputs, devices,
determinism and which GPUs it runs on: test_cpp_empty.py, test_cpp_devices.py, test_cpp_determinism.py and
test_cpp_availability.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import (
    CONV_CASES,
    STRATEGIES,
    TOLERANCE,
    assert_matches_reference,
    build,
    feedback_group_runs,
    relative_error,
)

import pfa_kernels as pk
from pfa_kernels.backends import cpp


def test_extension_is_built():
    assert cpp.LOAD_ERROR is None, f"the extension did not load: {cpp.LOAD_ERROR} (make setup builds it)"
    assert pk.dispatch.available_backends("cpu") == ("torch", "cpp")


def _samples():
    f64 = {"dtype": torch.float64}
    B = torch.randn(6, 8, **f64)
    yield "cpp_feedback_product", (B, torch.randn(8, 2, 3, 3, **f64), 2)
    yield "cpp_linear_sequence_input_grad", (torch.randn(5, 6, **f64), B, torch.randn(8, 7, **f64))
    for orders in (("product", "product"), ("sequence", "sequence"), ("product", "sequence"), ("", "product")):
        mask = [orders[0] != "", True, True, True]
        yield "cpp_linear_backward", (torch.randn(3, 2, 6, **f64), torch.randn(3, 2, 5, **f64),
                                      torch.randn(6, 5, **f64), B, torch.randn(8, 5, **f64), *orders, mask)
        for groups in (1, 2):
            yield "cpp_conv_backward", (torch.randn(2, 6, 3, 2, **f64), torch.randn(2, 4, 6, 5, **f64),
                                        torch.randn(6, 4 // groups, 3, 3, **f64), B,
                                        torch.randn(8, 4 // groups, 3, 3, **f64), [2, 2], [1, 0], [1, 1], groups,
                                        *orders, mask)


@pytest.mark.parametrize("name, args", list(_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.pfa_kernels, name).default, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 2, 5), (7, 5, 130, 9), (33, 17, 70, 129)])
def test_fused_cpu_kernel(shape, dtype):
    """(g·B)·R without g·B in memory, against a float64 product (bf16: within 3x of PyTorch's own bf16 error)."""
    P, C_out, C_mid, C_in = shape
    g, B, R = (torch.randn(P, C_out), torch.randn(C_out, C_mid) / C_out ** 0.5, torch.randn(C_mid, C_in))
    fused = torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g.to(dtype), B.to(dtype), R.to(dtype))
    low = [t.to(dtype) for t in (g, B, R)]
    exact = (low[0].double() @ low[1].double()) @ low[2].double()
    assert fused.dtype == dtype and fused.shape == (P, C_in)
    if dtype == torch.bfloat16:
        assert relative_error(fused, exact) <= 3 * relative_error((low[0] @ low[1]) @ low[2], exact) + 1e-3
    else:
        assert relative_error(fused, exact) < TOLERANCE[dtype]


@pytest.mark.parametrize("case, strategy, feedback_groups", feedback_group_runs(sorted(CONV_CASES)))
def test_conv_backend_cpp_matches_reference(case, strategy, feedback_groups):
    layer, _, _, x = build(case, strategy=strategy, backend="cpp", feedback_groups=feedback_groups)
    assert layer.backward_plan(x.shape).backend == "cpp"
    assert_matches_reference(layer, x, TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("expand_ratio", [0.5, 10])
def test_linear_backend_cpp_matches_reference(expand_ratio, strategy, dtype):
    layer = pk.PFALinear(9, 7, dtype=dtype, expand_ratio=expand_ratio, strategy=strategy, backend="cpp")
    assert_matches_reference(layer, torch.randn(3, 4, 9, dtype=dtype), TOLERANCE[dtype])


def test_projected_layers_say_they_run_in_pytorch():
    layer = pk.PFALinear(9, 7, parametrization="projected", backend="cpp", dtype=torch.float64)
    assert "runs in PyTorch" in layer.backward_plan((4, 9)).reason
    assert_matches_reference(layer, torch.randn(4, 9, dtype=torch.float64), TOLERANCE[torch.float64])


def test_torch_compile_through_the_compiled_ops():
    model = torch.nn.Sequential(pk.PFAConv2d(3, 4, 3, backend="cpp"), torch.nn.ReLU(), torch.nn.Flatten(),
                                pk.PFALinear(4 * 4 * 4, 3, backend="cpp", strategy="sequence"))
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], msg=name)


def test_package_imports_without_the_extension():
    """With the library unloadable, backend="cpp" raises with the reason and "auto" takes another backend."""
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'pfa_kernels._C' else real(name, *a)\n"
        "import torch, pfa_kernels as pk\n"
        "assert pk.dispatch.available_backends('cpu') == ('torch',)\n"
        "pk.PFALinear(3, 2)(torch.randn(4, 3))\n"
        "try:\n"
        "    pk.PFALinear(3, 2, backend='cpp')(torch.randn(4, 3))\n"
        "except RuntimeError as error:\n"
        "    assert 'not built' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('no error')\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
