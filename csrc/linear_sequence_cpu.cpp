// Fused sequence-order input gradient of a PFA linear layer on CPU: dL/dx = (g·B)·R without writing g·B.
//
// dx (P, C_in) is cut into (row block x column block) tiles, one OpenMP task each. A task walks C_mid in
// chunks of MID_CHUNK: it forms the (ROWS x MID_CHUNK) tile t = g[rows]·B[:, chunk] in a stack buffer
// (2 KB in float: it stays in L1), then adds t·R[chunk, cols] to its dx tile. Column blocks recompute t;
// there are only as many as threads, so the extra work is (threads - 1) x P·C_out·C_mid at most.
//
// Deterministic, bit for bit, for any thread count: each dx element belongs to one task, which sums it over
// C_mid in a fixed order (chunks of MID_CHUNK, then m within a chunk) from a g·B tile that depends on its rows
// alone. The thread count changes how columns are split into tasks, never the order of any sum; no atomics, no
// reduction across threads. So it raises nothing under torch.use_deterministic_algorithms(True), unlike the CUDA
// kernels (tests/test_cpp_determinism.py compares 1, 2, 3 and 5 threads).

#include "pfa_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace pfa_kernels {
namespace {

constexpr int64_t ROWS = 8;
constexpr int64_t MID_CHUNK = 64;

template <typename scalar_t>
void linear_sequence_kernel(const scalar_t* g, const scalar_t* B, const scalar_t* R, scalar_t* dx, int64_t P,
                            int64_t C_out, int64_t C_mid, int64_t C_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_blocks = (P + ROWS - 1) / ROWS;
  // Enough column blocks to feed every thread when there are few rows (the case the planner picks this for).
  const int64_t col_blocks = std::min<int64_t>(C_in, std::max<int64_t>(1, (threads + row_blocks - 1) / row_blocks));
  const int64_t col_width = (C_in + col_blocks - 1) / col_blocks;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t t[ROWS * MID_CHUNK];
    std::vector<acc_t> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = (task / col_blocks) * ROWS, rows = std::min(ROWS, P - r0);
      const int64_t c0 = (task % col_blocks) * col_width, cols = std::min(col_width, C_in - c0);
      if (cols <= 0) continue;
      acc.assign(rows * cols, acc_t(0));
      for (int64_t m0 = 0; m0 < C_mid; m0 += MID_CHUNK) {
        const int64_t mids = std::min(MID_CHUNK, C_mid - m0);
        std::fill(t, t + rows * MID_CHUNK, acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* g_row = g + (r0 + r) * C_out;
          acc_t* t_row = t + r * MID_CHUNK;
          for (int64_t o = 0; o < C_out; ++o) {
            const acc_t gv = static_cast<acc_t>(g_row[o]);
            const scalar_t* B_row = B + o * C_mid + m0;
            for (int64_t m = 0; m < mids; ++m) t_row[m] += gv * static_cast<acc_t>(B_row[m]);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* acc_row = acc.data() + r * cols;
          for (int64_t m = 0; m < mids; ++m) {
            // g·B rounded to the input dtype, as a stored g_mid would be (a no-op for float/double).
            const acc_t tv = static_cast<acc_t>(static_cast<scalar_t>(t[r * MID_CHUNK + m]));
            const scalar_t* R_row = R + (m0 + m) * C_in + c0;
            for (int64_t c = 0; c < cols; ++c) acc_row[c] += tv * static_cast<acc_t>(R_row[c]);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dx[(r0 + r) * C_in + c0 + c] = static_cast<scalar_t>(acc[r * cols + c]);
    }
  });
}

}  // namespace

at::Tensor linear_sequence_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& B, const at::Tensor& R) {
  check_linear_sequence_args(grad_output, B, R);
  // The kernel divides by its row and column block counts: P = 0 or C_in = 0 must not reach it.
  if (has_empty_operand(grad_output, B, R)) return at::zeros({grad_output.size(0), R.size(1)}, grad_output.options());
  auto g = grad_output.contiguous(), b = B.contiguous(), r = R.contiguous();
  auto dx = at::empty({g.size(0), r.size(1)}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "linear_sequence_input_grad_cpu", [&] {
    linear_sequence_kernel<scalar_t>(g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                                     dx.data_ptr<scalar_t>(), g.size(0), g.size(1), b.size(1), r.size(1));
  });
  return dx;
}

}  // namespace pfa_kernels
