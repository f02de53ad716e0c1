// CPU update: one parallel loop over the plan's rows, an inner loop per
// (EMA dtype, param dtype) pair that the compiler vectorises.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ema_math.h"
#include "plan.h"

namespace fused_ema {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kSerialElements = 32768;
// With several decays a row is walked in blocks small enough that the param
// block read for the first EMA is still in L1 for the others.
constexpr int64_t kBlock = 4096;

template <typename ema_t, typename opmath_t, typename param_t>
C10_ALWAYS_INLINE void lerp_loop(ema_t* __restrict ema, const param_t* __restrict param,
                                 int64_t n, opmath_t w) {
  for (int64_t j = 0; j < n; ++j) {
    ema[j] = static_cast<ema_t>(ema_lerp<opmath_t>(static_cast<opmath_t>(ema[j]),
                                                   static_cast<opmath_t>(param[j]), w));
  }
}

template <typename ema_t, typename param_t>
C10_ALWAYS_INLINE void lerp_span_body(ema_t* __restrict ema, const param_t* __restrict param,
                                      int64_t n, double decay) {
  using opmath_t = typename OpMath<ema_t>::type;
  const opmath_t w = lerp_weight<opmath_t>(decay);
  // ema_lerp's branches are uniform over the span: taken once, here, so each
  // loop is branch-free and vectorises. The weight-1 arm passes the constant 1:
  // ema_lerp folds to `param` (a converting copy, whatever the EMA holds).
  if (w == opmath_t(1)) {
    lerp_loop(ema, param, n, opmath_t(1));
  } else if (w < opmath_t(0.5)) {
    lerp_loop(ema, param, n, w);
  } else {
    lerp_loop(ema, param, n, w);
  }
}

// The same loop compiled for the baseline x86-64 ISA (16-byte vectors), AVX2
// (32-byte) and AVX-512 (64-byte), picked at run time as ATen does. Built with
// -ffp-contract=off: no fused multiply-adds, so every ISA gives the same bits.
template <typename ema_t, typename param_t>
void lerp_span_default(ema_t* ema, const param_t* param, int64_t n, double decay) {
  lerp_span_body(ema, param, n, decay);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename ema_t, typename param_t>
__attribute__((target("avx2"))) void lerp_span_avx2(ema_t* ema, const param_t* param, int64_t n,
                                                    double decay) {
  lerp_span_body(ema, param, n, decay);
}
template <typename ema_t, typename param_t>
__attribute__((target("avx512f,avx512bw,avx512vl,prefer-vector-width=512"))) void lerp_span_avx512(
    ema_t* ema, const param_t* param, int64_t n, double decay) {
  lerp_span_body(ema, param, n, decay);
}
bool has_avx512() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") &&
                                                     __builtin_cpu_supports("avx512bw") &&
                                                     __builtin_cpu_supports("avx512vl"));
  return yes;
}
bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes;
}
#endif

template <typename ema_t, typename param_t>
void lerp_span(ema_t* ema, const param_t* param, int64_t n, double decay) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx512()) return lerp_span_avx512(ema, param, n, decay);
  if (has_avx2()) return lerp_span_avx2(ema, param, n, decay);
#endif
  lerp_span_default(ema, param, n, decay);
}

void update_row(const Plan& plan, const Row& row, const double* decays) {
  const ParamSlot& ps = plan.params[row.tensor];
  dispatch_dtype(ps.dtype, [&](auto* ptag) {
    using param_t = std::remove_pointer_t<decltype(ptag)>;
    const param_t* param = static_cast<const param_t*>(ps.ptr) + row.start;
    const int64_t block = plan.num_decays == 1 ? row.length : kBlock;
    for (int64_t off = 0; off < row.length; off += block) {
      const int64_t n = std::min<int64_t>(block, row.length - off);
      for (int k = 0; k < plan.num_decays; ++k) {
        const EmaSlot& es = plan.emas[k * plan.num_tensors + row.tensor];
        dispatch_dtype(es.dtype, [&](auto* etag) {
          using ema_t = std::remove_pointer_t<decltype(etag)>;
          lerp_span(static_cast<ema_t*>(es.ptr) + row.start + off, param + off, n, decays[k]);
        });
      }
    }
  });
}

}  // namespace

void ema_update_cpu(const Plan& plan, const UpdateArgs& args) {
  // make_update_args reads host decay tensors and skip flags into `args`.
  TORCH_INTERNAL_ASSERT(args.decay_ptr == nullptr && args.skip_ptr == nullptr);
  const int64_t num_rows = static_cast<int64_t>(plan.rows.size());
  const int64_t num_tasks = plan.num_elements < kSerialElements ? 1 : at::get_num_threads();
  // Task t takes the rows that start in its equal share of the elements: a
  // balance by elements, not by rows (small tensors make short rows).
  at::parallel_for(0, num_tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    const auto first_row = [&](int64_t task) {
      const int64_t element = plan.num_elements * task / num_tasks;
      return std::lower_bound(plan.row_offsets.begin(), plan.row_offsets.end(), element) -
             plan.row_offsets.begin();
    };
    const int64_t end = std::min<int64_t>(first_row(task_end), num_rows);
    for (int64_t r = first_row(task_begin); r < end; ++r) {
      update_row(plan, plan.rows[r], args.decays);
    }
  });
}

}  // namespace fused_ema
