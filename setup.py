"""Build script for pfa_kernels.

The package is pure Python today; the compiled extension in csrc/ (CPU kernels, and CUDA kernels
where torch has CUDA and CUDA_HOME is set) slots into `ext_modules` below. The package imports and
works without it.
"""

from setuptools import find_packages, setup


def extension_modules():
    """Compiled extensions to build (none yet: csrc/ does not exist)."""
    return []


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
)
