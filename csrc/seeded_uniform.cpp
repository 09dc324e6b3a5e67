// torch's CPU uniform_ into a float64 tensor, value for value, leaving the generator where uniform_ leaves it, at a
// quarter of its time: a seeded layer's B and R_0 are drawn this way (pfa_kernels/uniform_draw.py), 547 M values for a
// ResNet-50 at r = 10, 2.3 s of its 10 s conversion with uniform_ (4.2 ns a value, warm) against 0.55 s here (1.0 ns).
//
// uniform_ asks its generator for each value separately (a virtual call, two steps of the engine's mt19937); here the
// engine's state words are twisted 624 at a time and tempered and converted in vectorizable loops. The arithmetic is
// uniform_'s (ATen/native/cpu/DistributionTemplates.h, ATen/core/TransformationHelper.h): two 32-bit words w1, w2
// make u = ((w1 << 32) | w2) & (2^53 - 1), x = u / 2^53, value = x (high - low) + low, and high itself becomes low.
// Whether that multiply-add is fused depends on how torch's kernel was compiled for this CPU (its AVX2 and AVX-512
// kernels fuse it), so each variant below is one choice, and uniform_draw.py uses the first one that reproduces
// uniform_ on this machine, or uniform_ itself: a wrong variant costs time, never a different B.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "python_functions.h"

namespace pfa_kernels {
namespace {

constexpr int STATE_WORDS = at::MERSENNE_STATE_N;  // 624
constexpr int SHIFT = at::MERSENNE_STATE_M;        // 397

// The engine's next_state, in two loops the compiler vectorizes: the first reads only words it has not yet written
// (distance +1 and +397), the second words it wrote 227 places before.
__attribute__((always_inline)) inline uint32_t twisted(uint32_t word, uint32_t following, uint32_t shifted) {
  const uint32_t mixed = (word & at::UMASK) | (following & at::LMASK);
  return shifted ^ (mixed >> 1) ^ ((0u - (following & 1u)) & at::MATRIX_A);
}

__attribute__((always_inline)) inline void twist(uint32_t* state) {
  for (int i = 0; i < STATE_WORDS - SHIFT; ++i) state[i] = twisted(state[i], state[i + 1], state[i + SHIFT]);
  for (int i = STATE_WORDS - SHIFT; i < STATE_WORDS - 1; ++i) {
    state[i] = twisted(state[i], state[i + 1], state[i + SHIFT - STATE_WORDS]);
  }
  state[STATE_WORDS - 1] = twisted(state[STATE_WORDS - 1], state[0], state[SHIFT - 1]);
}

__attribute__((always_inline)) inline void temper(const uint32_t* __restrict state, uint32_t* __restrict words,
                                                  int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t y = state[i];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    words[i] = y;
  }
}

// x = u / 2^53 as two exact int32 -> double conversions (vectorizable without AVX-512's uint64 conversion): the
// high word's low 21 bits times 2^-21 plus the low word times 2^-53, a sum below 1 with at most 53 significant bits.
template <bool FUSED, typename Value>
__attribute__((always_inline)) inline void to_values(const uint32_t* __restrict words, Value* __restrict out,
                                                     int64_t count, double low, double high) {
  const double range = high - low;
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t high_bits = words[2 * i] & 0x1fffffu, low_bits = words[2 * i + 1];
    const double x = double(int32_t(high_bits)) * 0x1p-21 +
                     (double(int32_t(low_bits ^ 0x80000000u)) + 2147483648.0) * 0x1p-53;
    double value = FUSED ? __builtin_fma(x, range, low) : x * range + low;  // (-ffp-contract=off: as written)
    value = value == high ? low : value;
    out[i] = Value(value);  // float32: uniform_'s float64 value rounded, as a copy_ would round it
  }
}

// The engine's pod as its operator() reads it: left_ - 1 words remain from state_[next_] on before the next twist.
template <bool FUSED, typename Value>
__attribute__((always_inline)) inline void fill(at::mt19937_data_pod& pod, Value* out, int64_t count, double low,
                                                double high) {
  constexpr int64_t PIECE = 2048;  // values per piece: 4096 words (16 KB) in L1 between tempering and converting
  alignas(64) uint32_t words[2 * PIECE];
  uint32_t* state = pod.state_.data();
  int64_t available = pod.left_ - 1, next = pod.next_;
  TORCH_CHECK(available >= 0 && next + available <= STATE_WORDS,
              "seeded_uniform_: the generator's state is not one torch's mt19937 reaches (left ", pod.left_,
              ", next ", pod.next_, ")");
  for (int64_t start = 0; start < count; start += PIECE) {
    const int64_t values = std::min(PIECE, count - start);
    for (int64_t got = 0; got < 2 * values;) {
      if (available == 0) {
        twist(state);
        next = 0;
        available = STATE_WORDS;
      }
      const int64_t take = std::min(available, 2 * values - got);
      temper(state + next, words + got, take);
      next += take, available -= take, got += take;
    }
    to_values<FUSED>(words, out + start, values, low, high);
  }
  pod.left_ = int(available + 1);
  pod.next_ = uint32_t(next);
}

#if defined(__x86_64__)  // (GCC elsewhere refuses an x86 target attribute: the baseline alone is built there)
template <typename Value>
__attribute__((target("avx2,fma"))) void fill_avx2_fused(at::mt19937_data_pod& pod, Value* out, int64_t count,
                                                         double low, double high) {
  fill<true>(pod, out, count, low, high);
}

template <typename Value>
__attribute__((target("avx2"))) void fill_avx2(at::mt19937_data_pod& pod, Value* out, int64_t count, double low,
                                               double high) {
  fill<false>(pod, out, count, low, high);
}
#endif

template <typename Value>
void fill_baseline(at::mt19937_data_pod& pod, Value* out, int64_t count, double low, double high) {
  fill<false>(pod, out, count, low, high);
}

template <typename Value>
void fill_variant(const std::string& variant, at::mt19937_data_pod& pod, Value* out, int64_t count, double low,
                  double high) {
#if defined(__x86_64__)
  if (variant == "avx2+fma") return fill_avx2_fused(pod, out, count, low, high);
  if (variant == "avx2") return fill_avx2(pod, out, count, low, high);
#endif
  fill_baseline(pod, out, count, low, high);
}

}  // namespace

std::vector<std::string> seeded_uniform_variants() {
  std::vector<std::string> variants;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) variants.push_back("avx2+fma");
  if (__builtin_cpu_supports("avx2")) variants.push_back("avx2");
#endif
  variants.push_back("baseline");
  return variants;
}

void seeded_uniform_(at::Tensor& out, double low, double high, const at::Generator& generator,
                     const std::string& variant) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() &&
                  (out.scalar_type() == at::kDouble || out.scalar_type() == at::kFloat),
              "seeded_uniform_: out must be a contiguous CPU float64 or float32 tensor, got ", out.scalar_type(),
              " on ", out.device());
  // uniform_'s own checks: finite bounds whose difference is a finite double.
  TORCH_CHECK(std::isfinite(low) && std::isfinite(high) && low <= high &&
                  high - low <= std::numeric_limits<double>::max(),
              "seeded_uniform_: low (", low, ") and high (", high, ") must be finite, low <= high, with a finite "
              "difference");
  const auto variants = seeded_uniform_variants();
  TORCH_CHECK(std::find(variants.begin(), variants.end(), variant) != variants.end(),
              "seeded_uniform_: variant '", variant, "' does not run on this CPU");
  auto* cpu_generator = at::check_generator<at::CPUGeneratorImpl>(generator);
  std::lock_guard<std::mutex> lock(cpu_generator->mutex_);
  at::mt19937 engine = cpu_generator->engine();
  at::mt19937_data_pod pod = engine.data();
  if (out.scalar_type() == at::kDouble) {
    fill_variant(variant, pod, out.data_ptr<double>(), out.numel(), low, high);
  } else {
    fill_variant(variant, pod, out.data_ptr<float>(), out.numel(), low, high);
  }
  engine.set_data(pod);
  cpu_generator->set_engine(engine);
  out.unsafeGetTensorImpl()->bump_version();  // an in-place write, as uniform_'s: autograd's saved-tensor check
}

}  // namespace pfa_kernels
