"""The compiled backend: loads pfa_kernels._C (csrc/), whose ops pfa_kernels::cpp_* compute the explicit PFA
backward without Python in the loop (ATen GEMMs/convolutions, and a fused linear sequence kernel for CPU
and CUDA), and registers their fake kernels so they work under torch.compile.

The package imports without the extension: is_available() is then False, backend="cpp" raises with the
reason, and backend="auto" uses another backend.
"""

from __future__ import annotations

import importlib.util

import torch


def _load() -> Exception | None:
    """Load the extension's shared library (it registers torch.ops.pfa_kernels.cpp_*); the error if it cannot."""
    spec = importlib.util.find_spec("pfa_kernels._C")
    if spec is None or spec.origin is None:
        return ImportError("pfa_kernels._C is not built (pip install without a compiler, or "
                           "PFA_KERNELS_NO_EXTENSION=1)")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:
        return error
    return None


LOAD_ERROR = _load()

OPS = ("cpp_feedback_product", "cpp_linear_backward", "cpp_conv_backward", "cpp_linear_sequence_input_grad")


def is_available(device_type: str) -> bool:
    if LOAD_ERROR is not None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available() and has_cuda_kernels()
    return device_type == "cpu"


def has_cuda_kernels() -> bool:
    """Whether the extension was built with CUDA (each op then has a kernel for the CUDA dispatch key)."""
    return LOAD_ERROR is None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"pfa_kernels::{op}", "CUDA") for op in OPS)


def unavailable_reason(device_type: str) -> str:
    if LOAD_ERROR is not None:
        return f"the compiled extension pfa_kernels._C is not built ({LOAD_ERROR}); run `make setup`"
    return f"the compiled extension has no kernels for {device_type} tensors (built without CUDA?)"


def check_devices(op: str, anchor_name: str, anchor: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Raise as the C++ ops do unless every tensor is on anchor's device. The fake kernels check too: a meta tensor
    among CPU ones dispatches to them (Meta outranks CPU), and under torch.compile they see every call first."""
    for name, tensor in tensors.items():
        if tensor.device != anchor.device:
            raise RuntimeError(f"pfa_kernels::{op}: {name} is on {tensor.device} but {anchor_name} is on "
                               f"{anchor.device}; every tensor argument must be on {anchor_name}'s device")


if LOAD_ERROR is None:

    def _grads_like(x, weight, R, output_mask):
        return (x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
                weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0),
                weight.new_empty(weight.shape[0]) if output_mask[2] else weight.new_empty(0),
                R.new_empty(R.shape) if output_mask[3] else R.new_empty(0))

    @torch.library.register_fake("pfa_kernels::cpp_feedback_product")
    def _feedback_product_fake(B, R, groups):
        check_devices("cpp_feedback_product", "B", B, R=R)
        return B.new_empty(B.shape[0], R.shape[1] * groups, *R.shape[2:])

    @torch.library.register_fake("pfa_kernels::cpp_linear_backward")
    def _linear_backward_fake(grad_output, x, weight, B, R, input_order, feedback_order, output_mask):
        check_devices("cpp_linear_backward", "grad_output", grad_output, x=x, weight=weight, B=B, R=R)
        return _grads_like(x, weight, R, output_mask)

    @torch.library.register_fake("pfa_kernels::cpp_conv_backward")
    def _conv_backward_fake(grad_output, x, weight, B, R, stride, padding, dilation, groups, input_order,
                            feedback_order, output_mask):
        check_devices("cpp_conv_backward", "grad_output", grad_output, x=x, weight=weight, B=B, R=R)
        return _grads_like(x, weight, R, output_mask)

    @torch.library.register_fake("pfa_kernels::cpp_linear_sequence_input_grad")
    def _linear_sequence_fake(grad_output, B, R):
        check_devices("cpp_linear_sequence_input_grad", "grad_output", grad_output, B=B, R=R)
        return grad_output.new_empty(grad_output.shape[0], R.shape[1])
