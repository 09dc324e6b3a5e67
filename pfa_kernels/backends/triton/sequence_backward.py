"""Fused sequence-order input gradient: dL/dx = conv_transpose(B^T g, R), with g_mid = B^T g never in memory.

One kernel serves linear layers (a 1x1 "convolution" over rows) and 1-d/2-d convolutions (stride, padding,
dilation; groups = 1). It is a scatter-form (col2im) implicit GEMM:

    program (output-position tile p, mid-channel chunk m):
        g_mid[p, m] = g[p, :] @ B[:, m]                      computed once, kept in registers (fp32 acc)
        for each kernel tap (kh, kw), each input-channel tile c:
            dx[input position of (p, kh, kw), c] += g_mid[p, m] @ R[m, c, kh, kw]    (fp32 atomic add)

Each g_mid element is computed exactly once (P * C_out * C_mid MACs, as in the unfused order) and R is read
once per position tile; the mid chunks of one position tile meet in dx through fp32 atomics, which is where
the parallelism comes from when P is small (the case the planner sends to the sequence order).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import INTERPRETER
from .launch import launch

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Autotune configurations for A100/H100 (sm_80/sm_90): per program an fp32 g_mid tile of 32-64 positions x
# 32-64 mid channels (<= 8 KB) plus 16-32-wide grad, R and dx tiles. Wider tiles used all 255 registers and spilled
# (ptxas: 64x64x64 with 4 warps on sm_90; 64x64 with 8 warps in fp32 on sm_80, 448 bytes). The 64-position tile
# reads grad in 16-channel chunks (BLOCK_OUT): with 32 it spilled 8 bytes in fp32 on sm_90 for a 3x1 kernel with
# run-time arguments. The 32x32 tile also takes 16 (BLOCK_OUT = 32 held 255 registers in fp32 on sm_80 with
# generic arguments, 3x3, 1x3 and 7x7). The AOT test compiles every one for each kernel size the layers launch.
CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_MID": 32, "BLOCK_OUT": 16, "BLOCK_C": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_P": 32, "BLOCK_MID": 64, "BLOCK_OUT": 32, "BLOCK_C": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_P": 32, "BLOCK_MID": 32, "BLOCK_OUT": 16, "BLOCK_C": 32}, num_warps=4, num_stages=2),
]


@triton.jit
def _sequence_input_grad_bwd_kernel(
        grad_ptr, B_ptr, R_ptr, dx_ptr,
        positions, out_channels, mid_channels, in_channels,
        out_h, out_w, in_h, in_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        grad_sn, grad_sc, grad_sh, grad_sw,
        B_so, B_sm,
        R_sm, R_sc, R_sh, R_sw,
        dx_sn, dx_sc, dx_sh, dx_sw,
        KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, INPUT_PRECISION: tl.constexpr, MID_DTYPE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_MID: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_mid = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # int64: positions x channels may pass 2^31 elements
    p_valid = p < positions
    ow = p % out_w
    oh = (p // out_w) % out_h
    n = p // (out_w * out_h)
    mid_start = pid_mid * BLOCK_MID
    mids = tl.arange(0, BLOCK_MID)           # offsets inside a tile stay int32
    mid_valid = mid_start + mids < mid_channels
    outs = tl.arange(0, BLOCK_OUT)
    cs = tl.arange(0, BLOCK_C)

    # g_mid tile = g[p, :] @ B[:, mids], accumulated in fp32 over C_out chunks.
    grad_tile = grad_ptr + (n * grad_sn + oh * grad_sh + ow * grad_sw)[:, None] + outs[None, :] * grad_sc
    B_tile = B_ptr + mid_start * B_sm + outs[:, None] * B_so + mids[None, :] * B_sm
    g_mid = tl.zeros((BLOCK_P, BLOCK_MID), dtype=tl.float32)
    for out_start in range(0, out_channels, BLOCK_OUT):
        out_valid = out_start + outs < out_channels
        g = tl.load(grad_tile, mask=p_valid[:, None] & out_valid[None, :], other=0.0)
        b = tl.load(B_tile, mask=out_valid[:, None] & mid_valid[None, :], other=0.0)
        g_mid = tl.dot(g, b, g_mid, input_precision=INPUT_PRECISION)
        grad_tile += BLOCK_OUT * grad_sc
        B_tile += BLOCK_OUT * B_so
    # g_mid is rounded to the input dtype before the second product, as a stored g_mid would be.
    g_mid = g_mid.to(MID_DTYPE).to(R_ptr.dtype.element_ty)

    R_mid = R_ptr + mid_start * R_sm + mids[:, None] * R_sm
    # A runtime loop over the taps (not unrolled): unrolling 9 taps kept their row offsets live and spilled.
    for tap in range(0, KERNEL_H * KERNEL_W):
        kh = tap // KERNEL_W
        kw = tap % KERNEL_W
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        row_valid = p_valid & (ih >= 0) & (ih < in_h) & (iw >= 0) & (iw < in_w)
        dx_rows = dx_ptr + n * dx_sn + ih * dx_sh + iw * dx_sw
        R_tap = R_mid + kh * R_sh + kw * R_sw
        for c_start in range(0, in_channels, BLOCK_C):
            c_valid = c_start + cs < in_channels
            r = tl.load(R_tap + (c_start + cs[None, :]) * R_sc, mask=mid_valid[:, None] & c_valid[None, :], other=0.0)
            contribution = tl.dot(g_mid, r, input_precision=INPUT_PRECISION)
            # Relaxed: the adds only accumulate and nothing reads dx before the kernel ends. The default, acq_rel,
            # put MEMBAR.ALL.GPU + ERRBAR before and CCTL.IVALL (an L1 flush) after every atomic on sm_80/sm_90:
            # 8 of each per thread per R tile with the 64x32 tile on 8 warps. Relaxed is a plain REDG, as in
            # PyTorch's own generated Triton code; the AOT test checks that no fence comes back.
            tl.atomic_add(dx_rows[:, None] + (c_start + cs[None, :]) * dx_sc, contribution,
                          mask=row_valid[:, None] & c_valid[None, :], sem="relaxed")


_autotuned_kernel = triton.autotune(CONFIGS, key=["out_channels", "mid_channels", "in_channels", "KERNEL_H",
                                                  "KERNEL_W"], reset_to_zero=["dx_ptr"])(
    _sequence_input_grad_bwd_kernel)


def _as_2d_geometry(grad_output, R, input_size, stride, padding, dilation):
    """Strides and sizes of a linear, 1-d or 2-d layer seen as a 2-d convolution (missing dims have size 1)."""
    spatial = grad_output.dim() - 2
    if R.dim() == 2:  # linear: rows are positions, a 1x1 kernel
        rows, out_channels = grad_output.shape
        return dict(positions=rows, out_h=1, out_w=1, in_h=1, in_w=1, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                    dilation=(1, 1), grad_strides=(grad_output.stride(0), grad_output.stride(1), 0, 0),
                    R_strides=(R.stride(0), R.stride(1), 0, 0))
    if spatial == 1:
        n, _, length = grad_output.shape
        return dict(positions=n * length, out_h=1, out_w=length, in_h=1, in_w=input_size[2], kernel=(1, R.shape[2]),
                    stride=(1, stride[0]), padding=(0, padding[0]), dilation=(1, dilation[0]),
                    grad_strides=(grad_output.stride(0), grad_output.stride(1), 0, grad_output.stride(2)),
                    R_strides=(R.stride(0), R.stride(1), 0, R.stride(2)))
    n, _, out_h, out_w = grad_output.shape
    return dict(positions=n * out_h * out_w, out_h=out_h, out_w=out_w, in_h=input_size[2], in_w=input_size[3],
                kernel=tuple(R.shape[2:]), stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                grad_strides=grad_output.stride(), R_strides=R.stride())


def launch_arguments(grad_output, B, R, dx, stride, padding, dilation):
    """(positional arguments, constexpr keywords, positions) of the kernel for one call, in the order it takes them.

    grad_output, B, R as in sequence_input_grad; dx: the fp32 (input_size) buffer the kernel accumulates into.
    Shared with aot.py, which derives from it the argument specializations Triton applies to a real call.
    """
    geometry = _as_2d_geometry(grad_output, R, list(dx.shape), stride, padding, dilation)
    out_channels, mid_channels = B.shape
    in_channels = R.shape[1]
    if dx.dim() == 2:
        dx_strides = (dx.stride(0), dx.stride(1), 0, 0)
    elif dx.dim() == 3:
        dx_strides = (dx.stride(0), dx.stride(1), 0, dx.stride(2))
    else:
        dx_strides = dx.stride()
    precision = "ieee" if grad_output.dtype == torch.float32 else "tf32"
    constants = dict(KERNEL_H=geometry["kernel"][0], KERNEL_W=geometry["kernel"][1], INPUT_PRECISION=precision)
    args = (grad_output, B, R, dx, geometry["positions"], out_channels, mid_channels, in_channels,
            geometry["out_h"], geometry["out_w"], geometry["in_h"], geometry["in_w"], *geometry["stride"],
            *geometry["padding"], *geometry["dilation"], *geometry["grad_strides"], *B.stride(),
            *geometry["R_strides"], *dx_strides)
    return args, constants, geometry["positions"]


def _alert_not_deterministic() -> None:
    """The kernel's fp32 atomic adds into dx meet in an order that changes from run to run, and so does the
    rounding of dx: under torch.use_deterministic_algorithms(True) it raises, with warn_only=True it warns, as
    PyTorch's own nondeterministic kernels do (same message). Under torch.compile it fires while the op is traced.
    """
    if not torch.are_deterministic_algorithms_enabled():
        return
    caller = "pfa_kernels::triton_sequence_input_grad (the fused Triton sequence-order input gradient)"
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(f"{caller} does not have a deterministic implementation, but you set "
                      f"'torch.use_deterministic_algorithms(True, warn_only=True)'.", stacklevel=3)
        return
    raise RuntimeError(f"{caller} does not have a deterministic implementation, but you set "
                       f"'torch.use_deterministic_algorithms(True)'. Give the layer strategy='product' or "
                       f"backend='torch' (both deterministic), or use the 'warn_only=True' option.")


@torch.library.triton_op("pfa_kernels::triton_sequence_input_grad", mutates_args=())
def sequence_input_grad(grad_output: torch.Tensor, B: torch.Tensor, R: torch.Tensor, input_size: list[int],
                        stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    """dL/dx = conv_transpose(B^T g, R) in one kernel, g_mid never written to memory.

    grad_output: linear (P, C_out) or conv (N, C_out, *out_spatial) with 1 or 2 spatial dims; B (C_out, C_mid);
    R (C_mid, C_in) or (C_mid, C_in, *kernel) (groups = 1); input_size: x's shape. Returns dL/dx (input_size)
    in grad_output's dtype (accumulated in fp32).
    """
    _alert_not_deterministic()
    out_dtype, mid_dtype = grad_output.dtype, _TRITON_DTYPES[grad_output.dtype]
    if INTERPRETER and out_dtype == torch.bfloat16:
        # Triton 3.8's interpreter gets tl.dot on bf16 operands wrong; bf16 products are exact in fp32, so run the
        # kernel on fp32 copies and keep the bf16 rounding of g_mid (MID_DTYPE). The AOT tests compile real bf16.
        grad_output, B, R = grad_output.float(), B.float(), R.float()
    dx = torch.zeros(input_size, dtype=torch.float32, device=grad_output.device)
    args, constants, positions = launch_arguments(grad_output, B, R, dx, stride, padding, dilation)
    constants["MID_DTYPE"] = mid_dtype
    mid_channels = B.shape[1]
    if INTERPRETER:  # the interpreter cannot benchmark configurations: take the first
        kernel, constants = _sequence_input_grad_bwd_kernel, {**constants, **CONFIGS[0].kwargs}
    else:
        kernel = _autotuned_kernel

    def grid(meta):
        return triton.cdiv(positions, meta["BLOCK_P"]), triton.cdiv(mid_channels, meta["BLOCK_MID"])

    launch(kernel, grid, dx.device, *args, **constants)
    return dx.to(out_dtype)
