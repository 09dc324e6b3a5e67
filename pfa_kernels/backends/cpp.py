"""The compiled backend: loads pfa_kernels._C (csrc/), whose ops pfa_kernels::cpp_* compute the explicit PFA
backward without Python in the loop (ATen GEMMs/convolutions, and a fused linear sequence kernel for CPU
and CUDA), and registers their fake kernels so they work under torch.compile.

The package imports without the extension: is_available() is then False, backend="cpp" raises with the
reason, and backend="auto" uses another backend. On CUDA, is_available(device_type, device) also asks whether
the library's device code runs on that GPU: sm_80 SASS on 8.x, sm_90 SASS on 9.0, compute_90 PTX (JIT) on newer.
"""

from __future__ import annotations

import functools
import importlib.util
import re

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


def _python_module():
    """The extension as a Python module (csrc/python_module.cpp: the C++ eager path of ops.py, the seeded draw of
    uniform_draw.py), or None where it is not built."""
    if LOAD_ERROR is not None:
        return None
    try:
        import pfa_kernels._C as module
    except ImportError:
        return None
    return module


PYTHON_MODULE = _python_module()
# Its eager_projected_linear (ops.py's C++ eager path), or None where it was built without it.
EAGER = PYTHON_MODULE if hasattr(PYTHON_MODULE, "eager_projected_linear") else None

OPS = ("cpp_feedback_product", "cpp_linear_backward", "cpp_conv_backward", "cpp_linear_sequence_input_grad")


# The tensor-core kernel runs SM80 mma.sync atoms (m16n8k16, bf16/fp16 in, fp32 accumulate): sm_80 and newer.
MINIMUM_CAPABILITY = (8, 0)


def is_available(device_type: str, device=None) -> bool:
    """Whether the compiled ops can run on tensors of this device type; for "cuda", on this device (a torch.device
    or an index; the current CUDA device by default): its compute capability must be 8.0 or newer and be covered by
    the device code in the library (cuda_images)."""
    return _why_unavailable(device_type, device) is None


def unavailable_reason(device_type: str, device=None) -> str:
    """Why is_available(device_type, device) is False, naming the GPU's compute capability where that is the
    reason; "" when it is available."""
    return _why_unavailable(device_type, device) or ""


def has_cuda_kernels() -> bool:
    """Whether the extension was built with CUDA (each op then has a kernel for the CUDA dispatch key). Whether
    they run on a given GPU is is_available("cuda", device)."""
    return LOAD_ERROR is None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"pfa_kernels::{op}", "CUDA") for op in OPS)


@functools.cache
def cuda_images() -> tuple[str, ...]:
    """The device code in the library as nvcc names it, from TORCH_CUDA_ARCH_LIST at build time: ("sm_80",
    "compute_90", "sm_90") for the default "8.0;9.0+PTX" (sm_XY: SASS, compute_XY: PTX); () without CUDA."""
    if LOAD_ERROR is not None or not hasattr(torch.ops.pfa_kernels, "cpp_cuda_images"):
        return ()
    return tuple(image for image in torch.ops.pfa_kernels.cpp_cuda_images().split("/") if image)


def image_runs_on(image: str, capability: tuple[int, int]) -> bool:
    """Whether the driver runs this device code on a GPU of this compute capability. SASS sm_XY runs on X.y for
    y >= Y (same major: 8.6 and 8.9 run sm_80's); PTX compute_XY on X.Y and every newer GPU, compiled by the
    driver on first use (sm_100 and sm_120 run compute_90's); an arch-specific image (sm_90a) on X.Y alone, a
    family one (sm_100f) on X.y for y >= Y."""
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", image)
    if match is None:
        return False
    kind, built, suffix = match[1], (int(match[2]), int(match[3])), match[4]
    if suffix == "a":
        return tuple(capability) == built
    if kind == "sm" or suffix == "f":
        return capability[0] == built[0] and capability[1] >= built[1]
    return tuple(capability) >= built


def _why_unavailable(device_type: str, device) -> str | None:
    if LOAD_ERROR is not None:
        return f"the compiled extension pfa_kernels._C is not built ({LOAD_ERROR}); run `make setup`"
    if device_type == "cpu":
        return None
    if device_type != "cuda" or not has_cuda_kernels():
        return f"the compiled extension has no kernels for {device_type} tensors (built without CUDA?)"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    capability = tuple(torch.cuda.get_device_capability(device))
    name = "the current CUDA device" if device is None else f"cuda:{device}" if isinstance(device, int) else device
    gpu = f"{name} (compute capability {capability[0]}.{capability[1]})"
    if capability < MINIMUM_CAPABILITY:
        return (f"{gpu} is older than the compiled kernels allow: they need compute capability "
                f"{MINIMUM_CAPABILITY[0]}.{MINIMUM_CAPABILITY[1]} or newer (the tensor-core kernel's SM80 mma.sync)")
    images = cuda_images()
    if not images:
        return ("the compiled extension does not list its device code (built before it did, or not by setup.py): "
                "rebuild it with `make setup`")
    if not any(image_runs_on(image, capability) for image in images):
        return (f"the compiled extension carries device code for {', '.join(images)}, none of "
                f"which runs on {gpu}: SASS (sm_XY) runs on its own major version only, PTX (compute_XY) on newer "
                f"GPUs too; rebuild with TORCH_CUDA_ARCH_LIST ending in +PTX (setup.py's default, \"8.0;9.0+PTX\")")
    return None


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
