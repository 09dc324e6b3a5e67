"""Determinism of the fused linear sequence kernels under torch.use_deterministic_algorithms(True).

The CUDA kernels add partial products into dx with atomics (fp32, fp64), whose order varies from run to run:
they alert, so deterministic mode raises (or warns with warn_only). The CPU kernel gives every dx element to one
task that sums it in a fixed order: it runs, and gives the same bits for any thread count.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import pfa_kernels as pk
from pfa_kernels.backends import cpp  # noqa: F401  (loads pfa_kernels._C)

ALERT = r"pfa_kernels::cpp_linear_sequence_input_grad \(CUDA\) does not have a deterministic implementation"


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_kernel_runs_in_deterministic_mode_with_the_same_bits_for_any_thread_count(deterministic, threads, dtype):
    """P = 3 rows is one row block: 1, 2, 3 and 5 threads split C_in = 129 into 1, 2, 3 and 5 column blocks."""
    g, B, R = (torch.randn(3, 17).to(dtype), torch.randn(17, 70).to(dtype), torch.randn(70, 129).to(dtype))
    results = []
    for count in (1, 2, 3, 5):
        threads(count)
        results.append(torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R))
        results.append(torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R))
    for result in results[1:]:
        assert torch.equal(result, results[0])


def test_cpu_layer_backward_runs_in_deterministic_mode(deterministic):
    layer = pk.PFALinear(9, 7, backend="cpp", strategy="sequence", dtype=torch.float64)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert layer.backward_plan(x.shape).input_order == "sequence"
    layer(x).sum().backward()
    assert x.grad is not None and layer.feedback.parameter.grad is not None


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_alerts_in_deterministic_mode(deterministic, dtype):
    """float32/float64 take the FMA kernel, float16/bfloat16 the tensor-core one: both add with atomics."""
    g, B, R = (torch.randn(33, 17, device="cuda").to(dtype), torch.randn(17, 70, device="cuda").to(dtype),
               torch.randn(70, 129, device="cuda").to(dtype))
    with pytest.raises(RuntimeError, match=ALERT):
        torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match=ALERT):
        result = torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R)
    torch.testing.assert_close(result.double(), (g.double() @ B.double()).to(dtype).double() @ R.double(),
                               rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.cuda
def test_cuda_layer_backward_alerts_in_deterministic_mode(deterministic, monkeypatch):
    """Through a layer: the sequence order's dL/dx runs the fused kernel. cuBLAS's own GEMMs (dL/dW) need a fixed
    workspace to be deterministic; with one set, the error is the fused kernel's."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    layer = pk.PFALinear(9, 7, backend="cpp", strategy="sequence", device="cuda")
    x = torch.randn(4, 9, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match=ALERT):
        layer(x).sum().backward()
