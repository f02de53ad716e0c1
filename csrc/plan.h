// The multi-tensor machinery: a chunk plan built once and consumed by the CPU
// loop and the CUDA kernel alike.
//
// A plan is plain data: one ParamSlot per parameter, one EmaSlot per (decay,
// parameter), and rows (tensor, start, length) that cut every tensor into
// chunks of at most kChunk elements. On CUDA the three arrays are copied once
// into one device buffer, so an update is one launch whose arguments are the
// plan's address, the row count and the decays, whatever the tensor count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "device_runtime.h"

namespace fused_ema {

constexpr int kMaxDecays = 8;
constexpr int64_t kChunk = 65536;
// Tensors per task at least, when a CPU plan's check runs on several threads.
constexpr int64_t kParallelCheckGrain = 256;

// Floating dtypes the kernels handle (for EMAs and params alike).
enum class DType : int32_t { Float = 0, Half = 1, BFloat16 = 2, Double = 3 };

// Calls f with a null pointer of the C++ type of `dtype` (float*, c10::Half*,
// c10::BFloat16*, double*): the one dtype switch of the CPU loop and the kernel.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float: return f(static_cast<float*>(nullptr));
    case DType::Half: return f(static_cast<c10::Half*>(nullptr));
    case DType::BFloat16: return f(static_cast<c10::BFloat16*>(nullptr));
    case DType::Double: return f(static_cast<double*>(nullptr));
  }
}

// Scalar types accepted for a decay tensor or a skip flag, read one value at a
// time (on the device for CUDA, so no host sync is needed).
enum class ScalarKind : int32_t { Bool, UInt8, Int32, Int64, Float, Double };

struct alignas(8) ParamSlot {
  const void* ptr;
  int64_t numel;
  DType dtype;
  int32_t unused;
};

struct alignas(8) EmaSlot {
  void* ptr;
  DType dtype;
  int32_t unused;
};

struct alignas(8) Row {
  int64_t start;   // first element of the chunk within its tensor
  int32_t tensor;  // index into the ParamSlot array
  int32_t length;  // elements in the chunk, 1..kChunk
};

// Everything an update needs besides the plan. A decay is a host double, or
// the k-th element of `decay_ptr` (a tensor on the plan's device) when set.
struct UpdateArgs {
  int num_decays = 1;
  double decays[kMaxDecays] = {};
  const void* decay_ptr = nullptr;
  ScalarKind decay_kind = ScalarKind::Double;
  const void* skip_ptr = nullptr;  // a device flag: update nothing when *skip_ptr != 0
  ScalarKind skip_kind = ScalarKind::Bool;
  bool skipped = false;            // a host flag that was already read as set
  // Stochastic rounding of bf16 EMAs (ema_math.h): the random bits are keyed by
  // (seed, step, tensor, element); the step is a host value, or read from
  // `step_ptr` (a tensor on the plan's device) when set.
  bool stochastic = false;
  uint64_t seed = 0;
  int64_t step = 0;
  const void* step_ptr = nullptr;
  ScalarKind step_kind = ScalarKind::Int64;
};

// The rounding an update asks for: to nearest, or stochastic (bf16 EMAs only)
// with a seed and this update's step (a host value, or a tensor of one integer).
struct Rounding {
  bool stochastic = false;
  int64_t seed = 0;
  int64_t step = 0;
  std::optional<at::Tensor> step_tensor;
};

C10_HOST_DEVICE inline double read_scalar(const void* p, ScalarKind kind, int i) {
  switch (kind) {
    case ScalarKind::Bool:
    case ScalarKind::UInt8: return static_cast<const uint8_t*>(p)[i];
    case ScalarKind::Int32: return static_cast<const int32_t*>(p)[i];
    case ScalarKind::Int64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case ScalarKind::Float: return static_cast<const float*>(p)[i];
    case ScalarKind::Double: return static_cast<const double*>(p)[i];
  }
  return 0.0;
}

// A step counter (int64 or int32), read exactly.
C10_HOST_DEVICE inline int64_t read_step(const void* p, ScalarKind kind) {
  return kind == ScalarKind::Int32 ? static_cast<const int32_t*>(p)[0]
                                   : static_cast<const int64_t*>(p)[0];
}

// The identity of one tensor as far as a plan is concerned: a plan built for
// tensors with equal keys is the same plan (this makes the cache transparent
// and the "were the tensors replaced?" check cheap).
struct TensorKey {
  uintptr_t ptr;
  int64_t numel;
  uint64_t meta;       // dtype, device, contiguity
  uint64_t shape_hash; // sizes and strides
  bool operator==(const TensorKey& o) const {  // one branch: this runs per tensor per step
    return ((ptr ^ o.ptr) | static_cast<uint64_t>(numel ^ o.numel) | (meta ^ o.meta) |
            (shape_hash ^ o.shape_hash)) == 0;
  }
  bool operator!=(const TensorKey& o) const { return !(*this == o); }
};

struct DeviceTable;

struct Plan {
  int64_t num_tensors = 0;
  int num_decays = 1;
  // Every param has params[0]'s dtype and every EMA emas[0]'s: decided once here, so
  // the CUDA launch picks its kernel without walking the tensors on every update.
  bool one_dtype_pair = true;
  // The first EMA (index into `emas`) that is not bf16, or -1: stochastic rounding
  // is refused for such a plan, naming it.
  int64_t first_non_bf16_ema = -1;
  c10::Device device = c10::Device(c10::kCPU);
  int64_t num_elements = 0;
  std::vector<TensorKey> key;      // params first, then emas (decay-major)
  std::vector<ParamSlot> params;
  std::vector<EmaSlot> emas;       // emas[k * num_tensors + i]
  std::vector<Row> rows;
  std::vector<int64_t> row_offsets;  // elements before each row, then the total (CPU balance)

  // CUDA only: the three arrays above in device memory, uploaded when the plan
  // is built outside graph capture, else on first use (device_table_for_launch). `table` serves every launch outside graph
  // capture; `capture_table` was uploaded inside the capture `capture_table->
  // capture_id` and serves that capture only (its copy runs when the graph does).
  mutable std::mutex table_mutex;
  mutable std::shared_ptr<DeviceTable> table;
  mutable std::shared_ptr<DeviceTable> capture_table;
};

// One upload of a plan's table: [ParamSlot x n][EmaSlot x K*n][Row x rows] in
// device memory from the caching allocator, freed stream-ordered (no device
// sync) when the last owner lets go. Owners: the plan, and every CUDA graph
// that captured a launch reading it, so a replay never reads freed memory.
struct DeviceTable {
  device::Runtime* runtime = nullptr;  // the runtime that made it (and destroys `ready`)
  at::DataPtr memory;
  at::DataPtr staging;           // pinned source, kept only when the copy was captured
  device::Stream stream = nullptr;  // the upload is ordered on this stream
  device::Event ready = nullptr;    // recorded after the upload (uploads outside capture)
  unsigned long long capture_id = 0;  // != 0: uploaded inside this capture
  bool known_complete = false;        // the host waited for `ready`
  std::vector<device::Stream> waited_streams;  // other streams ordered after the upload
  const ParamSlot* params = nullptr;
  const EmaSlot* emas = nullptr;
  const Row* rows = nullptr;

  DeviceTable() = default;
  DeviceTable(const DeviceTable&) = delete;
  DeviceTable& operator=(const DeviceTable&) = delete;
  ~DeviceTable();
};

// The per-tensor rules of build_plan, for code that checks tensors without
// building a plan over them (offload.cpp): params[i] on `device` (defined,
// a kernel dtype, dense, aligned), and emas[k][i] against it (its shape, on
// `device`, a kernel dtype, dense, aligned, the param's layout). Each returns
// the tensor's DType.
DType check_param(const at::Tensor& param, int64_t i, const c10::Device& device);
DType check_ema(const at::Tensor& ema, const at::Tensor& param, int64_t num_decays, int64_t k,
                int64_t i, const c10::Device& device);

// Validates the tensors (nothing is written) and builds the plan. `emas` holds
// num_decays lists of params.size() tensors, one after the other.
std::shared_ptr<const Plan> build_plan(at::TensorList emas, at::TensorList params,
                                       int64_t num_decays);

// Plans for recently seen tensor lists, looked up by their keys: calling the
// functional update again with the same tensors skips validation and, on
// CUDA, the upload of the table.
std::shared_ptr<const Plan> cached_plan(at::TensorList emas, at::TensorList params,
                                        int64_t num_decays);

// Drops every cached plan (their device tables are freed, stream-ordered).
void clear_plan_cache();

std::vector<TensorKey> plan_key(at::TensorList emas, at::TensorList params);

// The staleness rule, in one place: a tensor is stale when its TensorKey is no
// longer the one recorded (new storage, shape, dtype or layout). The index of
// the first stale tensor, or -1.
int64_t first_changed(at::TensorList tensors, const TensorKey* keys);

// The first of params..., emas... (one sequence: params[i] is i, emas[k][i] is
// n + k * n + i) that is stale since `plan` was built, or -1: what a bound
// update checks before it writes anything (the caller names the tensor).
int64_t first_stale(const Plan& plan, at::TensorList emas, at::TensorList params);

// A skip flag's kind, checked (one value of a bool, integer or float tensor).
ScalarKind checked_skip_kind(const at::Tensor& skip);

// Checks that `plan` can be rounded stochastically (every EMA bf16), naming the
// first EMA that cannot.
void check_stochastic(const Plan& plan);

// Checks decays, skip and rounding against the plan (values, count, device) and
// packs them.
UpdateArgs make_update_args(const Plan& plan, c10::ArrayRef<double> decays,
                            const std::optional<at::Tensor>& decay_tensor,
                            const std::optional<at::Tensor>& skip,
                            const Rounding& rounding = {});

// Runs the update on the plan's device.
void run_plan(const Plan& plan, const UpdateArgs& args);

// Per-device kernels (ema_cpu.cpp, ema_cuda.cu).
void ema_update_cpu(const Plan& plan, const UpdateArgs& args);
// How many tasks ema_update_cpu splits a plan into (1: it runs on the calling thread).
int64_t ema_cpu_tasks(const Plan& plan);
// The instruction set ema_update_cpu's loop runs with on this machine: "AVX2" or "SSE2".
const char* ema_cpu_isa();
void ema_update_cuda(const Plan& plan, const UpdateArgs& args);

// The plan's device table, ready for a kernel launched on `stream` right after
// this call (through device::runtime()). Uploads it on first use, stream-ordered;
// orders another stream after the upload with an event; inside graph capture
// hands the graph a reference to the table (uploading a capture-only table if
// the plan has none yet). No cudaMalloc, cudaFree or device sync; the one host
// wait is on the first use inside a capture of a table uploaded before it.
struct DeviceView {
  const ParamSlot* params;
  const EmaSlot* emas;
  const Row* rows;
};
DeviceView device_table_for_launch(const Plan& plan, int device, device::Stream stream);

// A new plan's table, uploaded on `device`'s current stream right away (build_plan),
// unless that stream is capturing a graph.
void upload_unless_capturing(const Plan& plan, int device);

// Tables released by CUDA graphs wait here (the runtime's release callback may
// not call CUDA) and are freed by the next device_table_for_launch outside capture.
void free_released_tables();
size_t num_released_tables();

C10_HOST_DEVICE inline int dtype_size(DType d) {
  return d == DType::Double ? 8 : d == DType::Float ? 4 : 2;
}

// "emas[3]", or "emas[1][3]" when there are several decays.
std::string ema_name(int64_t num_decays, int64_t k, int64_t i);

}  // namespace fused_ema
