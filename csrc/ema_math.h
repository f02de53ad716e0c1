// The per-element EMA update, shared by the CPU loop and the CUDA kernel.
// This is the one place where the formula lives.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>

#include <cstdint>
#include <type_traits>

namespace fused_ema {

// Arithmetic type of the update: float for 16/32-bit EMAs, double for fp64 EMAs
// (the same "opmath" rule as ATen).
template <typename ema_t>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

// One numeric contract on every device: each multiply, add and subtract of the
// update is rounded on its own, never fused into an FMA. Host code gets this
// from -ffp-contract=off (setup.py); in CUDA device code the _rn intrinsics are
// never contracted, whatever nvcc's --fmad setting, so CPU and CUDA give the
// same bits. The update is memory-bound: the FMA would save nothing.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#else
template <typename T>
C10_ALWAYS_INLINE T add_rn(T a, T b) { return a + b; }
template <typename T>
C10_ALWAYS_INLINE T sub_rn(T a, T b) { return a - b; }
template <typename T>
C10_ALWAYS_INLINE T mul_rn(T a, T b) { return a * b; }
#endif

// ema <- lerp(ema, param, weight) with weight = 1 - decay, in torch.lerp's form,
// with its two ends exact: weight == 1 (decay 0, the "copy" of frozen tensors,
// buffers and the steps before update_after_step) returns `param` and weight
// == 0 (decay 1, a frozen average) returns `ema`, whatever they hold. The lerp
// formula would give param - (param - ema) * 0 and ema + 0 * (param - ema):
// NaN whenever the other side is NaN or +-inf, and +0.0 for an EMA of -0.0.
// Callers with a uniform weight test the ends and weight < 0.5 once, outside
// their loops (ema_cpu.cpp, ema_kernel.cuh), so the comparisons here fold away.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T ema_lerp(T ema, T param, T weight) {
  if (weight == T(1)) return param;
  if (weight == T(0)) return ema;
  const T diff = sub_rn(param, ema);
  return (weight < T(0.5)) ? add_rn(ema, mul_rn(weight, diff))
                           : sub_rn(param, mul_rn(diff, sub_rn(T(1), weight)));
}

// ema_lerp for a loop that applies several weights to each element: both arms
// are computed and one is selected, so the loop has no branch and vectorises
// over the elements. The same operations as ema_lerp: the same bits.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T ema_lerp_select(T ema, T param, T weight) {
  const T diff = sub_rn(param, ema);
  const T low = add_rn(ema, mul_rn(weight, diff));
  const T high = sub_rn(param, mul_rn(diff, sub_rn(T(1), weight)));
  const T lerp = weight < T(0.5) ? low : high;
  const T kept = weight == T(0) ? ema : lerp;
  return weight == T(1) ? param : kept;
}

// The lerp weight for a decay, rounded once from double to the update's type:
// the value `torch.lerp(ema, param, 1 - decay)` sees for a Python float decay.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T lerp_weight(double decay) {
  return static_cast<T>(1.0 - decay);
}


// ---- Stochastic rounding of a bfloat16 EMA ----------------------------------
// A bf16 EMA rounded to nearest stops moving once (1 - decay) * (param - ema)
// is below half its ulp: at decay 0.999 that is any change under ~2^-9 of the
// value. Rounded stochastically it moves by the right amount on average.
//
// The random bits are a pure function of (seed, step, tensor, element), so the
// CPU kernel, the CUDA kernels and the fallback give the same bits, a resumed
// run continues bit for bit, and a CUDA graph replays them (the step read from
// the device). A key per (tensor, 2^32-element block) comes from splitmix64's
// finaliser chained over the inputs (once per row); the element's 32 bits come
// from one keyed 32-bit mix (Wellons' lowbias32: two multiplies, three
// xor-shifts), cheap enough to vectorise on the CPU.

C10_HOST_DEVICE C10_ALWAYS_INLINE uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= UINT64_C(0xbf58476d1ce4e5b9);
  x ^= x >> 27;
  x *= UINT64_C(0x94d049bb133111eb);
  return x ^ (x >> 31);
}

// The part of the key that one update shares: (seed, step).
C10_HOST_DEVICE C10_ALWAYS_INLINE uint64_t step_key(uint64_t seed, int64_t step) {
  return mix64(mix64(seed + UINT64_C(0x9e3779b97f4a7c15)) ^ static_cast<uint64_t>(step));
}

// The key of elements [hi * 2^32, (hi + 1) * 2^32) of tensor `tensor` (emas[k][i]
// is tensor k * num_tensors + i) in that update.
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t element_key(uint64_t step_key, int64_t tensor,
                                                       uint32_t hi) {
  return static_cast<uint32_t>(mix64(mix64(step_key ^ static_cast<uint64_t>(tensor)) ^ hi));
}

// 32 random bits for element `lo` (its index modulo 2^32) under `key`.
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t random_bits(uint32_t key, uint32_t lo) {
  uint32_t x = lo ^ key;
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}

// `value` rounded to bf16 up or down in magnitude, up with probability equal to
// the dropped fraction of an ulp: the top 16 random bits are added below the
// kept bits and the sum truncated (exact values stay exact; past the largest
// finite bf16 the sum carries into inf, as round-to-nearest would). NaN gives
// the canonical NaN: adding to a NaN's payload could carry into the sign bit.
C10_HOST_DEVICE C10_ALWAYS_INLINE c10::BFloat16 round_bf16_stochastic(float value,
                                                                      uint32_t random) {
  uint32_t bits = c10::bit_cast<uint32_t>(value);
  const bool nan = (bits & 0x7fffffffU) > 0x7f800000U;
  bits = nan ? 0x7fc00000U : bits + (random >> 16);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// How an update writes the new EMA value (computed in opmath_t): to nearest, as
// static_cast does, or, for a bf16 EMA, stochastically with the bits of element
// `first + j` under `key` (j: the element's index in the span being updated).
struct RoundNearest {
  template <typename ema_t, typename T>
  C10_HOST_DEVICE C10_ALWAYS_INLINE ema_t round(T value, uint32_t /*j*/) const {
    return static_cast<ema_t>(value);
  }
};
struct RoundStochastic {
  uint32_t key;
  uint32_t first;
  template <typename ema_t, typename T>
  C10_HOST_DEVICE C10_ALWAYS_INLINE ema_t round(T value, uint32_t j) const {
    static_assert(std::is_same_v<ema_t, c10::BFloat16> && std::is_same_v<T, float>,
                  "stochastic rounding is for bf16 EMAs");
    return round_bf16_stochastic(value, random_bits(key, first + j));
  }
};

}  // namespace fused_ema
