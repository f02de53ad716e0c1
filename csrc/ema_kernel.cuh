// The CUDA kernel's device code: one launch over the plan's rows, whatever the
// tensor count. Kept apart from the host code (ema_cuda.cu) so the same source can
// be compiled by nvcc for the GPU and, with a shim for the CUDA built-ins, as host
// C++ for the tests that execute it on the CPU.
//
// Each block takes whole rows (grid-stride). A row reads its dtypes once, so
// every thread of a block takes the same branch, and a model that mixes dtypes
// is still one launch. The body of a row moves 8 elements per thread per step
// with 16-byte loads and stores for every dtype (one for 16-bit types, two for
// fp32, four for fp64); elements before the first 16-byte-aligned index
// shared by all arrays of the row, and after the last full step, are done one
// at a time. Decays and the skip flag come from the kernel's arguments or, when
// given as tensors, are read on the device: no host sync, graph-capturable.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "ema_math.h"
#include "plan.h"

namespace fused_ema {
namespace kernel {

constexpr int kThreads = 512;
constexpr int kVec = 8;  // elements per thread per step
constexpr int kBlocksPerSM = 64;

template <typename T>
struct alignas(16) Pack {
  T v[kVec];
};

template <typename ema_t, typename param_t>
__device__ __forceinline__ void update_one(ema_t* e, param_t p, double decay) {
  using opmath_t = typename OpMath<ema_t>::type;
  *e = static_cast<ema_t>(ema_lerp<opmath_t>(static_cast<opmath_t>(*e),
                                             static_cast<opmath_t>(p),
                                             lerp_weight<opmath_t>(decay)));
}

template <typename ema_t, typename param_t>
__device__ __forceinline__ void update_pack(ema_t* e, const Pack<param_t>& p, double decay) {
  using opmath_t = typename OpMath<ema_t>::type;
  const opmath_t w = lerp_weight<opmath_t>(decay);
  Pack<ema_t> ev = *reinterpret_cast<const Pack<ema_t>*>(e);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    ev.v[j] = static_cast<ema_t>(ema_lerp<opmath_t>(static_cast<opmath_t>(ev.v[j]),
                                                    static_cast<opmath_t>(p.v[j]), w));
  }
  *reinterpret_cast<Pack<ema_t>*>(e) = ev;
}

template <typename T>
__device__ __forceinline__ DType dtype_of();
template <>
__device__ __forceinline__ DType dtype_of<float>() { return DType::Float; }
template <>
__device__ __forceinline__ DType dtype_of<c10::Half>() { return DType::Half; }
template <>
__device__ __forceinline__ DType dtype_of<c10::BFloat16>() { return DType::BFloat16; }
template <>
__device__ __forceinline__ DType dtype_of<double>() { return DType::Double; }

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// How a row splits: scalar elements [0, head), packs of kVec from head, scalar
// elements [tail, length). `head` is the first index where every array of the
// row is 16-byte aligned; stepping by kVec elements keeps them aligned (kVec *
// element size is a multiple of 16). If no such index exists, all is scalar.
struct RowSplit {
  int head, num_packs, tail;
};

template <typename param_t>
__device__ __forceinline__ RowSplit split_row(const param_t* param, char* const* ema,
                                              const DType* ema_dtype, int num_decays,
                                              int length) {
  int head = length;
  for (int h = 0; h < kVec && h < length; ++h) {
    bool ok = aligned16(param + h);
    for (int k = 0; k < num_decays; ++k) {
      ok = ok && aligned16(ema[k] + h * dtype_size(ema_dtype[k]));
    }
    if (ok) {
      head = h;
      break;
    }
  }
  const int num_packs = (length - head) / kVec;
  return {head, num_packs, head + num_packs * kVec};
}

// Index of the s-th scalar element of a row: the head, then the tail.
__device__ __forceinline__ int scalar_index(const RowSplit& split, int s) {
  return s < split.head ? s : split.tail + (s - split.head);
}

// One decay (the common case): both types known, everything in registers.
template <typename param_t, typename ema_t>
__device__ void update_row_one(const param_t* param, ema_t* ema, int length, double decay) {
  char* ema_bytes = reinterpret_cast<char*>(ema);
  const DType ema_dtype = dtype_of<ema_t>();
  const RowSplit split = split_row(param, &ema_bytes, &ema_dtype, 1, length);
  for (int v = threadIdx.x; v < split.num_packs; v += blockDim.x) {
    const int idx = split.head + v * kVec;
    update_pack(ema + idx, *reinterpret_cast<const Pack<param_t>*>(param + idx), decay);
  }
  const int num_scalar = split.head + (length - split.tail);
  for (int s = threadIdx.x; s < num_scalar; s += blockDim.x) {
    const int idx = scalar_index(split, s);
    update_one(ema + idx, param[idx], decay);
  }
}

// Several decays: each param pack is read once and applied to every EMA.
template <typename param_t>
__device__ void update_row_many(const param_t* param, char* const* ema, const DType* ema_dtype,
                                int num_decays, int length, const double* decays) {
  const RowSplit split = split_row(param, ema, ema_dtype, num_decays, length);
  for (int v = threadIdx.x; v < split.num_packs; v += blockDim.x) {
    const int idx = split.head + v * kVec;
    const Pack<param_t> p = *reinterpret_cast<const Pack<param_t>*>(param + idx);
    for (int k = 0; k < num_decays; ++k) {
      dispatch_dtype(ema_dtype[k], [&](auto* tag) {
        using ema_t = std::remove_pointer_t<decltype(tag)>;
        update_pack(reinterpret_cast<ema_t*>(ema[k]) + idx, p, decays[k]);
      });
    }
  }
  const int num_scalar = split.head + (length - split.tail);
  for (int s = threadIdx.x; s < num_scalar; s += blockDim.x) {
    const int idx = scalar_index(split, s);
    const param_t p = param[idx];
    for (int k = 0; k < num_decays; ++k) {
      dispatch_dtype(ema_dtype[k], [&](auto* tag) {
        using ema_t = std::remove_pointer_t<decltype(tag)>;
        update_one(reinterpret_cast<ema_t*>(ema[k]) + idx, p, decays[k]);
      });
    }
  }
}

template <typename param_t>
__device__ void update_row(const Row& row, const ParamSlot& ps, const EmaSlot* emas,
                           int64_t num_tensors, int num_decays, const double* decays) {
  const param_t* param = static_cast<const param_t*>(ps.ptr) + row.start;
  if (num_decays == 1) {
    const EmaSlot es = emas[row.tensor];
    dispatch_dtype(es.dtype, [&](auto* tag) {
      using ema_t = std::remove_pointer_t<decltype(tag)>;
      update_row_one(param, static_cast<ema_t*>(es.ptr) + row.start, row.length, decays[0]);
    });
    return;
  }
  char* ema[kMaxDecays];
  DType ema_dtype[kMaxDecays];
  for (int k = 0; k < num_decays; ++k) {
    const EmaSlot es = emas[k * num_tensors + row.tensor];
    ema_dtype[k] = es.dtype;
    ema[k] = static_cast<char*>(es.ptr) + row.start * dtype_size(es.dtype);
  }
  update_row_many(param, ema, ema_dtype, num_decays, row.length, decays);
}

__global__ void __launch_bounds__(kThreads)
    ema_update_kernel(const ParamSlot* params, const EmaSlot* emas, const Row* rows,
                      int64_t num_rows, int64_t num_tensors, UpdateArgs args) {
  // Uniform across the grid, so returning before the barrier is safe.
  if (args.skip_ptr != nullptr && read_scalar(args.skip_ptr, args.skip_kind, 0) != 0.0) return;
  __shared__ double decays[kMaxDecays];
  if (threadIdx.x < args.num_decays) {
    decays[threadIdx.x] = args.decay_ptr != nullptr
                              ? read_scalar(args.decay_ptr, args.decay_kind, threadIdx.x)
                              : args.decays[threadIdx.x];
  }
  __syncthreads();

  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const Row row = rows[r];
    const ParamSlot ps = params[row.tensor];
    dispatch_dtype(ps.dtype, [&](auto* tag) {
      using param_t = std::remove_pointer_t<decltype(tag)>;
      update_row<param_t>(row, ps, emas, num_tensors, args.num_decays, decays);
    });
  }
}

}  // namespace kernel
}  // namespace fused_ema
