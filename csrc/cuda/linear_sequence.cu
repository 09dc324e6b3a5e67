// Fused sequence-order input gradient of a PFA linear layer on CUDA: dL/dx = (g·B)·R, g·B never in global
// memory. Grid (position tiles, mid-channel chunks); a block forms its tile of g·B in shared memory (fp32
// accumulation, rounded to the input dtype as a stored g_mid would be), multiplies it by R for every column
// tile and adds the result into an fp32 dx with atomics; the mid chunks of a position tile meet there, which is
// where the parallelism comes from when P is small (the case the planner sends to the sequence order).
// Runs on the current stream. fp16/bf16 inputs take the tensor-core kernel built on CuTe
// (linear_sequence_tc.cuh: SM80 MMA atoms, fp32 accumulation); fp32 and fp64 inputs take the kernel below,
// on CUDA cores (FMA), which keeps their products exact to their own precision.

#include "../pfa_ops.h"
#include "linear_sequence_tc.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace pfa_kernels {
namespace {

constexpr int TILE_P = 32;     // positions per block
constexpr int TILE_MID = 32;   // mid channels per block
constexpr int TILE_K = 32;     // C_out chunk staged in shared memory
constexpr int TILE_C = 64;     // dx columns per step
constexpr int THREADS = 256;

template <typename scalar_t, typename acc_t>
__global__ void linear_sequence_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ B,
                                           const scalar_t* __restrict__ R, acc_t* __restrict__ dx, int64_t P,
                                           int64_t C_out, int64_t C_mid, int64_t C_in) {
  __shared__ acc_t g_tile[TILE_P][TILE_K + 1];
  __shared__ acc_t B_tile[TILE_K][TILE_MID + 1];
  __shared__ acc_t t_tile[TILE_P][TILE_MID + 1];
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * TILE_P;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TILE_MID;
  const int tid = threadIdx.x;

  // t = g[p0:p0+TILE_P, :] · B[:, m0:m0+TILE_MID]; each thread owns TILE_P*TILE_MID/THREADS = 4 entries.
  acc_t t_acc[TILE_P * TILE_MID / THREADS] = {};
  for (int64_t k0 = 0; k0 < C_out; k0 += TILE_K) {
    for (int i = tid; i < TILE_P * TILE_K; i += THREADS) {
      const int r = i / TILE_K, k = i % TILE_K;
      const int64_t p = p0 + r, o = k0 + k;
      g_tile[r][k] = (p < P && o < C_out) ? static_cast<acc_t>(g[p * C_out + o]) : acc_t(0);
    }
    for (int i = tid; i < TILE_K * TILE_MID; i += THREADS) {
      const int k = i / TILE_MID, m = i % TILE_MID;
      const int64_t o = k0 + k, mid = m0 + m;
      B_tile[k][m] = (o < C_out && mid < C_mid) ? static_cast<acc_t>(B[o * C_mid + mid]) : acc_t(0);
    }
    __syncthreads();
    for (int e = 0; e < TILE_P * TILE_MID / THREADS; ++e) {
      const int i = tid + e * THREADS, r = i / TILE_MID, m = i % TILE_MID;
      acc_t sum = t_acc[e];
      for (int k = 0; k < TILE_K; ++k) sum += g_tile[r][k] * B_tile[k][m];
      t_acc[e] = sum;
    }
    __syncthreads();
  }
  for (int e = 0; e < TILE_P * TILE_MID / THREADS; ++e) {
    const int i = tid + e * THREADS;
    t_tile[i / TILE_MID][i % TILE_MID] = static_cast<acc_t>(static_cast<scalar_t>(t_acc[e]));
  }
  __syncthreads();

  // dx[p0:, c0:c0+TILE_C] += t · R[m0:m0+TILE_MID, c0:c0+TILE_C]; each thread owns 8 entries per step.
  for (int64_t c0 = 0; c0 < C_in; c0 += TILE_C) {
    for (int e = 0; e < TILE_P * TILE_C / THREADS; ++e) {
      const int i = tid + e * THREADS, r = i / TILE_C, c = i % TILE_C;
      const int64_t p = p0 + r, col = c0 + c;
      if (p >= P || col >= C_in) continue;
      acc_t sum = 0;
      for (int m = 0; m < TILE_MID && m0 + m < C_mid; ++m)
        sum += t_tile[r][m] * static_cast<acc_t>(R[(m0 + m) * C_in + col]);
      atomicAdd(dx + p * C_in + col, sum);
    }
  }
}

}  // namespace

// Which device code nvcc put in this library, as nvcc names it ("sm_80/compute_90/sm_90": SASS for sm_80 and
// sm_90, PTX for compute_90), from TORCH_CUDA_ARCH_LIST (setup.py defines PFA_KERNELS_CUDA_IMAGES).
#define PFA_KERNELS_STRINGIFY_(x) #x
#define PFA_KERNELS_STRINGIFY(x) PFA_KERNELS_STRINGIFY_(x)
std::string cuda_images() {
#ifdef PFA_KERNELS_CUDA_IMAGES
  return PFA_KERNELS_STRINGIFY(PFA_KERNELS_CUDA_IMAGES);
#else
  return "";
#endif
}

at::Tensor linear_sequence_input_grad_cuda(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R) {
  check_linear_sequence_args(grad_output, B, R);
  // Both kernels add their mid-chunk partials into dx with atomics (fp32, or fp64), in whatever order the blocks
  // finish: the rounding differs from run to run. Raised for every call, zero-size ones too, so that a program
  // meets the error on its first call, not on its first non-empty batch.
  at::globalContext().alertNotDeterministic("pfa_kernels::cpp_linear_sequence_input_grad (CUDA)");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  // A grid with a zero dimension does not launch ("invalid configuration argument"): P = 0 or C_mid = 0.
  if (has_empty_operand(grad_output, B, R)) return at::zeros({grad_output.size(0), R.size(1)}, grad_output.options());
  auto g = grad_output.contiguous(), b = B.contiguous(), r = R.contiguous();
  const int64_t P = g.size(0), C_out = g.size(1), C_mid = b.size(1), C_in = r.size(1);
  const bool is_double = g.scalar_type() == at::kDouble;
  auto dx = at::zeros({P, C_in}, g.options().dtype(is_double ? at::kDouble : at::kFloat));
  const dim3 grid((P + TILE_P - 1) / TILE_P, (C_mid + TILE_MID - 1) / TILE_MID);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (g.scalar_type() == at::kHalf || g.scalar_type() == at::kBFloat16) {
    const dim3 tc_grid((P + tc::TILE_P - 1) / tc::TILE_P, (C_mid + tc::TILE_MID - 1) / tc::TILE_MID);
    if (g.scalar_type() == at::kHalf) {
      using T = cute::half_t;  // the same 16 bits as at::Half
      tc::linear_sequence_tc_bwd_kernel<T><<<tc_grid, tc::THREADS, 0, stream>>>(
          reinterpret_cast<const T*>(g.data_ptr()), reinterpret_cast<const T*>(b.data_ptr()),
          reinterpret_cast<const T*>(r.data_ptr()), dx.data_ptr<float>(), P, C_out, C_mid, C_in);
    } else {
      using T = cute::bfloat16_t;  // the same 16 bits as at::BFloat16
      tc::linear_sequence_tc_bwd_kernel<T><<<tc_grid, tc::THREADS, 0, stream>>>(
          reinterpret_cast<const T*>(g.data_ptr()), reinterpret_cast<const T*>(b.data_ptr()),
          reinterpret_cast<const T*>(r.data_ptr()), dx.data_ptr<float>(), P, C_out, C_mid, C_in);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return dx.to(g.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "linear_sequence_input_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    linear_sequence_bwd_kernel<scalar_t, acc_t><<<grid, THREADS, 0, stream>>>(
        g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), dx.data_ptr<acc_t>(), P, C_out,
        C_mid, C_in);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx.to(g.scalar_type());
}

namespace {

// The CUDA kernels of the ATen-composite ops run with the current device set to their tensors' (grad_output's; B's
// for the feedback product), as ATen's native CUDA ops do: a layer on cuda:1 then never touches the current
// device, whatever it is. The ops' own device checks raise first when a tensor is elsewhere (a CPU grad_output
// with CUDA weights reaches the CUDA kernel too), so the guard is set only for a CUDA anchor.
std::optional<c10::Device> cuda_device_of(const at::Tensor& anchor) {
  return anchor.is_cuda() ? std::optional<c10::Device>(anchor.device()) : std::nullopt;
}

at::Tensor feedback_product_cuda(const at::Tensor& B, const at::Tensor& R, int64_t groups) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(B));
  return feedback_product(B, R, groups);
}

Grads linear_backward_cuda(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& B, const at::Tensor& R, const std::string& input_order,
                           const std::string& feedback_order, std::array<bool, 4> output_mask) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(grad_output));
  return linear_backward(grad_output, x, weight, B, R, input_order, feedback_order, output_mask);
}

Grads conv_backward_cuda(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& B, const at::Tensor& R, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, const std::string& input_order,
                         const std::string& feedback_order, std::array<bool, 4> output_mask) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(grad_output));
  return conv_backward(grad_output, x, weight, B, R, stride, padding, dilation, groups, input_order, feedback_order,
                       output_mask);
}

}  // namespace
}  // namespace pfa_kernels

TORCH_LIBRARY_IMPL(pfa_kernels, CUDA, m) {
  m.impl("cpp_feedback_product", &pfa_kernels::feedback_product_cuda);
  m.impl("cpp_linear_backward", &pfa_kernels::linear_backward_cuda);
  m.impl("cpp_conv_backward", &pfa_kernels::conv_backward_cuda);
  m.impl("cpp_linear_sequence_input_grad", &pfa_kernels::linear_sequence_input_grad_cuda);
}
