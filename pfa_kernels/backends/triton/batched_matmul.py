"""Strided batched GEMM: out[g] = left[g] @ right[g] for every group g of one layer, in one launch.

The per-layer feedback products (B_j·R_j, B_j^T·C_j, M_j·Z_j over the groups j of a layer, see pieces.py) have
operands that are views of one tensor each: group g starts at the base pointer plus g times a group stride.
So the kernel needs no pointer table (which grouped_matmul.py builds for products of unrelated shapes), only
sizes and strides passed by value: nothing is copied to the device before the launch, nothing waits on the
host, and the launch can be captured in a CUDA graph. The group comes from the grid's second axis, the output
tile from the first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETER
from .launch import launch

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for A100/H100, as in grouped_matmul.py (same products: C_out or C_mid/G
# rows in 16-2048, K = C_in/G * k^2 in 9-4608 columns); config_for picks one by the number of rows. BLOCK_K = 16:
# with 32, the 64x64 tile spilled in fp32 (IEEE products on FMA units keep both operand slices in registers):
# 12 bytes on sm_80 with generic arguments (255 registers) and on sm_90 with those of B·R; with 16 it takes 168
# registers at most. A third, 128x64 tile that config_for never chose spilled 8 bytes in fp32 on sm_90 (B^T·C)
# and is gone. The AOT test compiles each for the layers' products (B·R, B^T·C, M·Z) with run-time and generic
# argument specializations, every dtype, sm_80 and sm_90, and checks that none spills.
CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=3),
]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _batched_matmul_fwd_kernel(left_ptr, right_ptr, out_ptr, rows_total, cols_total, inner,
                               left_sg, left_sm, left_sk, right_sg, right_sk, right_sn, out_sg, out_sm, out_sn,
                               INPUT_PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)  # int64: group * group stride may pass 2^31 elements
    tiles_n = tl.cdiv(cols_total, BLOCK_N)
    row_start = (pid // tiles_n) * BLOCK_M
    col_start = (pid % tiles_n) * BLOCK_N
    rows = tl.arange(0, BLOCK_M)             # offsets inside a tile stay int32
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_valid = row_start + rows < rows_total
    col_valid = col_start + cols < cols_total
    left_tile = left_ptr + group * left_sg + row_start * left_sm + rows[:, None] * left_sm + ks[None, :] * left_sk
    right_tile = right_ptr + group * right_sg + col_start * right_sn + ks[:, None] * right_sk + cols[None, :] * right_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, inner, BLOCK_K):
        a = tl.load(left_tile, mask=row_valid[:, None] & (k_start + ks[None, :] < inner), other=0.0)
        b = tl.load(right_tile, mask=(k_start + ks[:, None] < inner) & col_valid[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        left_tile += BLOCK_K * left_sk
        right_tile += BLOCK_K * right_sk
    out_tile = (out_ptr + group * out_sg + row_start * out_sm + col_start * out_sn + rows[:, None] * out_sm
                + cols[None, :] * out_sn)
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def config_for(rows: int) -> triton.Config:
    """The tile for products with `rows` rows, chosen by shape (no autotuning: no benchmark, no host sync on a
    first call, nothing to warm up before a CUDA graph capture): 128x128 from 128 rows, else 64x64."""
    return CONFIGS[1] if rows >= 128 and not INTERPRETER else CONFIGS[0]


def launch_arguments(left, right, out):
    """(positional arguments, constexpr keywords, grid) of the kernel for out = left @ right, each (G, ., .)."""
    groups, rows, inner = left.shape
    cols = right.shape[2]
    config = config_for(rows)
    precision = "ieee" if left.dtype == torch.float32 else "tf32"
    args = (left, right, out, rows, cols, inner, *left.stride(), *right.stride(), *out.stride())
    grid = (triton.cdiv(rows, config.kwargs["BLOCK_M"]) * triton.cdiv(cols, config.kwargs["BLOCK_N"]), groups)
    return args, dict(INPUT_PRECISION=precision, **config.all_kwargs()), grid


@torch.library.triton_op("pfa_kernels::triton_batched_matmul", mutates_args=())
def batched_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left[g] @ right[g] for every g in one launch. left (G, M, K), right (G, K, N), any strides (transposed
    views, group strides of views into one tensor, zero strides of expanded ones), one dtype (fp32, fp16 or
    bf16; fp32 accumulation, fp32 inputs as IEEE fp32 products). Returns a contiguous (G, M, N) in that dtype."""
    if left.dim() != 3 or right.dim() != 3 or left.shape[0] != right.shape[0] or left.shape[2] != right.shape[1]:
        raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} are not (G, M, K) and (G, K, N)")
    if left.dtype != right.dtype or left.device != right.device:
        raise ValueError(f"left ({left.dtype} on {left.device}) and right ({right.dtype} on {right.device}) must "
                         f"share dtype and device")
    if left.dtype not in _DTYPES:
        raise TypeError(f"batched_matmul takes float32, float16 or bfloat16; got {left.dtype}")
    if INTERPRETER and left.dtype == torch.bfloat16:
        # The interpreter gets tl.dot on bf16 operands wrong. Same arithmetic (exact bf16 products, fp32
        # accumulation, one rounding to bf16) on fp32 copies; the AOT test compiles the real bf16 kernel.
        return batched_matmul(left.float(), right.float()).to(torch.bfloat16)
    out = torch.empty(left.shape[0], left.shape[1], right.shape[2], dtype=left.dtype, device=left.device)
    if out.numel() == 0:  # an empty grid is not a launch
        return out
    args, constants, grid = launch_arguments(left, right, out)
    launch(_batched_matmul_fwd_kernel, grid, out.device, *args, **constants)
    return out
