"""Ahead-of-time compilation of every Triton kernel and configuration for real GPUs (no GPU needed), and
the resources each uses: registers and spills from ptxas, shared memory from Triton, estimated occupancy, and
the memory fences in its machine code (SASS, disassembled with the cuobjdump Triton ships).

    rows = compile_all(arch=90)     # sm_90 (H100); arch=80 for sm_80 (A100)

Used by the tests (which fail on spills or on shared memory over the architecture's limit) and by
benchmarks/bench_triton.py (the resource table). Must run without TRITON_INTERPRET (the interpreter
replaces the kernels with Python).
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import grouped_matmul, sequence_backward

# Per-architecture limits (CUDA programming guide, compute capability tables).
SHARED_MEMORY_PER_BLOCK = {80: 166912, 90: 232448}   # opt-in maximum, bytes
SHARED_MEMORY_PER_SM = {80: 167936, 90: 233472}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}


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
    """(registers per thread, spill store + load bytes) as ptxas reports them."""
    arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([_tool("ptxas"), f"-arch={arch_name}", "-v", str(source), "-o",
                                 str(Path(folder) / "k.o")], capture_output=True, text=True, check=True)
    report = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def _compile(fn, signature, constexprs, config, arch):
    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _sequence_signature(dtype_name):
    pointer = f"*{dtype_name}"
    names = ["grad_ptr", "B_ptr", "R_ptr", "dx_ptr", "positions", "out_channels", "mid_channels", "in_channels",
             "out_h", "out_w", "in_h", "in_w", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
             "grad_sn", "grad_sc", "grad_sh", "grad_sw", "B_so", "B_sm", "R_sm", "R_sc", "R_sh", "R_sw",
             "dx_sn", "dx_sc", "dx_sh", "dx_sw"]
    signature = {name: "i32" for name in names}
    signature.update(grad_ptr=pointer, B_ptr=pointer, R_ptr=pointer, dx_ptr="*fp32")
    for name in ("KERNEL_H", "KERNEL_W", "INPUT_PRECISION", "MID_DTYPE", "BLOCK_P", "BLOCK_MID", "BLOCK_OUT",
                 "BLOCK_C"):
        signature[name] = "constexpr"
    return signature


def _grouped_signature():
    signature = {name: "*i64" for name in ("left_ptrs", "right_ptrs", "out_ptrs", "sizes_ptr", "strides_ptr",
                                           "tile_starts_ptr")}
    signature["group_count"] = "i32"
    for name in ("DTYPE", "INPUT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K"):
        signature[name] = "constexpr"
    return signature


@functools.cache
def compile_all(arch: int) -> tuple[KernelResources, ...]:
    """Compile every kernel x configuration x dtype for sm_<arch>; return their resources (computed once)."""
    rows = []
    for dtype_name, dtype in DTYPES.items():
        precision = "ieee" if dtype_name == "fp32" else "tf32"
        for config in sequence_backward.CONFIGS:
            constexprs = {"KERNEL_H": 3, "KERNEL_W": 3, "INPUT_PRECISION": precision, "MID_DTYPE": dtype,
                          **config.kwargs}
            compiled = _compile(sequence_backward._sequence_input_grad_bwd_kernel, _sequence_signature(dtype_name),
                                constexprs, config, arch)
            rows.append(_resources("sequence_input_grad (3x3)", config, dtype_name, arch, compiled))
        for config in grouped_matmul.CONFIGS:
            constexprs = {"DTYPE": dtype, "INPUT_PRECISION": precision, **config.kwargs}
            compiled = _compile(grouped_matmul._grouped_matmul_fwd_kernel, _grouped_signature(), constexprs, config,
                                arch)
            rows.append(_resources("grouped_matmul", config, dtype_name, arch, compiled))
    return tuple(rows)


def _resources(kernel, config, dtype_name, arch, compiled) -> KernelResources:
    registers, spills = _ptxas_resources(compiled.asm["ptx"], arch)
    machine_code = sass(compiled.asm["cubin"])
    fences = fence_counts(compiled.asm["ptx"], machine_code)
    label = " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" warps={config.num_warps} " \
        f"stages={config.num_stages}"
    return KernelResources(kernel, label, dtype_name, arch, registers, spills, compiled.metadata.shared,
                           config.num_warps, fences.pop("ptx"), sum(fences.values()),
                           len(SASS_ATOMICS.findall(machine_code)))
