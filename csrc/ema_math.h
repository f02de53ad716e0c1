// The per-element EMA update, shared by the CPU loop and the CUDA kernel.
// This is the one place where the formula lives.
#pragma once

#include <c10/macros/Macros.h>

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

}  // namespace fused_ema
