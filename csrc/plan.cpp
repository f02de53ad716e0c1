#include "plan.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <list>
#include <mutex>
#include <string>

namespace fused_ema {

std::string ema_name(int64_t num_decays, int64_t k, int64_t i) {
  return num_decays == 1 ? "emas[" + std::to_string(i) + "]"
                         : "emas[" + std::to_string(k) + "][" + std::to_string(i) + "]";
}

namespace {

std::string param_name(int64_t i) { return "params[" + std::to_string(i) + "]"; }

// A dtype as Python writes it ("torch.int32"), so both languages' messages match.
std::string torch_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Double;
    default: return std::nullopt;
  }
}

// Read straight from the TensorImpl: this runs for every tensor on every
// update of a bound plan, where its instruction count is the host cost of a
// step. So each accessor is called once (each re-checks the sizes policy), the
// dtype is read once, and the data address is the storage's const
// pointer (Tensor::data_ptr() is a mutable access with copy-on-write checks).
C10_ALWAYS_INLINE TensorKey key_of(const c10::TensorImpl& t) {
  constexpr uint64_t kFnvPrime = 1099511628211ull;
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the sizes
  const c10::IntArrayRef sizes = t.sizes();
  for (int64_t s : sizes) h = (h ^ static_cast<uint64_t>(s)) * kFnvPrime;
  h = (h ^ static_cast<uint64_t>(sizes.size())) * kFnvPrime;
  const bool contiguous = t.is_contiguous();
  if (C10_UNLIKELY(!contiguous)) {  // a dense layout of its own (channels_last, ...)
    for (int64_t s : t.strides()) h = (h ^ static_cast<uint64_t>(s)) * kFnvPrime;
  }
  const int64_t numel = t.numel();
  const c10::StorageImpl* storage = t.unsafe_storage().unsafeGetStorageImpl();
  // An empty tensor has no elements to place: its address is 0 wherever it points.
  uintptr_t address = 0;
  if (C10_LIKELY(storage != nullptr && numel != 0)) {
    address = reinterpret_cast<uintptr_t>(storage->data()) +
              static_cast<uintptr_t>(t.storage_offset()) * t.itemsize();
  }
  const c10::Device device = t.device();
  const uint64_t meta = static_cast<uint64_t>(c10::typeMetaToScalarType(t.dtype())) |
                        (static_cast<uint64_t>(static_cast<uint8_t>(device.type())) << 16) |
                        (static_cast<uint64_t>(static_cast<uint8_t>(device.index())) << 24) |
                        (static_cast<uint64_t>(contiguous) << 32);
  return {address, numel, meta, h};
}

C10_ALWAYS_INLINE TensorKey key_of(const at::Tensor& t) { return key_of(*t.unsafeGetTensorImpl()); }

// The kernels walk a tensor's storage as one flat array of numel elements from
// data_ptr: right for any non-overlapping and dense layout (contiguous,
// channels_last, a permutation), provided EMA and param share it.
void check_dense_and_aligned(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.is_contiguous() || t.is_non_overlapping_and_dense(), "fused_ema: ", name,
                    " is neither contiguous nor dense (strides ", t.strides(),
                    "); pass contiguous or dense (e.g. channels_last) tensors");
  // from_blob or DLPack can give an address that is not a multiple of the
  // element size; such an access faults on a GPU.
  const auto address = reinterpret_cast<uintptr_t>(t.data_ptr());
  TORCH_CHECK_VALUE(address % t.element_size() == 0, "fused_ema: ", name, " starts at address ",
                    reinterpret_cast<void*>(address), ", which is not a multiple of its element "
                    "size (", t.element_size(), " bytes); copy it into a tensor of its own");
}

// Equal strides wherever they matter (a dimension of size 1 has any stride).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Byte range of a tensor's elements, with the name to report.
struct Span {
  uintptr_t begin, end;
  int64_t k, i;  // k == -1 for a param
};

void check_no_overlap(std::vector<Span> ema_spans, const std::vector<Span>& param_spans,
                      int64_t num_decays) {
  auto name = [&](const Span& s) {
    return s.k < 0 ? param_name(s.i) : ema_name(num_decays, s.k, s.i);
  };
  std::sort(ema_spans.begin(), ema_spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t j = 1; j < ema_spans.size(); ++j) {
    TORCH_CHECK_VALUE(ema_spans[j].begin >= ema_spans[j - 1].end, "fused_ema: ",
                      name(ema_spans[j]), " overlaps ", name(ema_spans[j - 1]),
                      " in memory; every EMA needs storage of its own");
  }
  // EMA spans are now disjoint and sorted, so the only one that can overlap a
  // param is the last EMA starting before the param's end.
  for (const Span& p : param_spans) {
    auto it = std::lower_bound(ema_spans.begin(), ema_spans.end(), p.end,
                               [](const Span& e, uintptr_t v) { return e.begin < v; });
    if (it == ema_spans.begin()) continue;
    const Span& e = *std::prev(it);
    if (e.end <= p.begin) continue;
    TORCH_CHECK_VALUE(e.i != p.i, "fused_ema: ", name(e), " shares memory with ", name(p),
                      "; the EMA must be a separate copy of its param (e.g. param.detach().clone())");
    TORCH_CHECK_VALUE(false, "fused_ema: ", name(e), " overlaps ", name(p),
                      " in memory; EMAs and params must not share storage");
  }
}

}  // namespace

std::vector<TensorKey> plan_key(at::TensorList emas, at::TensorList params) {
  std::vector<TensorKey> key;
  key.reserve(emas.size() + params.size());
  for (const auto& p : params) key.push_back(key_of(p));
  for (const auto& e : emas) key.push_back(key_of(e));
  return key;
}

DType check_param(const at::Tensor& p, int64_t i, const c10::Device& device) {
  TORCH_CHECK_VALUE(p.defined(), "fused_ema: ", param_name(i), " is undefined");
  TORCH_CHECK_VALUE(p.device() == device, "fused_ema: ", param_name(i), " is on ",
                    p.device(), " but params[0] is on ", device,
                    "; one update runs on one device");
  auto pdt = to_dtype(p.scalar_type());
  TORCH_CHECK_TYPE(pdt.has_value(), "fused_ema: ", param_name(i), " has dtype ",
                   torch_name(p.scalar_type()), "; params must be float32, float16, bfloat16 or float64");
  check_dense_and_aligned(p, param_name(i));
  return *pdt;
}

DType check_ema(const at::Tensor& ema, const at::Tensor& param, int64_t num_decays, int64_t k,
                int64_t i, const c10::Device& device) {
  const std::string ename = ema_name(num_decays, k, i);
  TORCH_CHECK_VALUE(ema.defined(), "fused_ema: ", ename, " is undefined");
  TORCH_CHECK_VALUE(ema.sizes() == param.sizes(), "fused_ema: ", ename, " has shape ",
                    ema.sizes(), " but ", param_name(i), " has shape ", param.sizes());
  TORCH_CHECK_VALUE(ema.device() == device, "fused_ema: ", ename, " is on ", ema.device(),
                    " but ", param_name(i), " is on ", param.device(),
                    "; keep the EMA on its params' device (FusedEMA(device=...) "
                    "handles an EMA kept elsewhere)");
  auto edt = to_dtype(ema.scalar_type());
  TORCH_CHECK_TYPE(edt.has_value(), "fused_ema: ", ename, " has dtype ",
                   torch_name(ema.scalar_type()),
                   "; an EMA must be float32, float16, bfloat16 or float64");
  check_dense_and_aligned(ema, ename);
  TORCH_CHECK_VALUE(same_layout(ema, param), "fused_ema: ", ename, " has strides ",
                    ema.strides(), " but ", param_name(i), " has strides ", param.strides(),
                    "; an EMA must have its param's memory layout (make it with "
                    "param.detach().clone())");
  return *edt;
}

std::shared_ptr<const Plan> build_plan(at::TensorList emas, at::TensorList params,
                                       int64_t num_decays) {
  TORCH_CHECK_VALUE(num_decays >= 1 && num_decays <= kMaxDecays,
                    "fused_ema: between 1 and ", kMaxDecays, " decays per update, got ",
                    num_decays);
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(emas.size()) == n * num_decays, "fused_ema: got ",
                    emas.size(), " EMA tensors for ", n, " params and ", num_decays,
                    " decay(s); each EMA list must be as long as params");
  auto plan = std::make_shared<Plan>();
  plan->num_tensors = n;
  plan->num_decays = static_cast<int>(num_decays);
  if (n == 0) return plan;

  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "fused_ema: params[0] is on ",
                    device, "; fused_ema runs on CPU and CUDA tensors");
  plan->device = device;
  plan->params.resize(n);
  plan->emas.resize(n * num_decays);
  std::vector<Span> param_spans, ema_spans;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const DType pdt = check_param(p, i, device);
    plan->params[i] = {p.data_ptr(), p.numel(), pdt, 0};
    plan->one_dtype_pair = plan->one_dtype_pair && pdt == plan->params[0].dtype;
    const auto pbegin = reinterpret_cast<uintptr_t>(p.data_ptr());
    if (p.numel() > 0) {
      param_spans.push_back({pbegin, pbegin + p.numel() * p.element_size(), -1, i});
    }
    for (int64_t k = 0; k < num_decays; ++k) {
      const at::Tensor& e = emas[k * n + i];
      const DType edt = check_ema(e, p, num_decays, k, i, device);
      plan->emas[k * n + i] = {e.data_ptr(), edt, 0};
      plan->one_dtype_pair = plan->one_dtype_pair &&
                             plan->emas[k * n + i].dtype == plan->emas[0].dtype;
      const int64_t j = k * n + i;  // the lowest j: emas[0][...] first, as validation.py
      if (plan->emas[j].dtype != DType::BFloat16 &&
          (plan->first_non_bf16_ema < 0 || j < plan->first_non_bf16_ema)) {
        plan->first_non_bf16_ema = j;
      }
      const auto ebegin = reinterpret_cast<uintptr_t>(e.data_ptr());
      if (e.numel() > 0) {
        ema_spans.push_back({ebegin, ebegin + e.numel() * e.element_size(), k, i});
      }
    }
    for (int64_t start = 0; start < p.numel(); start += kChunk) {
      plan->row_offsets.push_back(plan->num_elements + start);
      plan->rows.push_back({start, static_cast<int32_t>(i),
                            static_cast<int32_t>(std::min(kChunk, p.numel() - start))});
    }
    plan->num_elements += p.numel();
  }
  plan->row_offsets.push_back(plan->num_elements);
  check_no_overlap(std::move(ema_spans), param_spans, num_decays);
  plan->key = plan_key(emas, params);

  if (device.is_cuda()) {
#ifdef FUSED_EMA_WITH_CUDA
    upload_unless_capturing(*plan, device.index());
#else
    TORCH_CHECK(false, "fused_ema: this build has no CUDA kernels; rebuild with a CUDA torch "
                "and nvcc, or set FUSED_EMA_BACKEND=python");
#endif
  }
  return plan;
}

namespace {

size_t table_bytes(const Plan& plan) {
  return plan.params.size() * sizeof(ParamSlot) + plan.emas.size() * sizeof(EmaSlot) +
         plan.rows.size() * sizeof(Row);
}

// An LRU of plans, large enough that a loop over many tensor lists (several
// models, per-layer updates) stays warm; bounded in table bytes too. A miss
// costs a validation and a stream-ordered upload, never a device sync.
struct PlanCache {
  static constexpr size_t kCapacity = 64;
  static constexpr size_t kMaxBytes = size_t{64} << 20;
  std::mutex mutex;
  std::list<std::shared_ptr<const Plan>> plans;
  size_t bytes = 0;
};

PlanCache& plan_cache() {
  static auto* cache = new PlanCache;  // never destroyed: plans may outlive static teardown
  return *cache;
}

}  // namespace

void clear_plan_cache() {
  PlanCache& c = plan_cache();
  std::list<std::shared_ptr<const Plan>> plans;
  std::lock_guard<std::mutex> lock(c.mutex);
  plans.swap(c.plans);
  c.bytes = 0;
}

std::shared_ptr<const Plan> cached_plan(at::TensorList emas, at::TensorList params,
                                        int64_t num_decays) {
  PlanCache& c = plan_cache();
  if (params.empty() ||
      static_cast<int64_t>(emas.size()) != static_cast<int64_t>(params.size()) * num_decays) {
    return build_plan(emas, params, num_decays);  // reports the error, or an empty plan
  }
  std::vector<TensorKey> key = plan_key(emas, params);
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto it = c.plans.begin(); it != c.plans.end(); ++it) {
      if ((*it)->num_decays == num_decays && (*it)->key == key) {
        c.plans.splice(c.plans.begin(), c.plans, it);
        return c.plans.front();
      }
    }
  }
  auto plan = build_plan(emas, params, num_decays);
  std::vector<std::shared_ptr<const Plan>> evicted;  // released outside the lock
  std::lock_guard<std::mutex> lock(c.mutex);
  c.plans.push_front(plan);
  c.bytes += table_bytes(*plan);
  while (c.plans.size() > 1 &&
         (c.plans.size() > PlanCache::kCapacity || c.bytes > PlanCache::kMaxBytes)) {
    c.bytes -= table_bytes(*c.plans.back());
    evicted.push_back(std::move(c.plans.back()));
    c.plans.pop_back();
  }
  return plan;
}

int64_t first_changed(at::TensorList tensors, const TensorKey* keys) {
  // The hot loop only compares. It is bound by memory (each tensor's TensorImpl
  // lives apart), so the TensorImpls of later tensors are prefetched while one
  // is read. Not their StorageImpls: that prefetch needs a load from the
  // TensorImpl first, and it measured slower than letting the out-of-order core
  // fetch them (10,000 tensors, empty or not, as a module's or scattered).
  constexpr int64_t kAhead = 8;
  const int64_t count = static_cast<int64_t>(tensors.size());
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAhead < count) {
      // Every line of the object: it need not start on a line.
      const auto* far = reinterpret_cast<const char*>(tensors[i + kAhead].unsafeGetTensorImpl());
      __builtin_prefetch(far);
      __builtin_prefetch(far + 64);
      __builtin_prefetch(far + 128);
      __builtin_prefetch(far + sizeof(c10::TensorImpl) - 1);
    }
    if (C10_UNLIKELY(key_of(tensors[i]) != keys[i])) return i;
  }
  return -1;
}

int64_t first_stale(const Plan& plan, at::TensorList emas, at::TensorList params) {
  const int64_t n = plan.num_tensors;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n &&
                  static_cast<int64_t>(emas.size()) == n * plan.num_decays,
              "fused_ema: the plan was built for other tensor lists");
  // Objects [begin, end) of the sequence params..., emas...: the first stale one, or -1.
  const auto first_in = [&](int64_t begin, int64_t end) -> int64_t {
    if (begin < n) {
      const int64_t stop = std::min(end, n);
      const int64_t j = first_changed(params.slice(begin, stop - begin), plan.key.data() + begin);
      if (j >= 0) return begin + j;
    }
    if (end > n) {
      const int64_t start = std::max(begin, n);
      const int64_t j = first_changed(emas.slice(start - n, end - start), plan.key.data() + start);
      if (j >= 0) return start + j;
    }
    return -1;
  };
  const int64_t total = n * (1 + plan.num_decays);
  if (plan.device.is_cpu() && ema_cpu_tasks(plan) > 1 && total >= 2 * kParallelCheckGrain &&
      !at::in_parallel_region()) {
    // The CPU update that follows runs on every thread: so does its check, whose
    // reads of cold TensorImpls then overlap twice as much. The lowest index wins,
    // so the answer is the serial one.
    std::atomic<int64_t> first{total};
    at::parallel_for(0, total, kParallelCheckGrain, [&](int64_t begin, int64_t end) {
      const int64_t j = first_in(begin, end);
      int64_t seen = first.load();
      while (j >= 0 && j < seen && !first.compare_exchange_weak(seen, j)) {
      }
    });
    return first.load() < total ? first.load() : -1;
  }
  return first_in(0, total);
}

namespace {

std::optional<ScalarKind> to_scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kBool: return ScalarKind::Bool;
    case at::kByte: return ScalarKind::UInt8;
    case at::kInt: return ScalarKind::Int32;
    case at::kLong: return ScalarKind::Int64;
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    default: return std::nullopt;
  }
}

void check_decay_value(double d, int64_t k) {
  TORCH_CHECK_VALUE(std::isfinite(d) && d >= 0.0 && d <= 1.0,
                    "fused_ema: decay", k >= 0 ? "s[" + std::to_string(k) + "]" : std::string(),
                    " must be a number in [0, 1], got ", d);
}

}  // namespace

ScalarKind checked_skip_kind(const at::Tensor& skip) {
  TORCH_CHECK_VALUE(skip.numel() == 1, "fused_ema: skip must hold one value, got ",
                    skip.numel());
  const std::optional<ScalarKind> kind = to_scalar_kind(skip.scalar_type());
  TORCH_CHECK_TYPE(kind.has_value(), "fused_ema: skip must be a bool, integer, float32 or "
                   "float64 tensor, got ", torch_name(skip.scalar_type()));
  return *kind;
}

void check_stochastic(const Plan& plan) {
  const int64_t j = plan.first_non_bf16_ema;
  if (j < 0) return;
  const int64_t n = plan.num_tensors;
  const DType d = plan.emas[j].dtype;
  TORCH_CHECK_VALUE(false, "fused_ema: ", ema_name(plan.num_decays, j / n, j % n), " is ",
                    d == DType::Float ? "float32" : d == DType::Half ? "float16" : "float64",
                    "; rounding='stochastic' is for bfloat16 EMAs (round to nearest, the "
                    "default, for the others)");
}

UpdateArgs make_update_args(const Plan& plan, c10::ArrayRef<double> decays,
                            const std::optional<at::Tensor>& decay_tensor,
                            const std::optional<at::Tensor>& skip,
                            const Rounding& rounding) {
  UpdateArgs args;
  args.num_decays = plan.num_decays;
  const bool multi = plan.num_decays > 1;
  if (decay_tensor.has_value() && decay_tensor->defined()) {
    const at::Tensor& t = *decay_tensor;
    TORCH_CHECK_VALUE(t.numel() == plan.num_decays, "fused_ema: got ", t.numel(),
                      " decay values for ", plan.num_decays, " EMA list(s)");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "fused_ema: a decay tensor must be float32 or float64, got ",
                     torch_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.is_contiguous(), "fused_ema: the decay tensor must be contiguous");
    if (t.device().is_cpu()) {
      // Host memory: read now (no sync), and check like a float decay.
      for (int k = 0; k < plan.num_decays; ++k) {
        args.decays[k] = read_scalar(t.data_ptr(), *to_scalar_kind(t.scalar_type()), k);
        check_decay_value(args.decays[k], multi ? k : -1);
      }
    } else {
      // Read by the kernel: not range-checked here, which would need a host sync.
      TORCH_CHECK_VALUE(t.device() == plan.device || plan.num_tensors == 0,
                        "fused_ema: the decay tensor is on ", t.device(),
                        " but the EMAs are on ", plan.device);
      args.decay_ptr = t.data_ptr();
      args.decay_kind = *to_scalar_kind(t.scalar_type());
    }
  } else {
    TORCH_CHECK_VALUE(static_cast<int64_t>(decays.size()) == plan.num_decays, "fused_ema: got ",
                      decays.size(), " decays for ", plan.num_decays, " EMA list(s)");
    for (int k = 0; k < plan.num_decays; ++k) {
      args.decays[k] = decays[k];
      check_decay_value(decays[k], multi ? k : -1);
    }
  }
  if (skip.has_value() && skip->defined()) {
    const at::Tensor& s = *skip;
    const ScalarKind kind = checked_skip_kind(s);
    TORCH_CHECK_VALUE(s.device().is_cpu() || s.device() == plan.device ||
                          plan.num_tensors == 0,
                      "fused_ema: skip is on ", s.device(), " but the EMAs are on ",
                      plan.device);
    if (s.device().is_cpu()) {
      args.skipped = read_scalar(s.data_ptr(), kind, 0) != 0.0;  // host memory: no sync
    } else {
      args.skip_ptr = s.data_ptr();
      args.skip_kind = kind;
    }
  }
  if (rounding.stochastic) {
    check_stochastic(plan);
    args.stochastic = true;
    args.seed = static_cast<uint64_t>(rounding.seed);
    args.step = rounding.step;
    if (rounding.step_tensor.has_value() && rounding.step_tensor->defined()) {
      const at::Tensor& t = *rounding.step_tensor;
      TORCH_CHECK_VALUE(t.numel() == 1, "fused_ema: step must hold one value, got ", t.numel());
      TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                       "fused_ema: a step tensor must be int64 or int32, got ",
                       torch_name(t.scalar_type()));
      TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == plan.device ||
                            plan.num_tensors == 0,
                        "fused_ema: the step tensor is on ", t.device(),
                        " but the EMAs are on ", plan.device);
      const ScalarKind kind = *to_scalar_kind(t.scalar_type());
      if (t.device().is_cpu()) {
        args.step = read_step(t.data_ptr(), kind);  // host memory: no sync
      } else {
        args.step_ptr = t.data_ptr();
        args.step_kind = kind;
      }
    }
  }
  return args;
}

// ---- The device table: runtime, upload, lifetime under graph capture ----

namespace device {
namespace {
std::atomic<Runtime*> installed_runtime{nullptr};
}  // namespace

#ifndef FUSED_EMA_WITH_CUDA
Runtime* cuda_runtime() { return nullptr; }
#endif

Runtime& runtime() {
  Runtime* rt = installed_runtime.load(std::memory_order_acquire);
  if (rt == nullptr) rt = cuda_runtime();
  TORCH_CHECK(rt != nullptr, "fused_ema: this build has no CUDA kernels; rebuild with a CUDA "
              "torch and nvcc, or set FUSED_EMA_BACKEND=python");
  return *rt;
}

void set_runtime(Runtime* rt) { installed_runtime.store(rt, std::memory_order_release); }

}  // namespace device

DeviceTable::~DeviceTable() {
  if (ready != nullptr && runtime != nullptr) runtime->destroy_event(ready);
  // `memory` and `staging` go back to their caching allocators (stream-ordered).
}

namespace {

// Tables whose last graph is gone: CUDA calls the release from its own thread,
// where no CUDA call is allowed, so freeing waits for a host thread of ours.
struct ReleasedTables {
  std::mutex mutex;
  std::vector<std::shared_ptr<const DeviceTable>> tables;
  std::atomic<bool> any{false};
};

ReleasedTables& released_tables() {
  static auto* released = new ReleasedTables;  // never destroyed: CUDA may release at exit
  return *released;
}

void release_table(std::shared_ptr<const DeviceTable> table) noexcept {
  ReleasedTables& r = released_tables();
  try {
    std::lock_guard<std::mutex> lock(r.mutex);
    r.tables.push_back(std::move(table));
    r.any.store(true, std::memory_order_release);
  } catch (...) {
    // Out of memory while growing the list: keep the table alive (a leak, not a fault).
    new std::shared_ptr<const DeviceTable>(std::move(table));
  }
}

// A new table holding `plan`'s arrays, uploaded on `stream`; inside the capture
// `capture_id` (!= 0) the copy is a node of the graph and runs at each replay.
std::shared_ptr<DeviceTable> upload_table(device::Runtime& rt, const Plan& plan, int device,
                                          device::Stream stream, unsigned long long capture_id) {
  const size_t pbytes = plan.params.size() * sizeof(ParamSlot);
  const size_t ebytes = plan.emas.size() * sizeof(EmaSlot);
  const size_t rbytes = plan.rows.size() * sizeof(Row);
  const size_t bytes = pbytes + ebytes + rbytes;
  auto table = std::make_shared<DeviceTable>();
  table->runtime = &rt;
  table->stream = stream;
  table->capture_id = capture_id;
  at::DataPtr staging = rt.alloc_pinned(bytes);
  auto* host = static_cast<uint8_t*>(staging.get());
  std::memcpy(host, plan.params.data(), pbytes);
  std::memcpy(host + pbytes, plan.emas.data(), ebytes);
  std::memcpy(host + pbytes + ebytes, plan.rows.data(), rbytes);
  table->memory = rt.alloc_device(bytes, device, stream);
  rt.copy_to_device_async(device, table->memory.get(), staging, bytes, stream);
  if (capture_id != 0) {
    table->staging = std::move(staging);  // every replay copies from it again
  } else {
    table->ready = rt.record_event(device, stream);
  }
  auto* base = static_cast<const uint8_t*>(table->memory.get());
  table->params = reinterpret_cast<const ParamSlot*>(base);
  table->emas = reinterpret_cast<const EmaSlot*>(base + pbytes);
  table->rows = reinterpret_cast<const Row*>(base + pbytes + ebytes);
  return table;
}

}  // namespace

void free_released_tables() {
  ReleasedTables& r = released_tables();
  if (!r.any.load(std::memory_order_acquire)) return;
  std::vector<std::shared_ptr<const DeviceTable>> tables;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    tables.swap(r.tables);
    r.any.store(false, std::memory_order_release);
  }
}  // the tables are freed here, outside the lock

size_t num_released_tables() {
  ReleasedTables& r = released_tables();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.tables.size();
}

DeviceView device_table_for_launch(const Plan& plan, int device, device::Stream stream) {
  device::Runtime& rt = device::runtime();
  const device::CaptureState capture = rt.capture_state(stream);
  if (!capture.capturing) free_released_tables();
  std::lock_guard<std::mutex> lock(plan.table_mutex);
  if (!capture.capturing) {
    if (!plan.table) {
      plan.table = upload_table(rt, plan, device, stream, 0);
    } else if (plan.table->stream != stream) {
      DeviceTable& t = *plan.table;
      auto& seen = t.waited_streams;
      if (std::find(seen.begin(), seen.end(), stream) == seen.end()) {
        // Once per stream: order it after the upload, and keep the caching
        // allocator from reusing the memory before this stream is done with it.
        rt.wait_event(stream, t.ready);
        rt.record_stream(t.memory, stream);
        seen.push_back(stream);
      }
    }
    const DeviceTable& t = *plan.table;
    return {t.params, t.emas, t.rows};
  }
  // Inside capture: the graph reads the table at every replay, so it holds a
  // reference until it and its launches are gone, whatever becomes of the plan.
  std::shared_ptr<DeviceTable> table;
  if (plan.table) {
    table = plan.table;
    if (!table->known_complete) {
      // Captured work does not wait for work queued before the capture began:
      // wait (once per table) for the upload to finish.
      rt.sync_event(table->ready);
      table->known_complete = true;
    }
  } else if (plan.capture_table && plan.capture_table->capture_id == capture.id) {
    table = plan.capture_table;
  } else {
    table = upload_table(rt, plan, device, stream, capture.id);
    plan.capture_table = table;
  }
  rt.retain_in_graph(capture.graph,
                     [keep = std::shared_ptr<const DeviceTable>(table)]() mutable noexcept {
                       release_table(std::move(keep));
                     });
  return {table->params, table->emas, table->rows};
}

void upload_unless_capturing(const Plan& plan, int device) {
  if (plan.rows.empty()) return;
  // Ordered on `device`'s current stream, unless a graph is being captured
  // there (then the first launch uploads a table for that graph).
  device::Runtime& rt = device::runtime();
  const device::Stream stream = rt.current_stream(device);
  if (!rt.capture_state(stream).capturing) device_table_for_launch(plan, device, stream);
}

void run_plan(const Plan& plan, const UpdateArgs& args) {
  if (plan.num_elements == 0 || args.skipped) return;
  if (plan.device.is_cpu()) return ema_update_cpu(plan, args);
#ifdef FUSED_EMA_WITH_CUDA
  if (plan.device.is_cuda()) return ema_update_cuda(plan, args);
#endif
  TORCH_CHECK(false, "fused_ema: this build has no CUDA kernels (it was built with "
              "FUSED_EMA_CUDA=0 or against a CPU-only torch); rebuild with a CUDA torch "
              "and nvcc, or set FUSED_EMA_BACKEND=python");
}

}  // namespace fused_ema
