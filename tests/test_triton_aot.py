"""Every Triton kernel and configuration compiled ahead of time for sm_80 (A100) and sm_90 (H100) without a
GPU: registers, spills (ptxas) and shared memory (Triton) within each architecture's limits. Runs in the main
pytest process (without TRITON_INTERPRET, which would replace the kernels with Python), as do the tests of the
native kernels on a GPU (marked `cuda`; skipped here)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from conftest import assert_matches_reference, relative_error, requires_cuda, requires_two_gpus
from torch import nn

import pfa_kernels as pk

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="ahead-of-time compilation needs the real Triton compiler")


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_without_spills_within_shared_memory(arch):
    """Every kernel x layer case (the kernel sizes the layers launch, the products of their backward) x runtime
    and generic arguments x configuration x dtype: no ptxas spill (the test fails on any "bytes spill"), at most
    255 registers, shared memory within the architecture's limit."""
    from pfa_kernels.backends.triton import aot

    rows = aot.compile_all(arch)
    assert len(rows) == len(aot.jobs()) and {r.dtype for r in rows} == set(aot.DTYPES)
    for kernel, (module, _, cases) in aot.KERNELS.items():
        runtime_cases = {row.case for row in rows if row.kernel == kernel and row.arguments == "runtime"}
        assert runtime_cases == set(cases), kernel
        assert any(row.kernel == kernel and row.arguments == "generic" for row in rows), kernel
        per_case = len(module.CONFIGS) * len(aot.DTYPES)
        assert sum(row.kernel == kernel and row.arguments == "runtime" for row in rows) == len(cases) * per_case
    assert set(aot.SEQUENCE_CASES) >= {"linear", "1x1", "3x3", "1x3", "3x1", "conv1d 3", "7x7 stride 2"}
    spilling = [f"{row.kernel} {row.case} ({row.arguments}) [{row.config}] {row.dtype}: {row.registers} registers, "
                f"{row.spill_bytes} bytes spilled" for row in rows if row.spill_bytes]
    assert not spilling, f"sm_{arch}: " + "; ".join(spilling)
    for row in rows:
        assert 0 < row.registers <= 255
        assert row.shared_bytes <= aot.SHARED_MEMORY_PER_BLOCK[arch], (
            f"{row.kernel} [{row.config}] {row.dtype} needs {row.shared_bytes} bytes of shared memory")
        assert 0 < row.occupancy <= 1


def _triton_launch_specialization(fn, args, constants):
    """(signature, constexprs, attrs) as JITFunction.run derives them on a GPU: its binder, then _pack_args."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **constants)
    _, signature, constexprs, attrs = fn._pack_args(backend, constants, bound_args, specialization, options)
    return signature, constexprs, attrs


@pytest.mark.parametrize(("kernel", "case"), [("sequence_input_grad", "linear"), ("sequence_input_grad", "3x3"),
                                           ("sequence_input_grad", "conv1d 3"), ("batched_matmul", "B^T·C"),
                                           ("grouped_matmul", "16 products")])
def test_runtime_arguments_are_tritons_launch_specialization(kernel, case):
    """The "runtime" variant compiles what Triton's launcher would for the layer's call (its binder and
    _pack_args, run here without a GPU): integers of 1 as constexprs, tt.divisibility 16 on 16-divisible integers
    and aligned pointers. The "generic" variant has neither."""
    from pfa_kernels.backends.triton import aot

    module, builder, _ = aot.KERNELS[kernel]
    fn, args, constants = builder(case, "bf16")
    constants = {**constants, **module.CONFIGS[0].kwargs}
    signature, constexprs, attrs = aot.specialization(fn, args, constants, runtime=True)
    expected_signature, expected_constexprs, expected_attrs = _triton_launch_specialization(fn, args, constants)
    expected_attrs = {path: attr for path, attr in expected_attrs.items() if attr}  # [] (no attribute) is no-op
    assert signature == expected_signature and attrs == expected_attrs
    assert {(fn.arg_names.index(name),): value for name, value in constexprs.items()} == expected_constexprs
    assert attrs and all(value == [["tt.divisibility", 16]] for value in attrs.values())
    pointers = [index for index, name in enumerate(fn.arg_names) if signature[name].startswith("*")]
    assert pointers and all((index,) in attrs for index in pointers)
    if kernel == "sequence_input_grad":
        unit = {"stride_h", "stride_w", "dil_h", "dil_w"} | ({"out_h", "out_w", "in_h", "in_w"} if case == "linear"
                                                             else set())
        assert unit <= {name for name, value in constexprs.items() if value == 1}
    generic_signature, generic_constexprs, generic_attrs = aot.specialization(fn, args, constants, runtime=False)
    assert not generic_attrs and set(generic_constexprs) == set(constants)
    assert all(kind != "constexpr" for name, kind in generic_signature.items() if name not in constants)
    assert generic_signature.keys() == signature.keys()


@pytest.mark.parametrize("arch", [80, 90])
def test_sequence_kernel_accumulates_without_fences(arch):
    """The fused kernel's fp32 adds into dx are relaxed reductions. With the default acq_rel semantics every
    atomic compiled to MEMBAR.ALL.GPU + ERRBAR + ATOMG + CCTL.IVALL (PTX: atom.global.gpu.acq_rel.add.f32): 8 of
    each per kernel with 8 warps, 4 with the 32x64 tile, on both architectures."""
    from pfa_kernels.backends.triton import aot

    rows = [row for row in aot.compile_all(arch) if row.kernel.startswith("sequence_input_grad")]
    assert rows
    for row in rows:
        what = f"{row.kernel} [{row.config}] {row.dtype} sm_{arch}"
        assert row.atomics > 0, f"{what}: no atomic in the SASS, so nothing was checked"
        assert row.ptx_fences == 0 and row.sass_fences == 0, (
            f"{what}: {row.ptx_fences} ordered atomics or fences in the PTX, {row.sass_fences} in the SASS")


def test_fence_patterns_match_what_acq_rel_atomics_compile_to():
    """The patterns find the instructions an acq_rel atomic becomes, and leave out the CTA-scope and async-proxy
    fences of Hopper tensor-core code (which a kernel with wgmma needs)."""
    from pfa_kernels.backends.triton import aot

    ptx = "atom.global.gpu.acq_rel.add.f32 %f1, [%rd1], %f2;\n red.global.gpu.relaxed.add.f32 [%rd1], %f2;\n" \
          "fence.proxy.async.shared::cta;\n wgmma.fence.sync.aligned;\n membar.gl;\n fence.acq_rel.gpu;"
    sass = "MEMBAR.ALL.GPU ;\n ERRBAR;\n ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R0, [R2.64], R5 ;\n CCTL.IVALL ;\n" \
           "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;\n MEMBAR.ALL.CTA ;\n FENCE.VIEW.ASYNC.S ;"
    assert aot.fence_counts(ptx, sass) == {"ptx": 3, "MEMBAR.ALL.GPU": 1, "ERRBAR": 1, "CCTL.IVALL": 1}
    assert len(aot.SASS_ATOMICS.findall(sass)) == 2


def test_triton_backend_on_cpu_without_the_interpreter_raises():
    assert "triton" not in pk.dispatch.available_backends("cpu")
    layer = pk.PFALinear(4, 3, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' is not available.*TRITON_INTERPRET=1"):
        layer(torch.randn(2, 4))


@requires_two_gpus
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["product", "sequence"])
def test_layers_on_the_second_gpu_launch_their_kernels_there(strategy):
    """cuda:0 current, the layers on cuda:1: Triton launches on the current device, so without a guard on the
    tensors' device the kernels would run on cuda:0 with cuda:1 pointers. Product order runs the batched
    feedback-product kernel, sequence order the fused one; feedback_weights runs the grouped one."""
    device = torch.device("cuda", 1)
    with torch.cuda.device(0):
        conv = pk.PFAConv2d(6, 10, 3, padding=1, expand_ratio=4, backend="triton", strategy=strategy, device=device)
        linear = pk.PFALinear(12, 7, expand_ratio=3, backend="triton", strategy=strategy, device=device)
        assert_matches_reference(conv, torch.randn(2, 6, 7, 5, device=device), 1e-5)
        assert_matches_reference(linear, torch.randn(5, 12, device=device), 1e-5)
        model = nn.Sequential(conv, nn.Flatten(), pk.PFALinear(350, 4, backend="triton", device=device))
        for name, weight in pk.feedback_weights(model, backend="triton").items():
            assert weight.device == device
            assert relative_error(weight, model.get_submodule(name).feedback.feedback_weight()) < 1e-5, name
        assert torch.cuda.current_device() == 0
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@requires_cuda
@pytest.mark.cuda
def test_fused_sequence_kernel_alerts_under_deterministic_algorithms_when_compiled():
    """Compiled by Inductor it runs natively; once torch.use_deterministic_algorithms(True) is set, Dynamo
    recompiles (the setting is part of its guards) and the fused kernel's check raises while the op is traced."""
    grad, B, R = (torch.randn(shape, device="cuda") for shape in ((64, 48), (48, 96), (96, 40)))

    def input_grad(grad, B, R):
        return torch.ops.pfa_kernels.triton_sequence_input_grad(grad, B, R, [64, 40], [], [], [])

    compiled = torch.compile(input_grad, fullgraph=True)
    assert relative_error(compiled(grad, B, R), (grad @ B) @ R) < 1e-5
    with deterministic_algorithms(), pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        compiled(grad, B, R)
