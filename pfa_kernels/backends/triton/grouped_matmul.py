"""Grouped GEMM: many independent products out_i = left_i @ right_i of unrelated shapes in one launch.

This is how pk.feedback_weights (model_feedback.py) forms the feedback products of a whole model at once:
W_fb = B·R (explicit) or M·Z (projected) for every PFA layer and every group of a grouped layer, instead of
one small GEMM launch per layer. (A layer's own backward uses batched_matmul.py: its groups are strided views of
one tensor and need no table.) Each program computes one BLOCK_M x BLOCK_N tile of one product; the tiles of
all products are numbered consecutively and a program finds its product from the table of first-tile indices.
Operands may be strided views (B^T is B with swapped strides: no copy). The tables of pointers, sizes and
strides go to the device in one copy from pinned host memory that does not block the host."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETER
from .launch import launch

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for A100/H100: the feedback products are C_out x C_mid x K with
# C_out in 64-2048 and K = C_in * k^2 in 27-4608. 64-128 x 64-128 tiles with 3 stages fit sm_80's 164 KB and
# sm_90's 228 KB of shared memory. With BLOCK_K = 32, 128-row tiles spilled in fp32 on sm_80 (ptxas: 284-512
# bytes; IEEE fp32 products run on FMA units and hold more registers); BLOCK_K = 16 does not. The AOT test
# checks each on both architectures. The 64x64 tile takes BLOCK_K = 16 too: with 32 it held 255 registers in fp32
# on sm_80 (no spill, no margin), and the same tile of batched_matmul.py spilled.
CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
]
_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _grouped_matmul_fwd_kernel(left_ptrs, right_ptrs, out_ptrs, sizes_ptr, strides_ptr, tile_starts_ptr, group_count,
                               DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    group = 0
    for g in range(0, group_count):  # the last product whose first tile is <= pid
        group = tl.where(pid >= tl.load(tile_starts_ptr + g), g, group)
    rows_total = tl.load(sizes_ptr + group * 3).to(tl.int32)
    cols_total = tl.load(sizes_ptr + group * 3 + 1).to(tl.int32)
    inner = tl.load(sizes_ptr + group * 3 + 2).to(tl.int32)
    # Strides of one operand fit in int32; the tile's base offset is formed in int64 (pid is int64).
    left_s0 = tl.load(strides_ptr + group * 6).to(tl.int32)
    left_s1 = tl.load(strides_ptr + group * 6 + 1).to(tl.int32)
    right_s0 = tl.load(strides_ptr + group * 6 + 2).to(tl.int32)
    right_s1 = tl.load(strides_ptr + group * 6 + 3).to(tl.int32)
    out_s0 = tl.load(strides_ptr + group * 6 + 4).to(tl.int32)
    out_s1 = tl.load(strides_ptr + group * 6 + 5).to(tl.int32)
    left = tl.load(left_ptrs + group).to(tl.pointer_type(DTYPE))
    right = tl.load(right_ptrs + group).to(tl.pointer_type(DTYPE))
    out = tl.load(out_ptrs + group).to(tl.pointer_type(DTYPE))

    local = pid - tl.load(tile_starts_ptr + group)
    tiles_n = tl.cdiv(cols_total, BLOCK_N)
    row_start = (local // tiles_n) * BLOCK_M
    col_start = (local % tiles_n) * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_valid = row_start + rows < rows_total
    col_valid = col_start + cols < cols_total
    left_tile = left + row_start * left_s0 + rows[:, None] * left_s0 + ks[None, :] * left_s1
    right_tile = right + col_start * right_s1 + ks[:, None] * right_s0 + cols[None, :] * right_s1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, inner, BLOCK_K):
        a = tl.load(left_tile, mask=row_valid[:, None] & (k_start + ks[None, :] < inner), other=0.0)
        b = tl.load(right_tile, mask=(k_start + ks[:, None] < inner) & col_valid[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        left_tile += BLOCK_K * left_s1
        right_tile += BLOCK_K * right_s0
    out_tile = out + row_start * out_s0 + col_start * out_s1 + rows[:, None] * out_s0 + cols[None, :] * out_s1
    tl.store(out_tile, acc.to(DTYPE), mask=row_valid[:, None] & col_valid[None, :])


def _launch_tables(lefts, rights, outs, block_m, block_n, device):
    """The kernel's six int64 tables (pointers of lefts, rights and outs; sizes (M, N, K) and strides per product;
    first tile per product) as views of one tensor on `device`, and the number of tiles.

    One host-to-device copy, from pinned memory with non_blocking=True: the host does not wait for the GPU. (A
    torch.tensor(..., device="cuda") per table was six blocking copies per call.) The pinned buffer may go out
    of scope at once: PyTorch's caching host allocator records the copy on the current stream and reuses the
    block only after it has completed. Each table starts on a 16-byte boundary, so that Triton sees the same
    pointer alignment (and compiles the same specialization) whatever the number of products.
    """
    sizes, strides, tile_starts, tiles = [], [], [], 0
    for left, right, out in zip(lefts, rights, outs, strict=True):
        tile_starts.append(tiles)
        tiles += triton.cdiv(left.shape[0], block_m) * triton.cdiv(right.shape[1], block_n)
        sizes += [left.shape[0], right.shape[1], left.shape[1]]
        strides += [*left.stride(), *right.stride(), *out.stride()]
    tables = [[t.data_ptr() for t in tensors] for tensors in (lefts, rights, outs)] + [sizes, strides, tile_starts]
    values, bounds = [], []
    for table in tables:
        bounds.append((len(values), len(values) + len(table)))
        values += table + [0] * (len(table) % 2)  # int64 entries: an even count keeps 16-byte alignment
    on_gpu = device.type == "cuda"
    flat = torch.tensor(values, dtype=torch.int64, pin_memory=on_gpu)
    if on_gpu:
        flat = flat.to(device, non_blocking=True)
    left_ptrs, right_ptrs, out_ptrs, sizes, strides, tile_starts = (flat[start:end] for start, end in bounds)
    return (left_ptrs, right_ptrs, out_ptrs), sizes, strides, tile_starts, tiles


@torch.library.triton_op("pfa_kernels::triton_grouped_matmul", mutates_args=())
def grouped_matmul(lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[left_i @ right_i for every i] in one launch. left_i (M_i, K_i), right_i (K_i, N_i), any strides, one
    dtype (fp32, fp16 or bf16; fp32 accumulation). Returns contiguous (M_i, N_i) tensors in that dtype."""
    if len(lefts) != len(rights) or not lefts:
        raise ValueError(f"lefts and rights must be non-empty lists of equal length; got {len(lefts)} and "
                         f"{len(rights)}")
    dtype, device = lefts[0].dtype, lefts[0].device
    for i, (left, right) in enumerate(zip(lefts, rights, strict=True)):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"product {i}: left {tuple(left.shape)} and right {tuple(right.shape)} do not multiply")
        if left.dtype != dtype or right.dtype != dtype or left.device != device or right.device != device:
            raise ValueError(f"product {i}: every operand must be {dtype} on {device}")
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"grouped_matmul takes float32, float16 or bfloat16; got {dtype}")
    if INTERPRETER and dtype == torch.bfloat16:
        # The interpreter keeps bf16 arguments as fp32 host copies, so bf16 memory reached through a pointer table
        # reads as garbage. Run the same arithmetic (exact bf16 products, fp32 accumulation, one rounding to bf16)
        # on fp32 copies; the bf16 kernel itself is compiled and checked by the ahead-of-time tests.
        return [out.to(dtype) for out in grouped_matmul([t.float() for t in lefts], [t.float() for t in rights])]
    outs = [torch.empty(left.shape[0], right.shape[1], dtype=dtype, device=device)
            for left, right in zip(lefts, rights, strict=True)]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    # One configuration for the whole launch (the tile table depends on the block sizes), chosen by shape rather
    # than by autotuning: 128x128 tiles when every product has >= 128 rows, else 64x64.
    large = min(left.shape[0] for left in lefts) >= 128
    config = CONFIGS[1] if large and not INTERPRETER else CONFIGS[0]
    meta = config.kwargs
    pointers, sizes, strides, tile_starts, tiles = _launch_tables(lefts, rights, outs, meta["BLOCK_M"],
                                                                 meta["BLOCK_N"], device)
    launch(_grouped_matmul_fwd_kernel, (tiles,), device, *pointers, sizes, strides, tile_starts, len(lefts),
           DTYPE=_TRITON_DTYPES[dtype], INPUT_PRECISION=precision, num_warps=config.num_warps,
           num_stages=config.num_stages, **meta)
    return outs
