"""Every Triton kernel and configuration compiled ahead of time for sm_80 (A100) and sm_90 (H100) without a
GPU: registers, spills (ptxas) and shared memory (Triton) within each architecture's limits. Runs in the main
pytest process (without TRITON_INTERPRET, which would replace the kernels with Python)."""

from __future__ import annotations

import os

import pytest
import torch

import pfa_kernels as pk

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="ahead-of-time compilation needs the real Triton compiler")


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_without_spills_within_shared_memory(arch):
    from pfa_kernels.backends.triton import aot, grouped_matmul, sequence_backward

    rows = aot.compile_all(arch)
    expected = len(aot.DTYPES) * (len(sequence_backward.CONFIGS) + len(grouped_matmul.CONFIGS))
    assert len(rows) == expected and {r.dtype for r in rows} == set(aot.DTYPES)
    for row in rows:
        assert row.spill_bytes == 0, f"{row.kernel} [{row.config}] {row.dtype} spills {row.spill_bytes} bytes"
        assert 0 < row.registers <= 255
        assert row.shared_bytes <= aot.SHARED_MEMORY_PER_BLOCK[arch], (
            f"{row.kernel} [{row.config}] {row.dtype} needs {row.shared_bytes} bytes of shared memory")
        assert 0 < row.occupancy <= 1


def test_triton_backend_on_cpu_without_the_interpreter_raises():
    assert "triton" not in pk.planner.available_backends("cpu")
    layer = pk.PFALinear(4, 3, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' is not available.*TRITON_INTERPRET=1"):
        layer(torch.randn(2, 4))
