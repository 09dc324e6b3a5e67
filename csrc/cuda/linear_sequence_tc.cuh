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

constexpr int VEC = 8;  // 16-bit elements per 16-byte global load (LDG.E.128)

// Every shared tile is (rows, 32) K-major (both GEMMs' K is 32: TILE_K = TILE_MID), swizzled to keep shared memory
// free of bank conflicts. Plain row-major, a row is 64 bytes = 16 banks: an MMA fragment read (one 32-bit word per
// lane, lanes 4r..4r+3 on row r for 8 rows) puts rows 0, 2, 4, 6 on the same 4 banks, a 4-way conflict.
// Swizzle<3, 3, 3> XORs element-offset bits 6-8 into bits 3-5, which permutes the 16-byte chunks of a row by its
// row bits 1-2 and flips the row half-bank (bit 5) by row bit 3:
//  - fragment reads (rows 8j..8j+7, words q = 0..3 of one chunk): 8 rows x 4 words on 32 distinct banks;
//  - 16-byte stores of g (a quarter warp writes rows r, r+1 whole): 8 chunks on 32 distinct banks;
//  - the transposing 32-bit stores of B and R (load_tile_transposed): 32 distinct banks;
//  - 16-byte chunks stay contiguous (bits 0-2 untouched), so vectors and 32-bit fragment pairs survive.
// The unswizzled offsets these replace were row * 32 + k; the tiles are the same size.
template <int Rows>
CUTE_HOST_DEVICE constexpr auto smem_tile_layout() {
  return composition(Swizzle<3, 3, 3>{}, make_layout(make_shape(Int<Rows>{}, Int<TILE_K>{}), LayoutRight{}));
}

// 16-byte loads need every vector of the source 16-byte aligned and wholly inside or wholly outside the extent:
// the base pointer aligned, the leading stride and the contiguous extent multiples of 8 elements. Otherwise (an odd
// channel count, a view starting at an odd element) the loaders take their scalar path; the check is uniform
// over the grid.
template <typename T>
__device__ bool vectorizable(const T* source, int64_t leading_stride, int64_t contiguous_extent) {
  return reinterpret_cast<uintptr_t>(source) % 16 == 0 && leading_stride % VEC == 0 && contiguous_extent % VEC == 0;
}

// The piece of a tile that thread slot i = threadIdx.x + pass * THREADS takes on the 16-byte paths (host-callable
// so that tests/test_cpp_device_code.py can count the sectors and banks of these mappings without a GPU).
struct TilePiece {
  int r, k;
};
// load_tile_rows: tile(r, k..k+7), one 16-byte load; 4 slots per 64-byte row.
CUTE_HOST_DEVICE constexpr TilePiece row_piece(int i) { return {i / (TILE_K / VEC), i % (TILE_K / VEC) * VEC}; }
// load_tile_transposed: tile(r..r+7, k..k+1), two 16-byte loads (source rows k, k + 1); slots 0..units-1.
template <int Rows>
constexpr int transposed_units = Rows / VEC * (TILE_K / 2);  // 64 for B (32 rows), 128 for R (64 rows)
template <int Rows>
CUTE_HOST_DEVICE constexpr TilePiece transposed_piece(int i) {
  constexpr int half = Rows / VEC / 2;  // vector pairs per source row
  const int group = i / 32;             // lane = i % 32
  return {VEC * (i % 2 + 2 * (group % half)), 2 * (i / 2 % 16 + 16 * (group / half))};
}

// tile(r, k) = source[(row0 + r) * ld + k0 + k], zero outside rows_total x k_total: g, contiguous along the tile's
// K. Consecutive threads take consecutive 16-byte pieces of a row (4 per 64-byte row: a warp reads 8 whole rows,
// 16 full sectors), or consecutive elements on the scalar path.
template <int Rows, typename T>
__device__ void load_tile_rows(T* tile, const T* __restrict__ source, int64_t row0, int64_t k0, int64_t rows_total,
                               int64_t k_total, int64_t ld, bool vectorized) {
  constexpr auto layout = smem_tile_layout<Rows>();
  if (vectorized) {
    constexpr int per_row = TILE_K / VEC;
    static_assert(Rows * per_row % THREADS == 0, "whole passes of the block");
#pragma unroll
    for (int pass = 0; pass < Rows * per_row / THREADS; ++pass) {
      const auto [r, k] = row_piece(threadIdx.x + pass * THREADS);
      const int64_t row = row0 + r, col = k0 + k;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row < rows_total && col < k_total) v = *reinterpret_cast<const uint4*>(source + row * ld + col);
      *reinterpret_cast<uint4*>(tile + layout(r, k)) = v;
    }
  } else {
    static_assert(Rows * TILE_K % THREADS == 0, "whole passes of the block");
#pragma unroll 4
    for (int pass = 0; pass < Rows * TILE_K / THREADS; ++pass) {
      const int i = threadIdx.x + pass * THREADS, r = i / TILE_K, k = i % TILE_K;
      const int64_t row = row0 + r, col = k0 + k;
      tile[layout(r, k)] = (row < rows_total && col < k_total) ? source[row * ld + col] : T(0);
    }
  }
}

// tile(r, k) = source[(k0 + k) * ld + row0 + r], zero outside rows_total x k_total: B as (mid, out) and R as
// (column, mid), contiguous along the tile's rows, so the tile is the source transposed. Consecutive threads used to
// walk k, ld elements apart: one 32-byte sector per 2-byte element, 16x the sectors of a coalesced read. Now a
// thread loads 8 consecutive r at rows k and k + 1 (two 16-byte loads) and writes them down two adjacent tile
// columns as 8 32-bit stores of (r, k..k+1) pairs. Lane l takes source rows k = 2 (l / 2) and k + 1 and, of
// each, the 16 bytes at vector l % 2 of its warp's pair of vectors: a warp load reads 16 rows x 32 contiguous
// bytes, 16 full sectors. Across a warp's store, k bits 1-4 and the swizzle's half-bank bit (tile-row bit 3,
// from l % 2) give 32 distinct banks. R (64 rows: 8 vectors x 16 row pairs) takes one pair per thread, B (32
// rows) half the block. The scalar path reads consecutive r with consecutive threads (2-byte stores, 4-way
// conflicts: the fallback for unaligned sources).
template <int Rows, typename T>
__device__ void load_tile_transposed(T* tile, const T* __restrict__ source, int64_t row0, int64_t k0,
                                     int64_t rows_total, int64_t k_total, int64_t ld, bool vectorized) {
  constexpr auto layout = smem_tile_layout<Rows>();
  if (vectorized) {
    constexpr int units = transposed_units<Rows>;
    static_assert(Rows % (2 * VEC) == 0 && TILE_K == 32 && (units % THREADS == 0 || THREADS % units == 0), "mapping");
    uint32_t* const words = reinterpret_cast<uint32_t*>(tile);
#pragma unroll
    for (int pass = 0; pass < (units + THREADS - 1) / THREADS; ++pass) {
      const int i = threadIdx.x + pass * THREADS;
      if (units % THREADS != 0 && i >= units) break;
      const auto [r, k] = transposed_piece<Rows>(i);
      const int64_t row = row0 + r, kk = k0 + k;
      uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;  // rows k and k + 1
      if (row < rows_total && kk < k_total) lo = *reinterpret_cast<const uint4*>(source + kk * ld + row);
      if (row < rows_total && kk + 1 < k_total) hi = *reinterpret_cast<const uint4*>(source + (kk + 1) * ld + row);
      const uint32_t lo_words[4] = {lo.x, lo.y, lo.z, lo.w}, hi_words[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int e = 0; e < VEC; ++e)  // (r + e, k) in the low half, (r + e, k + 1) in the high half
        words[layout(r + e, k) / 2] = __byte_perm(lo_words[e / 2], hi_words[e / 2], e % 2 ? 0x7632 : 0x5410);
    }
  } else {
    static_assert(Rows * TILE_K % THREADS == 0, "whole passes of the block");
#pragma unroll 4
    for (int pass = 0; pass < Rows * TILE_K / THREADS; ++pass) {
      const int i = threadIdx.x + pass * THREADS, r = i % Rows, k = i / Rows;
      const int64_t row = row0 + r, kk = k0 + k;
      tile[layout(r, k)] = (row < rows_total && kk < k_total) ? source[kk * ld + row] : T(0);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) linear_sequence_tc_bwd_kernel(
    const T* __restrict__ g, const T* __restrict__ B, const T* __restrict__ R, float* __restrict__ dx, int64_t P,
    int64_t C_out, int64_t C_mid, int64_t C_in) {
  static_assert(TILE_MID == TILE_K, "smem_tile_layout: one K extent for both GEMMs");
  // 128-byte aligned so that the swizzled offsets map to banks as computed above (and 16-byte stores are aligned).
  __shared__ alignas(128) T smem_A[TILE_P * TILE_K];    // g tile, then reused for nothing else
  __shared__ alignas(128) T smem_B[TILE_MID * TILE_K];  // B tile as (mid, out)
  __shared__ alignas(128) T smem_T[TILE_P * TILE_MID];  // t = g·B, the on-chip g_mid tile
  __shared__ alignas(128) T smem_R[TILE_C * TILE_MID];  // R tile as (column, mid)
  Tensor sA = make_tensor(make_smem_ptr(smem_A), smem_tile_layout<TILE_P>());
  Tensor sB = make_tensor(make_smem_ptr(smem_B), smem_tile_layout<TILE_MID>());
  Tensor sT = make_tensor(make_smem_ptr(smem_T), smem_tile_layout<TILE_P>());
  Tensor sR = make_tensor(make_smem_ptr(smem_R), smem_tile_layout<TILE_C>());
  const bool g_vectorized = vectorizable(g, C_out, C_out);
  const bool B_vectorized = vectorizable(B, C_mid, C_mid);
  const bool R_vectorized = vectorizable(R, C_in, C_in);

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
    load_tile_rows<TILE_P>(smem_A, g, p0, k0, P, C_out, C_out, g_vectorized);                // g[p, o]
    load_tile_transposed<TILE_MID>(smem_B, B, m0, k0, C_mid, C_out, C_mid, B_vectorized);  // B[o, mid] as (mid, o)
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
    load_tile_transposed<TILE_C>(smem_R, R, c0, m0, C_in, C_mid, C_in, R_vectorized);  // R[mid, col] as (col, mid)
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
