// The CUDA kernel's device code: one launch over the plan's rows, whatever the
// tensor count. Kept apart from the host code (ema_cuda.cu) so the same source
// can be compiled by nvcc for the GPU and, with a shim for the CUDA built-ins
// (tests/emulation/), as host C++ for the tests that execute it on the CPU.
//
// Work split: the unit of work is one warp on one segment (kSegment elements)
// of a row, so short rows (biases, norms) take a warp each, several per block,
// and a large tensor is spread over many SMs (a 65536-element row is 64
// segments). Warps take segments grid-stride, segment-major: first segment 0 of
// every row, then segment 1, ... Each lane moves one pack per step: 16 bytes of
// the wider of param and EMA (one 16-byte load or store; 8 or 4 bytes of the
// narrower one), so every warp access is contiguous: 512 bytes of the wider
// array, 256 or 128 of the narrower one. Elements before the first
// index where every array of the row is aligned for its pack, and after the
// last full pack, are done one at a time. Dtypes are read per row (uniform
// within a warp), so a model that mixes dtypes is still one launch. Decays and
// the skip flag come from the kernel's arguments or, when given as tensors,
// are read on the device: no host sync, graph-capturable.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#include "ema_math.h"
#include "plan.h"

namespace fused_ema {
namespace kernel {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// 8 blocks of 256 threads fill an SM (2048 threads): ptxas fits each
// fixed-dtype kernel in 32 registers. The mixed-dtype kernel gets 64 (half).
constexpr int kMinBlocksPerSM = 8;
constexpr int kMixedMinBlocksPerSM = 4;
constexpr int kSegment = 1024;  // elements of a row per warp work item
constexpr int kSegmentsPerRow = static_cast<int>(kChunk / kSegment);
static_assert(kChunk % kSegment == 0, "a row must be whole segments");

constexpr int pack_bytes(int elements, int size) { return elements * size; }
constexpr int pack_align(int elements, int size) {
  return pack_bytes(elements, size) < 16 ? pack_bytes(elements, size) : 16;
}

// N elements moved together: one 16-byte access when N * sizeof(T) == 16,
// several adjacent ones when wider.
template <typename T, int N>
struct alignas(pack_align(N, sizeof(T))) Pack {
  T v[N];
};

// Elements per pack when param_t meets ema_t: 16 bytes of the wider one, so
// every access of a warp is contiguous (the narrower array moves 8 or 4 bytes
// per lane, 256 or 128 contiguous bytes per warp).
template <typename param_t, typename ema_t>
constexpr int pack_elements() {
  return 16 / (sizeof(param_t) > sizeof(ema_t) ? sizeof(param_t) : sizeof(ema_t));
}

// With several decays the EMA dtypes are known only per row: 4 elements per
// pack (16 bytes of an fp32 EMA or param), 2 for an fp64 param; an fp64 EMA
// of a narrower param takes two 16-byte accesses.
template <typename param_t>
constexpr int pack_elements_many() {
  return sizeof(param_t) == 8 ? 2 : 4;
}

template <typename ema_t>
using opmath_t = typename OpMath<ema_t>::type;

// `round` writes the new value (ema_math.h: RoundNearest, or RoundStochastic
// for a bf16 EMA, which takes the element's index `idx` in the row).
template <typename ema_t, typename param_t, typename Round>
__device__ __forceinline__ void update_one(ema_t* e, param_t p, opmath_t<ema_t> w, Round round,
                                           int idx) {
  using T = opmath_t<ema_t>;
  *e = round.template round<ema_t>(ema_lerp<T>(static_cast<T>(*e), static_cast<T>(p), w),
                                   static_cast<uint32_t>(idx));
}

// `p` is a register copy, loaded before the EMA is touched: a reference to
// global memory would make the compiler re-read it element by element after
// every store (it cannot prove that param and EMA do not alias). The EMA side
// goes 16 bytes at a time (or all of it when narrower): with several decays,
// an fp64 EMA of a 16-bit or fp32 param takes two 16-byte accesses.
template <int N, typename ema_t, typename param_t, typename Round>
__device__ __forceinline__ void update_pack(ema_t* e, const Pack<param_t, N> p,
                                            opmath_t<ema_t> w, Round round, int idx) {
  using T = opmath_t<ema_t>;
  constexpr int kPiece = (N * sizeof(ema_t) > 16) ? 16 / sizeof(ema_t) : N;
#pragma unroll
  for (int i = 0; i < N; i += kPiece) {
    Pack<ema_t, kPiece> ev = *reinterpret_cast<const Pack<ema_t, kPiece>*>(e + i);
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {
      ev.v[j] = round.template round<ema_t>(
          ema_lerp<T>(static_cast<T>(ev.v[j]), static_cast<T>(p.v[i + j]), w),
          static_cast<uint32_t>(idx + i + j));
    }
    *reinterpret_cast<Pack<ema_t, kPiece>*>(e + i) = ev;
  }
}

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// The tensors' pointers come from the plan's table, so nvcc cannot tell that
// they are global memory and would emit generic LD/ST; this tells it.
template <typename T>
__device__ __forceinline__ T* global_ptr(T* p) {
#ifdef __CUDA_ARCH__
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

__device__ __forceinline__ int smaller(int a, int b) { return a < b ? a : b; }

// Index of the first element of `p` (elements of `size` bytes) that is aligned
// to `alignment`, counted modulo alignment / size; -1 if none ever is.
__device__ __forceinline__ int align_offset(const void* p, int size, int alignment) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(p) & (alignment - 1));
  if (misalign % size != 0) return -1;
  return ((alignment - misalign) & (alignment - 1)) / size;
}

// How a row splits: packs of N elements over [head, tail), single elements in
// [0, head) and [tail, length). `head` is the first index where every array of
// the row is aligned for its pack; stepping by N keeps them aligned. If no such
// index exists (or it is past the end), head == tail == length and the whole
// row goes one at a time.
struct RowSplit {
  int head, num_packs, tail, length;
  __device__ __forceinline__ int num_single() const { return head + (length - tail); }
  // Index of the s-th single element: the head ones, then the tail ones.
  __device__ __forceinline__ int single_index(int s) const {
    return s < head ? s : tail + (s - head);
  }
};

__device__ __forceinline__ RowSplit make_split(int head, int length, int n) {
  const int num_packs = (length - head) / n;
  return {head, num_packs, head + num_packs * n, length};
}

// A warp's share of a row: segment `seg` of its packs (kSegment / N packs) and
// of its single elements (kSegment of them: a misaligned row is all singles).
// `pack(idx)` and `single(idx)` update the pack at element idx and element idx.
template <int N, typename PackFn, typename SingleFn>
__device__ __forceinline__ void for_segment(const RowSplit& split, int seg, int lane,
                                            PackFn&& pack, SingleFn&& single) {
  constexpr int kPacksPerSegment = kSegment / N;
  const int pack_end = smaller(split.num_packs, (seg + 1) * kPacksPerSegment);
  // Not unrolled: one pack in flight per thread is enough at full occupancy,
  // and unrolling would cost the registers that full occupancy needs.
#pragma unroll 1
  for (int v = seg * kPacksPerSegment + lane; v < pack_end; v += kWarpSize) {
    pack(split.head + v * N);
  }
  const int single_end = smaller(split.num_single(), (seg + 1) * kSegment);
#pragma unroll 1
  for (int s = seg * kSegment + lane; s < single_end; s += kWarpSize) {
    single(split.single_index(s));
  }
}

// One decay (the common case): both types known, everything in registers.
template <typename param_t, typename ema_t, typename Round>
__device__ void update_segment_one(const param_t* param, ema_t* ema, int length, int seg,
                                   int lane, opmath_t<ema_t> w, Round round) {
  constexpr int N = pack_elements<param_t, ema_t>();
  // Both arrays' packs are N * size <= 16 bytes, aligned to their size, so
  // each array's alignment repeats every N elements: the row's head is their
  // common offset, if they have one.
  const int hp = align_offset(param, sizeof(param_t), N * sizeof(param_t));
  const int he = align_offset(ema, sizeof(ema_t), N * sizeof(ema_t));
  const int head = hp >= 0 && hp == he ? smaller(hp, length) : length;
  const RowSplit split = make_split(head, length, N);
  // ema_lerp's branches (weight == 0 or 1, weight < 0.5) are uniform: taken
  // here, once, so that each loop body is straight-line code (a branch inside
  // it would keep a whole unpacked pack live across it, past the 32 registers).
  // In each arm the compiler folds the comparisons inside ema_lerp; weight 0
  // leaves the EMA as it is (nothing to write); the weight-1 arm gets the
  // constant 1, so it is a plain converting copy.
  const auto run = [&](opmath_t<ema_t> wt) {
    for_segment<N>(
        split, seg, lane,
        [&](int idx) { update_pack<N>(ema + idx, load_pack<N>(param + idx), wt, round, idx); },
        [&](int idx) { update_one(ema + idx, param[idx], wt, round, idx); });
  };
  if (w == opmath_t<ema_t>(0)) return;
  if (w == opmath_t<ema_t>(1)) {
    run(opmath_t<ema_t>(1));
  } else if (w < opmath_t<ema_t>(0.5)) {
    run(w);
  } else {
    run(w);
  }
}

// Calls f with the rounding of EMA `tensor` (k * num_tensors + i) on `row`:
// RoundStochastic when asked for (make_update_args allowed it for bf16 EMAs
// only), else RoundNearest. The branch is uniform over the grid.
template <typename ema_t, typename F>
__device__ __forceinline__ void with_rounding(const UpdateArgs& args, uint64_t skey,
                                              int64_t tensor, const Row& row, F&& f) {
  if constexpr (std::is_same_v<ema_t, c10::BFloat16>) {
    if (args.stochastic) {
      return f(RoundStochastic{
          element_key(skey, tensor, static_cast<uint32_t>(row.start >> 32)),
          static_cast<uint32_t>(row.start)});
    }
  }
  f(RoundNearest{});
}

// This update's step_key (ema_math.h), the step read on the device when given
// as a tensor; 0 when the rounding is to nearest.
__device__ __forceinline__ uint64_t update_step_key(const UpdateArgs& args) {
  if (!args.stochastic) return 0;
  const int64_t step =
      args.step_ptr != nullptr ? read_step(args.step_ptr, args.step_kind) : args.step;
  return step_key(args.seed, step);
}

// The EMA of decay k for a row, as raw bytes at the row's first element.
__device__ __forceinline__ char* ema_row(const EmaSlot& es, const Row& row) {
  return static_cast<char*>(es.ptr) + row.start * dtype_size(es.dtype);
}

// Several decays: each param pack is read once and applied to every EMA. An
// EMA's slot is re-read from the table (L1-resident) rather than kept in a
// local array, which would need a stack frame.
template <typename param_t>
__device__ void update_segment_many(const param_t* param, const EmaSlot* emas, const Row& row,
                                    int64_t num_tensors, int num_decays, const double* decays,
                                    const UpdateArgs& args, uint64_t skey, int seg, int lane) {
  constexpr int N = pack_elements_many<param_t>();
  const int length = row.length;
  const EmaSlot* slots = emas + row.tensor;  // decay k: slots[k * num_tensors]
  // As in update_segment_one: the param's period is N and every EMA's divides it.
  const int hp = align_offset(param, sizeof(param_t), pack_align(N, sizeof(param_t)));
  bool agree = hp >= 0;
  for (int k = 0; k < num_decays && agree; ++k) {
    const EmaSlot es = slots[k * num_tensors];
    const int size = dtype_size(es.dtype);
    const int alignment = pack_align(N, size);
    agree = hp % (alignment / size) == align_offset(ema_row(es, row), size, alignment);
  }
  const int head = agree ? smaller(hp, length) : length;
  const RowSplit split = make_split(head, length, N);
  for_segment<N>(
      split, seg, lane,
      [&](int idx) {
        const Pack<param_t, N> p = load_pack<N>(param + idx);
        for (int k = 0; k < num_decays; ++k) {
          const EmaSlot es = slots[k * num_tensors];
          dispatch_dtype(es.dtype, [&](auto* tag) {
            using ema_t = std::remove_pointer_t<decltype(tag)>;
            with_rounding<ema_t>(args, skey, k * num_tensors + row.tensor, row, [&](auto round) {
              update_pack<N>(global_ptr(reinterpret_cast<ema_t*>(ema_row(es, row))) + idx, p,
                             lerp_weight<opmath_t<ema_t>>(decays[k]), round, idx);
            });
          });
        }
      },
      [&](int idx) {
        const param_t p = param[idx];
        for (int k = 0; k < num_decays; ++k) {
          const EmaSlot es = slots[k * num_tensors];
          dispatch_dtype(es.dtype, [&](auto* tag) {
            using ema_t = std::remove_pointer_t<decltype(tag)>;
            with_rounding<ema_t>(args, skey, k * num_tensors + row.tensor, row, [&](auto round) {
              update_one(global_ptr(reinterpret_cast<ema_t*>(ema_row(es, row))) + idx, p,
                         lerp_weight<opmath_t<ema_t>>(decays[k]), round, idx);
            });
          });
        }
      });
}

// The block's decays, in shared memory. One variable for every kernel below,
// in a function with internal linkage (not a template), so that the tests'
// shim can find it (and fill it with garbage before each block).
static __device__ __forceinline__ double* shared_decays() {
  __shared__ double decays[kMaxDecays];
  return decays;
}

// Skip flag and decays, for every kernel below: returns false when the update
// is skipped. The decays go to shared_decays(), written by the first threads
// and published by the barrier.
__device__ __forceinline__ bool read_update_args(const UpdateArgs& args, double* decays) {
  // Uniform across the grid, so returning before the barrier is safe.
  if (args.skip_ptr != nullptr && read_scalar(args.skip_ptr, args.skip_kind, 0) != 0.0) {
    return false;
  }
  if (threadIdx.x < args.num_decays) {
    const int k = static_cast<int>(threadIdx.x);
    double decay = 0.0;
    if (args.decay_ptr != nullptr) {
      decay = read_scalar(args.decay_ptr, args.decay_kind, k);
    } else {
      // Constant indices: a kernel argument indexed at run time would be
      // copied to a stack frame first.
#pragma unroll
      for (int j = 0; j < kMaxDecays; ++j) {
        if (j == k) decay = args.decays[j];
      }
    }
    decays[k] = decay;
  }
  __syncthreads();
  return true;
}

// Calls body(row, seg, lane) for each non-empty work item (a segment of a
// row) of this thread's warp. 32-bit work indices (launch_config checks that
// they fit): a 64-bit division is a subroutine call that costs registers.
template <typename Body>
__device__ __forceinline__ void for_each_segment(const Row* rows, int64_t num_rows, Body&& body) {
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);  // unsigned: one AND
  const uint32_t rows32 = static_cast<uint32_t>(num_rows);
  const uint32_t num_items = rows32 * kSegmentsPerRow;
  for (uint32_t item = blockIdx.x * kWarps + threadIdx.x / kWarpSize; item < num_items;
       item += gridDim.x * kWarps) {
    const uint32_t seg = item / rows32;
    const Row row = rows[item - seg * rows32];
    if (static_cast<int>(seg) * kSegment >= row.length) continue;  // this row is shorter
    body(row, static_cast<int>(seg), lane);
  }
}

// One decay, and one (param, EMA) dtype pair for every tensor: the common
// case, with both types known at compile time. Small enough for 32 registers.
template <typename param_t, typename ema_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    ema_update_kernel(const ParamSlot* params, const EmaSlot* emas, const Row* rows,
                      int64_t num_rows, int64_t num_tensors, UpdateArgs args) {
  double* decays = shared_decays();
  if (!read_update_args(args, decays)) return;
  const opmath_t<ema_t> w = lerp_weight<opmath_t<ema_t>>(decays[0]);
  const uint64_t skey = update_step_key(args);
  for_each_segment(rows, num_rows, [&](const Row& row, int seg, int lane) {
    const param_t* param = global_ptr(static_cast<const param_t*>(params[row.tensor].ptr));
    ema_t* ema = global_ptr(static_cast<ema_t*>(emas[row.tensor].ptr));
    with_rounding<ema_t>(args, skey, row.tensor, row, [&](auto round) {
      update_segment_one(param + row.start, ema + row.start, row.length, seg, lane, w, round);
    });
  });
}

// Any dtypes, read per row, and any number of decays: one launch for a model
// that mixes dtypes. Its dtype switches take more registers (launch bounds
// for half occupancy, still 1024 threads and 16 KiB per SM in flight).
template <bool kManyDecays>
__global__ void __launch_bounds__(kThreads, kMixedMinBlocksPerSM)
    mixed_ema_update_kernel(const ParamSlot* params, const EmaSlot* emas, const Row* rows,
                            int64_t num_rows, int64_t num_tensors, UpdateArgs args) {
  double* decays = shared_decays();
  if (!read_update_args(args, decays)) return;
  const uint64_t skey = update_step_key(args);
  for_each_segment(rows, num_rows, [&](const Row& row, int seg, int lane) {
    const ParamSlot ps = params[row.tensor];
    dispatch_dtype(ps.dtype, [&](auto* tag) {
      using param_t = std::remove_pointer_t<decltype(tag)>;
      const param_t* param = global_ptr(static_cast<const param_t*>(ps.ptr) + row.start);
      if constexpr (kManyDecays) {
        update_segment_many(param, emas, row, num_tensors, args.num_decays, decays, args, skey,
                            seg, lane);
      } else {
        const EmaSlot es = emas[row.tensor];
        dispatch_dtype(es.dtype, [&](auto* etag) {
          using ema_t = std::remove_pointer_t<decltype(etag)>;
          with_rounding<ema_t>(args, skey, row.tensor, row, [&](auto round) {
            update_segment_one(param, global_ptr(reinterpret_cast<ema_t*>(ema_row(es, row))),
                               row.length, seg, lane, lerp_weight<opmath_t<ema_t>>(decays[0]),
                               round);
          });
        });
      }
    });
  });
}

using KernelFn = void (*)(const ParamSlot*, const EmaSlot*, const Row*, int64_t, int64_t,
                          UpdateArgs);

// The kernel for a plan: the fixed-dtype one when there is one decay and every
// tensor has the same (param, EMA) dtype pair, else the mixed one.
inline KernelFn select_kernel(const Plan& plan) {
  if (plan.num_decays > 1) return mixed_ema_update_kernel<true>;
  if (!plan.one_dtype_pair) return mixed_ema_update_kernel<false>;
  const DType param_dtype = plan.params.front().dtype;
  const DType ema_dtype = plan.emas.front().dtype;
  KernelFn fn = nullptr;
  dispatch_dtype(param_dtype, [&](auto* ptag) {
    dispatch_dtype(ema_dtype, [&](auto* etag) {
      fn = ema_update_kernel<std::remove_pointer_t<decltype(ptag)>,
                             std::remove_pointer_t<decltype(etag)>>;
    });
  });
  return fn;
}

// The launch: the one place that sizes the grid (used by ema_cuda.cu and by
// the tests that run this kernel on the CPU). One warp per non-empty segment,
// at most one full wave of blocks (kMinBlocksPerSM per SM); a row of `length`
// elements has ceil(length / kSegment) non-empty segments, so the plan's
// element and row counts bound the work without reading its rows.
struct LaunchConfig {
  unsigned grid;
  unsigned block;
};
// Rows one launch can take: the kernel's work indices are 32-bit unsigned,
// and below 2^31 they cannot wrap when a grid stride (< 2^31) is added.
constexpr int64_t kMaxRows = (int64_t{1} << 31) / kSegmentsPerRow;

inline LaunchConfig launch_config(int64_t num_rows, int64_t num_elements,
                                  int multiprocessor_count) {
  TORCH_CHECK(num_rows <= kMaxRows, "fused_ema: ", num_elements,
              " elements per EMA in one update is more than the CUDA kernel takes (",
              kMaxRows * kChunk, "); split the tensor lists");
  const int64_t segments = num_elements / kSegment + num_rows;
  const int64_t wanted = (segments + kWarps - 1) / kWarps;
  const int64_t wave = int64_t{multiprocessor_count} * kMinBlocksPerSM;
  return {static_cast<unsigned>(wanted < wave ? wanted : wave), static_cast<unsigned>(kThreads)};
}

}  // namespace kernel
}  // namespace fused_ema
