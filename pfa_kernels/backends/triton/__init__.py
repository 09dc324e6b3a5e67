"""Triton kernels for the PFA backward (one file per op).

On CUDA tensors they compile for the GPU. On CPU tensors they run only under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before this package is imported, because Triton reads it when
a kernel is defined): slow, for testing. is_available() says which applies; the planner never picks
the interpreter for backend="auto".
"""

from __future__ import annotations

import importlib.util
import os

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# Kernel dtypes: fp32 inputs use IEEE fp32 products (no TF32), fp16/bf16 use tensor cores; all accumulate in fp32.
DTYPES = ("float32", "float16", "bfloat16")
# Looked up once: find_spec searches sys.path (about 150 us), and availability is asked on every named-backend call.
INSTALLED = importlib.util.find_spec("triton") is not None


def is_available(device_type: str) -> bool:
    """Whether the Triton kernels can run on tensors of this device type here."""
    if not INSTALLED:
        return False
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available() and not INTERPRETER
    return device_type == "cpu" and INTERPRETER


def unavailable_reason(device_type: str) -> str:
    if not INSTALLED:
        return "triton is not installed"
    if device_type == "cpu":
        return ("Triton kernels run on CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before importing pfa_kernels (slow; for testing)")
    return f"no Triton support for {device_type} tensors here"


def register_ops() -> None:
    """Define the pfa_kernels::triton_* ops. Deferred because torch.library.triton_op imports torch._inductor
    (about 1.3 s of `import pfa_kernels` on this machine): done at import only where the kernels can run."""
    from . import batched_matmul, grouped_matmul, sequence_backward  # noqa: F401


if INSTALLED and (INTERPRETER or is_available("cuda")):
    register_ops()
