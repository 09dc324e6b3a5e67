"""Ahead-of-time compilation of every Triton kernel for real GPUs (no GPU needed), and the resources each uses:
registers and spills from ptxas (run with Triton's own ptxas options), shared memory from Triton, estimated
occupancy, and the memory fences in its machine code (SASS, disassembled with the cuobjdump Triton ships).

    rows = compile_all(arch=90)     # sm_90 (H100); arch=80 for sm_80 (A100)

Every kernel x layer case (each kernel size the layers launch the fused sequence kernel with: linear, 1x1, 3x3,
1x3, 3x1, 1-d, 7x7; each product of a layer's backward for the batched GEMM; pk.feedback_weights' grouped GEMM)
x arguments ("runtime": the specialization Triton's launcher derives for that call, "generic": types only)
x configuration x dtype: 144 kernels per architecture, in up to 2 processes (about 1.5 minutes per
architecture on 2 cores when Triton's cache is cold; the measurements are cached with the kernels).

Used by the tests (which fail on spills or on shared memory over the architecture's limit) and by
benchmarks/bench_triton.py (the resource table). Must run without TRITON_INTERPRET (the interpreter
replaces the kernels with Python). A script calling compile_all needs an `if __name__ == "__main__":` guard:
the worker processes are spawned, and import the main module.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.cache import get_cache_manager

from . import batched_matmul, grouped_matmul, sequence_backward

# Per-architecture limits (CUDA programming guide, compute capability tables).
SHARED_MEMORY_PER_BLOCK = {80: 166912, 90: 232448}   # opt-in maximum, bytes
SHARED_MEMORY_PER_SM = {80: 167936, 90: 233472}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class KernelResources:
    kernel: str
    config: str
    dtype: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    ptx_fences: int = 0    # gpu/system-scope fences and ordered atomics in the PTX (PTX_FENCES)
    sass_fences: int = 0   # MEMBAR.*.GPU/SYS, ERRBAR and CCTL.IVALL in the SASS (SASS_FENCES)
    atomics: int = 0       # atomic and reduction instructions in the SASS
    case: str = ""         # the layer call: kernel size ("3x3", "linear") or product ("B·R"); "generic" if shared
    arguments: str = ""    # "runtime" (Triton's specialization of that call) or "generic" (types only)

    @property
    def occupancy(self) -> float:
        """Resident warps / the SM's maximum, limited by registers, shared memory, warps and blocks."""
        by_registers = REGISTERS_PER_SM // max(1, self.registers * 32 * self.num_warps)
        by_shared = SHARED_MEMORY_PER_SM[self.arch] // self.shared_bytes if self.shared_bytes else MAX_BLOCKS_PER_SM
        blocks = min(by_registers, by_shared, MAX_WARPS_PER_SM // self.num_warps, MAX_BLOCKS_PER_SM)
        return blocks * self.num_warps / MAX_WARPS_PER_SM


# Memory-ordering instructions: in PTX, membar/fence at gpu or system scope and atomics with acquire/release
# semantics; in SASS, what those become on sm_80/sm_90 (MEMBAR.*.GPU/SYS, ERRBAR, the CCTL.IVALL L1 flush).
# A CTA-scope MEMBAR and the async-proxy fences around Hopper's wgmma are not counted: they order shared memory
# inside one block, and a tensor-core kernel needs them.
PTX_FENCES = re.compile(r"\bmembar\.(?:gl|sys)\b|\bfence\.(?:sc|acq_rel)(?:\.gpu|\.sys)?\b|"
                        r"\b(?:atom|red)\.[\w.:]*\b(?:acq_rel|acquire|release)\b")
SASS_FENCES = re.compile(r"\bMEMBAR\.(?:\w+\.)?(?:GPU|SYS)\b|\bERRBAR\b|\bCCTL\.IVALL\b")
SASS_ATOMICS = re.compile(r"\b(?:RED|ATOM)G?\.")


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass(cubin: bytes) -> str:
    """The SASS of a compiled kernel (its cubin), as cuobjdump prints it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def fence_counts(ptx: str, machine_code: str) -> dict[str, int]:
    """Memory-ordering instructions of a kernel by kind: "ptx" (PTX_FENCES), then each SASS_FENCES mnemonic."""
    counts = {"ptx": len(PTX_FENCES.findall(ptx))}
    for match in SASS_FENCES.findall(machine_code):
        counts[match] = counts.get(match, 0) + 1
    return counts


def _ptxas_resources(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) as ptxas reports them, run with the options Triton's own
    ptxas step uses (-lineinfo, --regAllocOptLevel=2; without the latter some kernels came out 2-8 registers
    away from Triton's cubin)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o",
                                 str(Path(folder) / "k.o")], capture_output=True, text=True, check=True)
    report = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def specialization(fn, args, constants, runtime: bool):
    """(signature, constexprs, attrs) of ASTSource for fn called with positional `args` (the non-constexpr
    parameters, in order) and the constexprs `constants`.

    runtime=True: what JITFunction.run derives for that call on a GPU, with the same function
    (native_specialize_impl, arguments specialized and aligned as by default): an integer equal to 1 becomes a
    constexpr, an integer divisible by 16 and a 16-byte aligned pointer carry tt.divisibility = 16 (which lets
    loads and stores vectorize). runtime=False: none of it, the code Triton compiles for odd sizes and
    misaligned views, i.e. types alone.
    """
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name], constexprs[name] = "constexpr", constants[name]
            continue
        kind, attr = native_specialize_impl(CUDABackend, args[index], False, runtime, runtime)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = attr
        elif attr:
            attrs[(index,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


# The calls the layers make, with every size a multiple of 16 (N = 2, C_out = 64, C_mid = 256, C_in = 64, 32x32
# input maps): the most specialized code Triton compiles for each. Layer kind -> (kernel, stride, padding); the
# fused sequence kernel serves linear layers as 1x1 over rows (its 1-sized maps, unit strides and zero padding
# become constexprs and divisible arguments) and 1-d convolutions as 1 x k.
SEQUENCE_CASES = {
    "linear": ((), (), ()),
    "1x1": ((1, 1), (1, 1), (0, 0)),
    "3x3": ((3, 3), (1, 1), (1, 1)),
    "1x3": ((1, 3), (1, 1), (0, 1)),
    "3x1": ((3, 1), (1, 1), (1, 0)),
    "conv1d 3": ((3,), (1,), (1,)),
    "7x7 stride 2": ((7, 7), (2, 2), (3, 3)),
}
# The products of a layer's backward (pieces.py), group count 1: B·R and M·Z have row-major operands (one
# specialization for both), B^T·C a column-major left operand (B's strides swapped), which moves the constexpr 1
# from left's K stride to its M stride.
BATCHED_CASES = ("B·R, M·Z", "B^T·C")
_SIZES = dict(batch=2, out_channels=64, mid_channels=256, in_channels=64, in_size=32)


def _sequence_call(case, dtype_name):
    """(fn, positional args, constexprs) of the fused sequence kernel for one layer call (sequence_input_grad)."""
    kernel, stride, padding = SEQUENCE_CASES[case]
    n, c_out, c_mid, c_in, size = (_SIZES[k] for k in ("batch", "out_channels", "mid_channels", "in_channels",
                                                       "in_size"))
    empty = functools.partial(torch.empty, dtype=TORCH_DTYPES[dtype_name])
    if not kernel:  # linear: rows are positions
        grad, R, dx = empty(n * size, c_out), empty(c_mid, c_in), torch.empty(n * size, c_in)
    else:
        out = [(size + 2 * p - k) // s + 1 for k, s, p in zip(kernel, stride, padding, strict=True)]
        grad, R = empty(n, c_out, *out), empty(c_mid, c_in, *kernel)
        dx = torch.empty(n, c_in, *[size] * len(kernel))
    args, constants, _ = sequence_backward.launch_arguments(grad, empty(c_out, c_mid), R, dx, list(stride),
                                                            list(padding), [1] * len(kernel))
    return sequence_backward._sequence_input_grad_bwd_kernel, args, {**constants, "MID_DTYPE": DTYPES[dtype_name]}


def _batched_call(case, dtype_name):
    """(fn, positional args, constexprs) of the batched GEMM for one of a 3x3 layer's products (pieces.py)."""
    from . import pieces

    c_out, c_mid, c_in = _SIZES["out_channels"], _SIZES["mid_channels"], _SIZES["in_channels"]
    empty = functools.partial(torch.empty, dtype=TORCH_DTYPES[dtype_name])
    B, columns = empty(c_out, c_mid), pieces.grouped_columns(empty(c_out, c_in, 3, 3), 1)
    if case == "B^T·C":
        left, right = pieces.grouped_B(B, 1).transpose(1, 2), columns
    else:
        left, right = pieces.grouped_B(B, 1), empty(c_mid, c_in, 3, 3).reshape(1, c_mid, -1)
    args, constants, _ = batched_matmul.launch_arguments(left, right, empty(1, left.shape[1], right.shape[2]))
    return batched_matmul._batched_matmul_fwd_kernel, args, {"INPUT_PRECISION": constants["INPUT_PRECISION"]}


def _grouped_call(case, dtype_name):
    """(fn, positional args, constexprs) of the grouped GEMM for pk.feedback_weights on 16 products (a ResNet-18
    has 20 convolutions and a linear layer), its tables from _launch_tables."""
    dtype = TORCH_DTYPES[dtype_name]
    lefts, rights, outs = ([torch.empty(rows, cols, dtype=dtype)] * 16 for rows, cols in ((64, 576), (576, 64),
                                                                                         (64, 64)))
    pointers, sizes, strides, tile_starts, _ = grouped_matmul._launch_tables(lefts, rights, outs, 64, 64,
                                                                             torch.device("cpu"))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return (grouped_matmul._grouped_matmul_fwd_kernel, (*pointers, sizes, strides, tile_starts, len(lefts)),
            {"DTYPE": DTYPES[dtype_name], "INPUT_PRECISION": precision})


# kernel -> (module with CONFIGS, call builder, cases). Each case compiles with "runtime" arguments (the
# specialization of its representative call) and "generic" ones (no specialization); generic code depends only
# on the constexprs, so the linear case shares 1x1's and the products share one.
KERNELS = {
    "sequence_input_grad": (sequence_backward, _sequence_call, tuple(SEQUENCE_CASES)),
    "batched_matmul": (batched_matmul, _batched_call, BATCHED_CASES),
    "grouped_matmul": (grouped_matmul, _grouped_call, ("16 products",)),
}
ARGUMENTS = ("runtime", "generic")


def jobs(configs=None) -> list[tuple[str, str, str, int, str]]:
    """Every (kernel, case, arguments, config index, dtype) compile_all compiles, generic duplicates left out.
    configs: {kernel: list of triton.Config} to use instead of the modules' CONFIGS (for comparisons)."""
    result = []
    for kernel, (module, _, cases) in KERNELS.items():
        count = len((configs or {}).get(kernel, module.CONFIGS))
        for arguments in ARGUMENTS:
            for case in cases:
                if arguments == "generic" and _generic_duplicate(kernel, case):
                    continue
                result += [(kernel, case, arguments, index, dtype) for index in range(count) for dtype in DTYPES]
    return result


# Generic code depends only on the constexprs: a linear layer's is 1x1's, a 1-d convolution's 1 x k's, and the
# products share one. The generic row of the first case stands for all of them.
_GENERIC_SHARED = {("sequence_input_grad", "1x1"): "1x1, linear", ("sequence_input_grad", "1x3"): "1x3, conv1d 3",
                   ("batched_matmul", "B·R, M·Z"): "all products"}


def _generic_duplicate(kernel, case) -> bool:
    """Whether the generic variant of a case is that of an earlier case (same constexprs)."""
    return (kernel, case) in {("sequence_input_grad", "linear"), ("sequence_input_grad", "conv1d 3"),
                              ("batched_matmul", "B^T·C")}


def compile_one(job, arch, configs=None) -> KernelResources:
    """Compile one job of jobs() for sm_<arch> and measure it."""
    kernel, case, arguments, index, dtype_name = job
    module, call, _ = KERNELS[kernel]
    config = (configs or {}).get(kernel, module.CONFIGS)[index]
    fn, args, constants = call(case, dtype_name)
    signature, constexprs, attrs = specialization(fn, args, {**constants, **config.kwargs}, arguments == "runtime")
    source = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    label = _GENERIC_SHARED.get((kernel, case), case) if arguments == "generic" else case
    return _resources(kernel, label, arguments, config, dtype_name, arch, compiled)


def _compile_jobs(job_list, arch, configs=None, workers=1):
    if workers <= 1:
        return tuple(compile_one(job, arch, configs) for job in job_list)
    context = multiprocessing.get_context("spawn")  # the parent has torch's thread pools; a fork would inherit them
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return tuple(pool.map(compile_one, job_list, [arch] * len(job_list), [configs] * len(job_list),
                              chunksize=4))


@functools.cache
def compile_all(arch: int) -> tuple[KernelResources, ...]:
    """Every kernel x layer case x runtime/generic arguments x configuration x dtype, compiled for sm_<arch> in
    up to 2 processes; their resources (computed once per process)."""
    return _compile_jobs(jobs(), arch, workers=min(2, os.cpu_count() or 1))


# What _measure does to a compiled kernel (tools, options, patterns): its results are cached next to the kernel in
# Triton's cache under a name derived from this, so a change here measures afresh.
_MEASUREMENT = repr(("ptxas -lineinfo -v --regAllocOptLevel=2", "cuobjdump -sass", PTX_FENCES.pattern,
                     SASS_FENCES.pattern, SASS_ATOMICS.pattern))


def _measure(compiled, arch) -> dict:
    """registers, spills (ptxas), fences and atomics (PTX, SASS) of a compiled kernel; cached in Triton's cache
    directory with the kernel (key: its hash), since ptxas and cuobjdump take 0.1 s and 0.25 s per kernel here
    while a compile Triton has cached takes milliseconds."""
    cache = get_cache_manager(compiled.hash)
    name = f"pfa_resources_sm{arch}_{hashlib.sha256(_MEASUREMENT.encode()).hexdigest()[:16]}.json"
    path = cache.get_file(name)
    if path is not None:
        return json.loads(Path(path).read_text())
    registers, spills = _ptxas_resources(compiled.asm["ptx"], arch)
    machine_code = sass(compiled.asm["cubin"])
    fences = fence_counts(compiled.asm["ptx"], machine_code)
    measured = dict(registers=registers, spill_bytes=spills, ptx_fences=fences.pop("ptx"),
                    sass_fences=sum(fences.values()), atomics=len(SASS_ATOMICS.findall(machine_code)))
    cache.put(json.dumps(measured), name, binary=False)
    return measured


def _resources(kernel, case, arguments, config, dtype_name, arch, compiled) -> KernelResources:
    label = " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" warps={config.num_warps} " \
        f"stages={config.num_stages}"
    return KernelResources(kernel, label, dtype_name, arch, shared_bytes=compiled.metadata.shared,
                           num_warps=config.num_warps, case=case, arguments=arguments, **_measure(compiled, arch))
