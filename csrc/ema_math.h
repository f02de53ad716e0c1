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

// ema <- lerp(ema, param, weight) with weight = 1 - decay, in torch.lerp's form.
// Both branches are exact at their end: weight == 0 (decay 1) returns `ema`
// unchanged, weight == 1 (decay 0) returns `param` exactly.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T ema_lerp(T ema, T param, T weight) {
  const T diff = param - ema;
  return (weight < T(0.5)) ? ema + weight * diff
                           : param - diff * (T(1) - weight);
}

// The lerp weight for a decay, rounded once from double to the update's type:
// the value `torch.lerp(ema, param, 1 - decay)` sees for a Python float decay.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T lerp_weight(double decay) {
  return static_cast<T>(1.0 - decay);
}

}  // namespace fused_ema
