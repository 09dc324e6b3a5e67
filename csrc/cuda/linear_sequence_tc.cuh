// Tensor-core version of the fused linear sequence kernel (fp16/bf16 inputs, fp32 accumulation), on CuTe:
// both GEMMs, t = g·B and dx += t·R, run on SM80 MMA atoms (mma.sync 16x8x16; sm_90 runs them too). The
// tile t of g·B goes from the first GEMM's accumulators to shared memory (rounded to the input dtype, as a
// stored g_mid would be) and feeds the second GEMM from there: it never reaches global memory.
#pragma once

#include <cute/tensor.hpp>

namespace pfa_kernels {
namespace tc {

using namespace cute;

constexpr int TILE_P = 64;    // positions per block (M of both GEMMs)
constexpr int TILE_MID = 32;  // mid channels per block (N of the first GEMM, K of the second)
constexpr int TILE_K = 32;    // C_out chunk (K of the first GEMM)
constexpr int TILE_C = 64;    // dx columns per step (N of the second GEMM)
constexpr int THREADS = 128;  // 4 warps in a 2x2 MMA layout

template <typename T> struct MmaAtom;
template <> struct MmaAtom<half_t> { using type = SM80_16x8x16_F32F16F16F32_TN; };
template <> struct MmaAtom<bfloat16_t> { using type = SM80_16x8x16_F32BF16BF16F32_TN; };

// tile(i, j) = source[(row0 + i) * row_stride + (col0 + j) * col_stride], zero outside rows_total x cols_total.
template <typename T, typename SmemTile>
__device__ void load_tile(SmemTile& tile, const T* __restrict__ source, int64_t row0, int64_t col0, int64_t rows_total,
                          int64_t cols_total, int64_t row_stride, int64_t col_stride) {
  constexpr int cols = decltype(size<1>(tile))::value;
  for (int i = threadIdx.x; i < decltype(size(tile))::value; i += THREADS) {
    const int64_t row = row0 + i / cols, col = col0 + i % cols;
    tile(i / cols, i % cols) = (row < rows_total && col < cols_total) ? source[row * row_stride + col * col_stride]
                                                                      : T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) linear_sequence_tc_bwd_kernel(
    const T* __restrict__ g, const T* __restrict__ B, const T* __restrict__ R, float* __restrict__ dx, int64_t P,
    int64_t C_out, int64_t C_mid, int64_t C_in) {
  __shared__ T smem_A[TILE_P * TILE_K];      // g tile, then reused for nothing else
  __shared__ T smem_B[TILE_MID * TILE_K];    // B tile as (mid, out)
  __shared__ T smem_T[TILE_P * TILE_MID];    // t = g·B, the on-chip g_mid tile
  __shared__ T smem_R[TILE_C * TILE_MID];    // R tile as (column, mid)
  Tensor sA = make_tensor(make_smem_ptr(smem_A), make_layout(make_shape(Int<TILE_P>{}, Int<TILE_K>{}), LayoutRight{}));
  Tensor sB = make_tensor(make_smem_ptr(smem_B), make_layout(make_shape(Int<TILE_MID>{}, Int<TILE_K>{}), LayoutRight{}));
  Tensor sT = make_tensor(make_smem_ptr(smem_T), make_layout(make_shape(Int<TILE_P>{}, Int<TILE_MID>{}), LayoutRight{}));
  Tensor sR = make_tensor(make_smem_ptr(smem_R), make_layout(make_shape(Int<TILE_C>{}, Int<TILE_MID>{}), LayoutRight{}));

  using Atom = typename MmaAtom<T>::type;
  auto mma = make_tiled_mma(Atom{}, Layout<Shape<_2, _2, _1>>{});
  const int tid = threadIdx.x;
  auto thr = mma.get_slice(tid);
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * TILE_P;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TILE_MID;

  // First GEMM: t (TILE_P x TILE_MID) = sum over C_out chunks of g[p0:, k0:] · B[k0:, m0:].
  Tensor acc_t = thr.partition_fragment_C(sT);  // fp32 accumulators
  clear(acc_t);
  Tensor frag_A = thr.partition_fragment_A(sA);
  Tensor frag_B = thr.partition_fragment_B(sB);
  for (int64_t k0 = 0; k0 < C_out; k0 += TILE_K) {
    load_tile(sA, g, p0, k0, P, C_out, C_out, 1);      // g[p, o]
    load_tile(sB, B, m0, k0, C_mid, C_out, 1, C_mid);  // B[o, mid] as (mid, o)
    __syncthreads();
    copy(thr.partition_A(sA), frag_A);
    copy(thr.partition_B(sB), frag_B);
    gemm(mma, frag_A, frag_B, acc_t);
    __syncthreads();
  }
  Tensor thr_T = thr.partition_C(sT);
  for (int i = 0; i < size(acc_t); ++i) thr_T(i) = T(acc_t(i));
  __syncthreads();

  // Second GEMM: dx[p0:, c0:] += t · R[m0:, c0:], for every column tile, added into fp32 dx with atomics.
  Tensor frag_T = thr.partition_fragment_A(sT);
  copy(thr.partition_A(sT), frag_T);
  Tensor frag_R = thr.partition_fragment_B(sR);
  Tensor coords = thr.partition_C(make_identity_tensor(make_shape(Int<TILE_P>{}, Int<TILE_C>{})));
  for (int64_t c0 = 0; c0 < C_in; c0 += TILE_C) {
    load_tile(sR, R, c0, m0, C_in, C_mid, 1, C_in);     // R[mid, col] as (col, mid)
    __syncthreads();
    copy(thr.partition_B(sR), frag_R);
    Tensor acc_dx = partition_fragment_C(mma, make_shape(Int<TILE_P>{}, Int<TILE_C>{}));
    clear(acc_dx);
    gemm(mma, frag_T, frag_R, acc_dx);
    for (int i = 0; i < size(acc_dx); ++i) {
      const int64_t p = p0 + get<0>(coords(i)), col = c0 + get<1>(coords(i));
      if (p < P && col < C_in) atomicAdd(dx + p * C_in + col, acc_dx(i));
    }
    __syncthreads();
  }
}

}  // namespace tc
}  // namespace pfa_kernels
