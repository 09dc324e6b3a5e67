"""Build script for pfa_kernels.

The compiled extension pfa_kernels._C (csrc/) holds the pfa_kernels::cpp_* ops: CPU kernels always, and
CUDA kernels when torch has CUDA and CUDA_HOME points at a toolkit with nvcc (set CUDA_HOME=/usr/local/cuda
on this project's machines: torch's auto-detection picks /usr/local). TORCH_CUDA_ARCH_LIST defaults to
"8.0;9.0+PTX": SASS for sm_80 (which every 8.x GPU runs) and sm_90, and PTX for compute_90, which the driver
compiles on first use for any newer GPU (sm_100, sm_120); without +PTX those find no kernel image. MAX_JOBS
defaults to 2. Set PFA_KERNELS_NO_EXTENSION=1 to skip it: the package imports and works without it
(backend="cpp" then raises).
"""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup


def extension_modules():
    """[the pfa_kernels._C extension]: a CUDAExtension when CUDA can be built here, else a CppExtension."""
    if os.environ.get("PFA_KERNELS_NO_EXTENSION") == "1":
        return []
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    os.environ.setdefault("MAX_JOBS", "2")
    cuda_home = os.environ.get("CUDA_HOME")
    with_cuda = torch.version.cuda is not None and cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists()
    sources = ["csrc/pfa_ops.cpp", "csrc/linear_sequence_cpu.cpp", "csrc/eager_linear.cpp", "csrc/seeded_uniform.cpp",
               "csrc/python_module.cpp"]
    # The C++ standard is torch's (C++20). No contraction of a * b + c into a fused multiply-add where the source
    # does not ask for one: seeded_uniform.cpp must round as torch's uniform_ does, in each of its variants.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if with_cuda:
        return [cpp_extension.CUDAExtension(
            "pfa_kernels._C", sources + ["csrc/cuda/linear_sequence.cu"],
            include_dirs=_cuda_library_headers() + [_cutlass_headers()],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                                           f"-DPFA_KERNELS_CUDA_IMAGES={_cuda_images()}"]},
            extra_link_args=["-fopenmp"])]
    return [cpp_extension.CppExtension("pfa_kernels._C", sources + ["csrc/linear_sequence_cuda_stub.cpp"],
                                       extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])]


def _cuda_images() -> str:
    """The device code TORCH_CUDA_ARCH_LIST puts in the library, as nvcc names it: "sm_80/compute_90/sm_90" for
    "8.0;9.0+PTX" (sm_XY: SASS; compute_XY: PTX). The library reports it (torch.ops.pfa_kernels.cpp_cuda_images)
    so that pfa_kernels.backends.cpp can tell which GPUs can run it. Taken from the -gencode flags torch passes to
    nvcc, so it is what was built. Separated by "/": nvcc splits a -D value at commas into several macros."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    images = []
    for flag in _get_cuda_arch_flags():
        match = re.search(r",code=\[?([\w,]+)\]?", flag)
        images += [image for image in match.group(1).split(",") if image not in images] if match else []
    return "/".join(images)


def _cuda_library_headers():
    """Headers of the CUDA libraries torch's wheels bring (cuSPARSE, cuBLAS, ... under nvidia/cu13/include): ATen's
    CUDA headers include them, and the toolkit in CUDA_HOME may not carry them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    roots = [Path(p) for p in spec.submodule_search_locations]
    return [str(include) for root in roots for include in sorted(root.glob("*/include")) if include.is_dir()]


def _cutlass_headers() -> str:
    """CUTLASS/CuTe headers, from the pinned nvidia-cutlass package (cutlass_library/source/include)."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CUDA extension needs CUTLASS headers: pip install nvidia-cutlass (requirements.txt)")
    return str(Path(spec.submodule_search_locations[0]) / "source" / "include")


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    # ninja keeps its build directory (build/) between runs: only changed sources recompile.
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="pfa_kernels",
    version="0.1.0",
    description="Product Feedback Alignment layers at the cost of backpropagation",
    packages=find_packages(include=["pfa_kernels", "pfa_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "pyyaml", "tqdm", "matplotlib", "scikit-learn", "torchvision"],
    package_data={"pfa_kernels.train": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["pfa-train = pfa_kernels.train.__main__:main"]},
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()} if os.environ.get("PFA_KERNELS_NO_EXTENSION") != "1" else {},
)
