// CPU update: one parallel loop over the plan's rows, an inner loop per
// (EMA dtype, param dtype) pair that the compiler vectorises.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "ema_math.h"
#include "plan.h"

namespace fused_ema {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kSerialElements = 32768;

// `round` writes each new value (ema_math.h: RoundNearest, or RoundStochastic
// for a bf16 EMA, which takes the element's index in the span).
template <typename ema_t, typename opmath_t, typename param_t, typename Round>
C10_ALWAYS_INLINE void lerp_loop(ema_t* __restrict ema, const param_t* __restrict param,
                                 int64_t n, opmath_t w, Round round) {
  for (int64_t j = 0; j < n; ++j) {
    ema[j] = round.template round<ema_t>(ema_lerp<opmath_t>(static_cast<opmath_t>(ema[j]),
                                                            static_cast<opmath_t>(param[j]), w),
                                         static_cast<uint32_t>(j));
  }
}

template <typename ema_t, typename param_t, typename Round>
C10_ALWAYS_INLINE void lerp_span(ema_t* __restrict ema, const param_t* __restrict param,
                                 int64_t n, typename OpMath<ema_t>::type w, Round round) {
  using opmath_t = typename OpMath<ema_t>::type;
  // ema_lerp's branches are uniform over the span: taken once, here, so each
  // loop is branch-free and vectorises. Weight 0 (decay 1) leaves the EMA as it
  // is: nothing to write. The weight-1 arm passes the constant 1: ema_lerp
  // folds to `param` (a converting copy, whatever the EMA holds).
  if (w == opmath_t(0)) return;
  if (w == opmath_t(1)) {
    lerp_loop(ema, param, n, opmath_t(1), round);
  } else if (w < opmath_t(0.5)) {
    lerp_loop(ema, param, n, w, round);
  } else {
    lerp_loop(ema, param, n, w, round);
  }
}

// K EMAs of one param in one pass: each param element is read once for all of
// them, and the K + 1 streams run side by side (a pass per EMA, over blocks that
// stay in L1, moved the same bytes 15% slower on GPT-2 small with two decays).
template <int K, typename ema_t, typename opmath_t, typename param_t, typename Round>
C10_ALWAYS_INLINE void lerp_loop_multi(ema_t* const* emas, const param_t* __restrict param,
                                       int64_t n, const opmath_t* weights,
                                       const Round* rounds) {
  ema_t* e[K];
  opmath_t w[K];
  Round r[K];
  for (int k = 0; k < K; ++k) {
    e[k] = emas[k];
    w[k] = weights[k];
    r[k] = rounds[k];
  }
#pragma GCC ivdep  // the EMAs and the param never overlap (checked when the plan is built)
  for (int64_t j = 0; j < n; ++j) {
    const opmath_t p = static_cast<opmath_t>(param[j]);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      e[k][j] = r[k].template round<ema_t>(
          ema_lerp_select(static_cast<opmath_t>(e[k][j]), p, w[k]), static_cast<uint32_t>(j));
    }
  }
}

// The EMAs of one param over a span: one EMA through lerp_span (its branches
// taken once), several through one lerp_loop_multi.
template <typename ema_t, typename opmath_t, typename param_t, typename Round>
C10_ALWAYS_INLINE void lerp_span_multi(int num_emas, ema_t* const* emas,
                                       const param_t* __restrict param, int64_t n,
                                       const opmath_t* w, const Round* r) {
  switch (num_emas) {
    case 1: return lerp_span(emas[0], param, n, w[0], r[0]);
    case 2: return lerp_loop_multi<2>(emas, param, n, w, r);
    case 3: return lerp_loop_multi<3>(emas, param, n, w, r);
    case 4: return lerp_loop_multi<4>(emas, param, n, w, r);
    case 5: return lerp_loop_multi<5>(emas, param, n, w, r);
    case 6: return lerp_loop_multi<6>(emas, param, n, w, r);
    case 7: return lerp_loop_multi<7>(emas, param, n, w, r);
    case 8: return lerp_loop_multi<8>(emas, param, n, w, r);
  }
  static_assert(kMaxDecays == 8, "one case per decay count");
}

// What one call updates: rows [first, end) for the EMAs of decays [k_begin, k_end),
// whose params are all param_t and those EMAs all ema_t.
struct RowRange {
  int64_t first, end;
  int k_begin, k_end;
};

// `skey`: step_key(seed, step) when Round is RoundStochastic.
template <typename ema_t, typename param_t, typename Round>
C10_ALWAYS_INLINE void update_rows_body(const Plan& plan, RowRange rr, const double* decays,
                                        uint64_t skey) {
  using opmath_t = typename OpMath<ema_t>::type;
  opmath_t w[kMaxDecays];
  for (int k = rr.k_begin; k < rr.k_end; ++k) w[k] = lerp_weight<opmath_t>(decays[k]);
  const int64_t n = plan.num_tensors;
  for (int64_t r = rr.first; r < rr.end; ++r) {
    const Row& row = plan.rows[r];
    const param_t* param = static_cast<const param_t*>(plan.params[row.tensor].ptr) + row.start;
    ema_t* emas[kMaxDecays];
    Round rounds[kMaxDecays] = {};
    for (int k = rr.k_begin; k < rr.k_end; ++k) {
      emas[k - rr.k_begin] = static_cast<ema_t*>(plan.emas[k * n + row.tensor].ptr) + row.start;
      if constexpr (std::is_same_v<Round, RoundStochastic>) {
        rounds[k - rr.k_begin] = {
            element_key(skey, k * n + row.tensor, static_cast<uint32_t>(row.start >> 32)),
            static_cast<uint32_t>(row.start)};
      }
    }
    lerp_span_multi(rr.k_end - rr.k_begin, emas, param, row.length, w + rr.k_begin, rounds);
  }
}

// The same loop compiled for the baseline x86-64 ISA (16-byte vectors) and
// AVX2 (32-byte), picked at run time as ATen does. Not AVX-512: the update is
// bound by memory, and on the Zen 4 machines of this project's CI the 64-byte
// loop was slower (GPT-2 small fp32, 2 threads: 1.22-1.25x the time of a flat
// add_ against 1.01-1.11x for AVX2, side by side). Built with -ffp-contract=off:
// no fused multiply-adds, so every ISA gives the same bits.
template <typename ema_t, typename param_t, typename Round>
void update_rows_default(const Plan& plan, RowRange rr, const double* decays, uint64_t skey) {
  update_rows_body<ema_t, param_t, Round>(plan, rr, decays, skey);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename ema_t, typename param_t, typename Round>
__attribute__((target("avx2"))) void update_rows_avx2(const Plan& plan, RowRange rr,
                                                      const double* decays, uint64_t skey) {
  update_rows_body<ema_t, param_t, Round>(plan, rr, decays, skey);
}
bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes;
}
#endif

template <typename ema_t, typename param_t, typename Round>
void update_rows_isa(const Plan& plan, RowRange rr, const double* decays, uint64_t skey) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return update_rows_avx2<ema_t, param_t, Round>(plan, rr, decays, skey);
#endif
  update_rows_default<ema_t, param_t, Round>(plan, rr, decays, skey);
}

// The rounding is picked here, once per call: stochastic only exists for bf16
// EMAs (make_update_args refused it for any other).
template <typename ema_t, typename param_t>
void update_rows(const Plan& plan, RowRange rr, const UpdateArgs& args) {
  if constexpr (std::is_same_v<ema_t, c10::BFloat16>) {
    if (args.stochastic) {
      return update_rows_isa<ema_t, param_t, RoundStochastic>(
          plan, rr, args.decays, step_key(args.seed, args.step));
    }
  }
  update_rows_isa<ema_t, param_t, RoundNearest>(plan, rr, args.decays, 0);
}

// A plan that mixes dtypes: one (row, decay) at a time, each with its pair.
void update_mixed_rows(const Plan& plan, int64_t first, int64_t end, const UpdateArgs& args) {
  for (int64_t r = first; r < end; ++r) {
    const int64_t i = plan.rows[r].tensor;
    for (int k = 0; k < plan.num_decays; ++k) {
      dispatch_dtype(plan.params[i].dtype, [&](auto* ptag) {
        using param_t = std::remove_pointer_t<decltype(ptag)>;
        dispatch_dtype(plan.emas[k * plan.num_tensors + i].dtype, [&](auto* etag) {
          using ema_t = std::remove_pointer_t<decltype(etag)>;
          update_rows<ema_t, param_t>(plan, {r, r + 1, k, k + 1}, args);
        });
      });
    }
  }
}

}  // namespace

int64_t ema_cpu_tasks(const Plan& plan) {
  return plan.num_elements < kSerialElements ? 1 : at::get_num_threads();
}

const char* ema_cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  return has_avx2() ? "AVX2" : "SSE2";  // the x86-64 baseline
#else
  return "the compiler's baseline";
#endif
}

void ema_update_cpu(const Plan& plan, const UpdateArgs& args) {
  // make_update_args reads host decay, step and skip tensors into `args`.
  TORCH_INTERNAL_ASSERT(args.decay_ptr == nullptr && args.skip_ptr == nullptr &&
                        args.step_ptr == nullptr);
  const int64_t num_rows = static_cast<int64_t>(plan.rows.size());
  if (num_rows == 0) return;
  const int64_t num_tasks = ema_cpu_tasks(plan);
  // Task t takes the rows that start in its equal share of the elements: a
  // balance by elements, not by rows (small tensors make short rows).
  at::parallel_for(0, num_tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    const auto first_row = [&](int64_t task) {
      const int64_t element = plan.num_elements * task / num_tasks;
      return std::lower_bound(plan.row_offsets.begin(), plan.row_offsets.end(), element) -
             plan.row_offsets.begin();
    };
    const int64_t first = first_row(task_begin);
    const int64_t end = std::min<int64_t>(first_row(task_end), num_rows);
    if (!plan.one_dtype_pair) return update_mixed_rows(plan, first, end, args);
    dispatch_dtype(plan.params[0].dtype, [&](auto* ptag) {
      using param_t = std::remove_pointer_t<decltype(ptag)>;
      dispatch_dtype(plan.emas[0].dtype, [&](auto* etag) {
        using ema_t = std::remove_pointer_t<decltype(etag)>;
        update_rows<ema_t, param_t>(plan, {first, end, 0, plan.num_decays}, args);
      });
    });
  });
}

}  // namespace fused_ema
