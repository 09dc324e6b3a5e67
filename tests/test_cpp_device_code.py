"""The device code in the compiled extension, read with the CUDA tools Triton ships (no GPU needed): SASS for
sm_80 and sm_90, PTX for compute_90 (which the driver JIT-compiles for newer GPUs: checked here by assembling
it for sm_100 and sm_120 with ptxas), and every op's CUDA kernel registered."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pfa_kernels.backends import cpp

TC_KERNEL = "linear_sequence_tc_bwd_kernel"  # fp16 and bf16, CuTe on tensor cores
FMA_KERNEL = "linear_sequence_bwd_kernel"    # fp32 and fp64, CUDA cores


def _tool(name: str) -> Path:
    triton = pytest.importorskip("triton")
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _run(*command) -> str:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def library() -> str:
    assert cpp.has_cuda_kernels(), "the extension was built without CUDA"
    return importlib.util.find_spec("pfa_kernels._C").origin


@pytest.fixture(scope="module")
def sass(library) -> str:
    return _run(_tool("cuobjdump"), "-sass", library)


def test_library_carries_cuda_kernels_for_sm80_and_sm90(sass):
    """cuobjdump lists device code per architecture; every op has a CUDA kernel."""
    assert "arch = sm_80" in sass and "arch = sm_90" in sass
    assert sass.count(FMA_KERNEL) >= 4  # fp32 and fp64 (CUDA cores) x 2 architectures
    assert sass.count(TC_KERNEL) >= 4  # fp16 and bf16 on CuTe x 2 architectures
    assert "HMMA" in sass  # the CuTe kernels run on tensor cores
    for op in cpp.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pfa_kernels::{op}", "CUDA"), op


def test_library_embeds_ptx_for_compute_90(library):
    """PTX of every kernel for compute_90, the newest architecture built: GPUs newer than sm_90 run it."""
    assert re.search(r"PTX file\s+\d+: \S+\.sm_90\.ptx", _run(_tool("cuobjdump"), "-lptx", library))
    ptx = _run(_tool("cuobjdump"), "-ptx", library)
    assert ".target sm_90" in ptx
    entries = re.findall(r"^(?:\.visible )?\.entry (\S+)\(", ptx, flags=re.MULTILINE)
    assert sum(TC_KERNEL in entry for entry in entries) == 2 and sum(FMA_KERNEL in entry for entry in entries) == 2
    assert "mma.sync.aligned.m16n8k16" in ptx


@pytest.mark.parametrize("arch", ["sm_100", "sm_120"])
def test_ptx_assembles_for_newer_gpus(library, arch, tmp_path):
    """What the driver does on a B200 (sm_100) or an RTX 50 (sm_120): compile the compute_90 PTX for it. Done here
    with Triton's ptxas for Blackwell; every kernel assembles, without spilling to local memory."""
    subprocess.run([str(_tool("cuobjdump")), "-xptx", "all", library], cwd=tmp_path, check=True, capture_output=True)
    (ptx,) = tmp_path.glob("*.ptx")
    report = subprocess.run([str(_tool("ptxas-blackwell")), f"-arch={arch}", "-v", "-o", str(tmp_path / "out.cubin"),
                             str(ptx)], capture_output=True, text=True, check=True).stderr
    compiled = re.findall(rf"Compiling entry function '(\S+)' for '{arch}'", report)
    assert sum(TC_KERNEL in name for name in compiled) == 2 and sum(FMA_KERNEL in name for name in compiled) == 2
    assert "0 bytes spill stores, 0 bytes spill loads" in report
    assert not re.search(r"[1-9]\d* bytes spill", report), report
