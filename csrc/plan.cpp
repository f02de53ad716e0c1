#include "plan.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
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

std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Double;
    default: return std::nullopt;
  }
}

// Where the elements start (0 for an empty or storage-less tensor): storage
// base plus offset, read without TensorImpl::data()'s out-of-line checks.
C10_ALWAYS_INLINE uintptr_t data_address(const c10::TensorImpl& t) {
  const c10::StorageImpl* storage = t.unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr || t.numel() == 0) return 0;
  return reinterpret_cast<uintptr_t>(storage->data()) +
         static_cast<uintptr_t>(t.storage_offset()) * t.itemsize();
}

// Read straight from the TensorImpl: this runs for every tensor on every
// update of a bound plan, so it reads the const data pointer (Tensor::data_ptr() is a mutable
// access with copy-on-write checks) and skips the Tensor wrappers.
C10_ALWAYS_INLINE TensorKey key_of(const c10::TensorImpl& t) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the sizes
  const c10::IntArrayRef sizes = t.sizes();
  for (int64_t s : sizes) {
    h = (h ^ static_cast<uint64_t>(s)) * 1099511628211ull;
  }
  h = (h ^ static_cast<uint64_t>(sizes.size())) * 1099511628211ull;
  const c10::Device device = t.device();
  const int64_t meta = static_cast<int64_t>(c10::typeMetaToScalarType(t.dtype())) |
                       (static_cast<int64_t>(device.type()) << 8) |
                       (static_cast<int64_t>(device.index() + 1) << 16) |
                       (static_cast<int64_t>(t.is_contiguous()) << 32);
  return {data_address(t), t.numel(), meta, h};
}

C10_ALWAYS_INLINE TensorKey key_of(const at::Tensor& t) { return key_of(*t.unsafeGetTensorImpl()); }

void check_shape_and_layout(const at::Tensor& ema, const at::Tensor& param,
                            const std::string& ename, const std::string& pname,
                            const c10::Device& device) {
  TORCH_CHECK_VALUE(ema.sizes() == param.sizes(), "fused_ema: ", ename, " has shape ",
                    ema.sizes(), " but ", pname, " has shape ", param.sizes());
  TORCH_CHECK_VALUE(ema.device() == device, "fused_ema: ", ename, " is on ", ema.device(),
                    " but ", pname, " is on ", param.device(),
                    "; keep the EMA on its params' device (FusedEMA(device=...) "
                    "handles an EMA kept elsewhere)");
  TORCH_CHECK_TYPE(to_dtype(ema.scalar_type()).has_value(), "fused_ema: ", ename,
                   " has dtype ", ema.scalar_type(),
                   "; an EMA must be float32, float16, bfloat16 or float64");
  TORCH_CHECK_VALUE(ema.is_contiguous(), "fused_ema: ", ename,
                    " is not contiguous; the EMA must be a contiguous tensor");
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
    TORCH_CHECK_VALUE(p.defined(), "fused_ema: ", param_name(i), " is undefined");
    TORCH_CHECK_VALUE(p.device() == device, "fused_ema: ", param_name(i), " is on ",
                      p.device(), " but params[0] is on ", device,
                      "; one update runs on one device");
    auto pdt = to_dtype(p.scalar_type());
    TORCH_CHECK_TYPE(pdt.has_value(), "fused_ema: ", param_name(i), " has dtype ",
                     p.scalar_type(), "; params must be float32, float16, bfloat16 or float64");
    TORCH_CHECK_VALUE(p.is_contiguous(), "fused_ema: ", param_name(i),
                      " is not contiguous; pass contiguous params");
    plan->params[i] = {p.data_ptr(), p.numel(), *pdt, 0};
    const auto pbegin = reinterpret_cast<uintptr_t>(p.data_ptr());
    if (p.numel() > 0) {
      param_spans.push_back({pbegin, pbegin + p.numel() * p.element_size(), -1, i});
    }
    for (int64_t k = 0; k < num_decays; ++k) {
      const at::Tensor& e = emas[k * n + i];
      const std::string ename = ema_name(num_decays, k, i);
      TORCH_CHECK_VALUE(e.defined(), "fused_ema: ", ename, " is undefined");
      check_shape_and_layout(e, p, ename, param_name(i), device);
      plan->emas[k * n + i] = {e.data_ptr(), *to_dtype(e.scalar_type()), 0};
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

  if (device.is_cuda() && !plan->rows.empty()) {
    // One device buffer: [ParamSlot x n][EmaSlot x K*n][Row x rows], all 8-byte aligned.
    const size_t pbytes = plan->params.size() * sizeof(ParamSlot);
    const size_t ebytes = plan->emas.size() * sizeof(EmaSlot);
    const size_t rbytes = plan->rows.size() * sizeof(Row);
    std::vector<uint8_t> host(pbytes + ebytes + rbytes);
    std::memcpy(host.data(), plan->params.data(), pbytes);
    std::memcpy(host.data() + pbytes, plan->emas.data(), ebytes);
    std::memcpy(host.data() + pbytes + ebytes, plan->rows.data(), rbytes);
#ifdef FUSED_EMA_WITH_CUDA
    plan->device_table = upload_table_cuda(host.data(), host.size(), device);
#else
    TORCH_CHECK(false, "fused_ema: this build has no CUDA kernels; rebuild with a CUDA torch "
                "and nvcc, or set FUSED_EMA_BACKEND=python");
#endif
    auto* dbase = static_cast<const uint8_t*>(plan->device_table.get());
    plan->device_params = reinterpret_cast<const ParamSlot*>(dbase);
    plan->device_emas = reinterpret_cast<const EmaSlot*>(dbase + pbytes);
    plan->device_rows = reinterpret_cast<const Row*>(dbase + pbytes + ebytes);
  }
  return plan;
}

std::shared_ptr<const Plan> cached_plan(at::TensorList emas, at::TensorList params,
                                        int64_t num_decays) {
  // Small LRU: a training loop reuses one or two tensor lists.
  constexpr size_t kCapacity = 8;
  static std::mutex mutex;
  static std::list<std::shared_ptr<const Plan>> cache;
  if (params.empty() || static_cast<int64_t>(emas.size()) != params.size() * num_decays) {
    return build_plan(emas, params, num_decays);  // reports the error, or an empty plan
  }
  std::vector<TensorKey> key = plan_key(emas, params);
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if ((*it)->num_decays == num_decays && (*it)->key == key) {
        cache.splice(cache.begin(), cache, it);
        return cache.front();
      }
    }
  }
  auto plan = build_plan(emas, params, num_decays);
  std::lock_guard<std::mutex> lock(mutex);
  cache.push_front(plan);
  if (cache.size() > kCapacity) cache.pop_back();
  return plan;
}

void check_same_tensors(const Plan& plan, at::TensorList emas, at::TensorList params) {
  const int64_t n = plan.num_tensors;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n &&
                  static_cast<int64_t>(emas.size()) == n * plan.num_decays,
              "fused_ema: the plan was built for other tensor lists");
  // The hot loop only compares; the message is built after the first mismatch.
  // It is bound by memory latency (each tensor's TensorImpl and StorageImpl live
  // apart), so the objects of later tensors are prefetched while one is read.
  // (Splitting the loop over threads was slower on a busy 2-core machine.)
  auto first_mismatch = [](at::TensorList tensors, const TensorKey* want) -> int64_t {
    constexpr int64_t kAhead = 8;
    const int64_t count = static_cast<int64_t>(tensors.size());
    for (int64_t i = 0; i < count; ++i) {
      if (i + 2 * kAhead < count) {
        const auto* far =
            reinterpret_cast<const char*>(tensors[i + 2 * kAhead].unsafeGetTensorImpl());
        __builtin_prefetch(far);
        __builtin_prefetch(far + 64);
        __builtin_prefetch(far + 128);
      }
      if (i + kAhead < count) {
        __builtin_prefetch(
            tensors[i + kAhead].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
      }
      if (C10_UNLIKELY(key_of(tensors[i]) != want[i])) return i;
    }
    return -1;
  };
  int64_t bad = first_mismatch(params, plan.key.data());
  if (bad < 0) {
    const int64_t j = first_mismatch(emas, plan.key.data() + n);
    if (j >= 0) bad = n + j;
  }
  if (C10_LIKELY(bad < 0)) return;
  const std::string name = bad < n ? param_name(bad)
                                   : ema_name(plan.num_decays, (bad - n) / n, (bad - n) % n);
  TORCH_CHECK(false, "fused_ema: ", name,
              " was replaced or resized since the plan was built (its storage, shape, "
              "dtype or layout changed); build a new EMAPlan");
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

UpdateArgs make_update_args(const Plan& plan, c10::ArrayRef<double> decays,
                            const std::optional<at::Tensor>& decay_tensor,
                            const std::optional<at::Tensor>& skip) {
  UpdateArgs args;
  args.num_decays = plan.num_decays;
  const bool multi = plan.num_decays > 1;
  if (decay_tensor.has_value() && decay_tensor->defined()) {
    const at::Tensor& t = *decay_tensor;
    TORCH_CHECK_VALUE(t.numel() == plan.num_decays, "fused_ema: got ", t.numel(),
                      " decay values for ", plan.num_decays, " EMA list(s)");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "fused_ema: a decay tensor must be float32 or float64, got ",
                     t.scalar_type());
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
    TORCH_CHECK_VALUE(s.numel() == 1, "fused_ema: skip must hold one value, got ", s.numel());
    auto kind = to_scalar_kind(s.scalar_type());
    TORCH_CHECK_TYPE(kind.has_value(), "fused_ema: skip must be a bool, integer, float32 or "
                     "float64 tensor, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.device().is_cpu() || s.device() == plan.device ||
                          plan.num_tensors == 0,
                      "fused_ema: skip is on ", s.device(), " but the EMAs are on ",
                      plan.device);
    if (s.device().is_cpu()) {
      args.skipped = read_scalar(s.data_ptr(), *kind, 0) != 0.0;  // host memory: no sync
    } else {
      args.skip_ptr = s.data_ptr();
      args.skip_kind = *kind;
    }
  }
  return args;
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
