"""Which GPUs the compiled backend says it runs on, against what the library holds: SASS for sm_80 (every 8.x GPU
runs it) and sm_90, and PTX for compute_90, which the driver compiles for anything newer (sm_100, sm_120).
torch.cuda.is_available and get_device_capability are monkeypatched to play each GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error, requires_cuda

import pfa_kernels as pk
from pfa_kernels.backends import cpp

# compute capability -> whether the compiled ops run there (with the default TORCH_CUDA_ARCH_LIST, 8.0;9.0+PTX)
EXPECTED = {(7, 5): False, (8, 0): True, (8, 6): True, (9, 0): True, (10, 0): True, (12, 0): True}


def _play_gpus(monkeypatch, capabilities, current=0):
    """torch.cuda as on a machine whose device i has compute capability capabilities[i]."""
    def get_device_capability(device=None):
        if device is None:
            index = current
        elif isinstance(device, int):
            index = device
        else:
            index = torch.device(device).index
            index = current if index is None else index
        return capabilities[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)


def test_library_lists_its_device_code():
    """What the build put in (setup.py's TORCH_CUDA_ARCH_LIST default): the mocked GPUs below are judged on it."""
    assert cpp.cuda_images() == ("sm_80", "compute_90", "sm_90"), (
        "built without PTX for compute_90 (TORCH_CUDA_ARCH_LIST must be 8.0;9.0+PTX): GPUs newer than sm_90 would "
        "find no kernel image")


@pytest.mark.parametrize("capability", sorted(EXPECTED))
def test_availability_tells_the_truth_for_each_gpu(monkeypatch, capability):
    _play_gpus(monkeypatch, [capability])
    assert cpp.has_cuda_kernels()
    available, reason = cpp.is_available("cuda"), cpp.unavailable_reason("cuda")
    assert available == EXPECTED[capability]
    assert (reason == "") == available
    if not available:
        assert f"compute capability {capability[0]}.{capability[1]}" in reason and "8.0 or newer" in reason
    assert ("cpp" in pk.dispatch.available_backends("cuda")) == available


def test_dispatch_error_names_the_capability(monkeypatch):
    _play_gpus(monkeypatch, [(7, 5)])
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5"):
        pk.dispatch.check_backend("cpp", "cuda")


@pytest.mark.parametrize("capability", sorted(EXPECTED))
def test_without_ptx_only_the_built_architectures_run(monkeypatch, capability):
    """A library built with TORCH_CUDA_ARCH_LIST=8.0;9.0 (no +PTX) carries nothing for sm_100 or sm_120: it says so."""
    _play_gpus(monkeypatch, [capability])
    monkeypatch.setattr(cpp, "cuda_images", lambda: ("sm_80", "sm_90"))
    expected = capability[0] in (8, 9)
    assert cpp.is_available("cuda") == expected
    if capability >= (10, 0):
        reason = cpp.unavailable_reason("cuda")
        assert f"compute capability {capability[0]}.{capability[1]}" in reason and "+PTX" in reason
        assert "sm_80, sm_90" in reason


@pytest.mark.parametrize("images, capability, expected", [
    (("sm_86",), (8, 0), False), (("sm_86",), (8, 9), True), (("sm_90a",), (9, 0), True),
    (("sm_90a",), (10, 0), False), (("compute_90a",), (10, 0), False), (("compute_80",), (8, 6), True),
    (("compute_80",), (12, 0), True), (("sm_100f",), (10, 3), True), (("sm_100f",), (12, 0), False),
])
def test_which_image_runs_where(images, capability, expected):
    assert any(cpp.image_runs_on(image, capability) for image in images) == expected


def test_device_argument_picks_the_gpu(monkeypatch):
    """Device 0 an H100, device 1 a T4: the answer depends on the device asked about, the current one by default."""
    _play_gpus(monkeypatch, [(9, 0), (7, 5)])
    assert cpp.is_available("cuda") and cpp.is_available("cuda", 0)
    assert cpp.is_available("cuda", torch.device("cuda:0"))
    assert not cpp.is_available("cuda", 1) and not cpp.is_available("cuda", torch.device("cuda:1"))
    assert "cuda:1 (compute capability 7.5)" in cpp.unavailable_reason("cuda", 1)
    assert "cuda:1 (compute capability 7.5)" in cpp.unavailable_reason("cuda", torch.device("cuda:1"))
    _play_gpus(monkeypatch, [(9, 0), (7, 5)], current=1)
    assert not cpp.is_available("cuda") and "current CUDA device" in cpp.unavailable_reason("cuda")


def test_no_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cpp.is_available("cuda")
    assert "no CUDA device" in cpp.unavailable_reason("cuda")


def test_cpu_signature_unchanged():
    """The planner's positional calls: is_available(device_type), unavailable_reason(device_type)."""
    assert cpp.is_available("cpu") and cpp.unavailable_reason("cpu") == ""
    assert not cpp.is_available("mps") and "no kernels for mps" in cpp.unavailable_reason("mps")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_available_on_this_gpu_means_the_kernels_run(dtype):
    """On the real GPU: available exactly when its capability is 8.0 or newer, and then both fused kernels (FMA
    for float32, tensor cores for bfloat16) find an image and compute (g·B)·R."""
    capability = torch.cuda.get_device_capability()
    assert cpp.is_available("cuda") == (capability >= (8, 0)), cpp.unavailable_reason("cuda")
    if not cpp.is_available("cuda"):
        pytest.skip(cpp.unavailable_reason("cuda"))
    g, B, R = (torch.randn(*shape, device="cuda").to(dtype) for shape in ((33, 17), (17, 70), (70, 129)))
    result = torch.ops.pfa_kernels.cpp_linear_sequence_input_grad(g, B, R)
    expected = (g.double() @ B.double()).to(dtype).double() @ R.double()
    assert relative_error(result, expected) < (1e-5 if dtype == torch.float32 else 1e-2)
