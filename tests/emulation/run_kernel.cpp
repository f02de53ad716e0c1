// Executes the CUDA kernel's device code (csrc/ema_kernel.cuh, included as-is)
// on the CPU and compares every EMA bit for bit with the CPU kernel
// (csrc/ema_cpu.cpp) on the same plan (csrc/plan.cpp). Built with
// AddressSanitizer and UBSan by tests/test_device_emulation.py: every tensor
// lives in a heap buffer of exactly its size (an overrun is a heap-buffer-
// overflow), and UBSan's alignment check stands in for the GPU's rule that a
// 16-byte vector access must be 16-byte aligned.
//
// Usage: run_kernel GROUP   (GROUP: pairs, offsets, multi, edge, many, launch)
// Prints "GROUP: N cases passed" and exits 0, or describes the first mismatch
// and exits 1.
#include "cuda_shim.h"  // first: the CUDA built-ins the kernel uses

#include "ema_kernel.cuh"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

extern "C" const char* __asan_default_options() {
  return "detect_leaks=0";  // libtorch's static state is not ours to check
}

namespace fused_ema {
namespace {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float: return "f32";
    case DType::Half: return "f16";
    case DType::BFloat16: return "bf16";
    case DType::Double: return "f64";
  }
  return "?";
}

at::ScalarType scalar_type(DType d) {
  switch (d) {
    case DType::Float: return at::kFloat;
    case DType::Half: return at::kHalf;
    case DType::BFloat16: return at::kBFloat16;
    case DType::Double: return at::kDouble;
  }
  return at::kFloat;
}

const DType kDTypes[] = {DType::Float, DType::Half, DType::BFloat16, DType::Double};

// A heap buffer of exactly `bytes` bytes (16-byte aligned, like cudaMalloc),
// so that reading one byte past its end is caught by ASan.
struct Buffer {
  char* data = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n) : bytes(n) {
    void* p = nullptr;
    if (posix_memalign(&p, 16, n == 0 ? 1 : n) != 0) std::abort();
    data = static_cast<char*>(p);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(data); }
};

template <typename T>
std::unique_ptr<Buffer> copy_to_buffer(const std::vector<T>& v) {
  auto b = std::make_unique<Buffer>(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(b->data, v.data(), b->bytes);
  return b;
}

// One tensor of a case: its size, dtypes and the element offsets at which the
// param and its EMAs start inside their buffers (0..7: misaligned for 16 bytes).
struct TensorSpec {
  int64_t numel;
  DType param_dtype;
  std::vector<DType> ema_dtype;  // one per decay
  int param_offset;
  int ema_offset;
};

enum class DecayFrom { Host, DeviceFloat, DeviceDouble };
enum class Skip { None, DeviceFalse, DeviceTrue };

struct Case {
  std::string name;
  std::vector<TensorSpec> tensors;
  std::vector<double> decays;
  DecayFrom decay_from = DecayFrom::Host;
  Skip skip = Skip::None;
  int multiprocessor_count = 2;  // small: grid-stride loops get exercised
  bool mixed_kernel = false;     // run the any-dtype kernel even when one dtype pair would do
  bool non_finite_emas = false;  // EMAs of NaN, +inf, -inf: decay 0 must still copy the param
  // Params of NaN, +-inf, -0.0 and EMAs of -0.0, +-inf, NaN, 1.5: decay 1 must keep the EMA.
  bool non_finite_params = false;
  bool stochastic = false;       // stochastic rounding (bf16 EMAs), seed 7, step 123456789
  bool device_step = false;      // ... with the step read on the device
};

// Fills `b` (elements of `dtype`) with `values` over and over.
void fill_cycle(Buffer& b, DType dtype, int64_t n, std::initializer_list<double> values) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* p = reinterpret_cast<T*>(b.data);
    const double* v = values.begin();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(v[i % values.size()]);
  });
}
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::mt19937 rng(12345);

// A buffer of `offset + numel` elements of `dtype`, filled with random values.
std::unique_ptr<Buffer> random_buffer(DType dtype, int offset, int64_t numel) {
  const int64_t n = offset + numel;
  auto b = std::make_unique<Buffer>(static_cast<size_t>(n) * dtype_size(dtype));
  std::uniform_real_distribution<double> dist(-2.0, 2.0);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* p = reinterpret_cast<T*>(b->data);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(dist(rng));
  });
  return b;
}

std::unique_ptr<Buffer> clone(const Buffer& b) {
  auto c = std::make_unique<Buffer>(b.bytes);
  std::memcpy(c->data, b.data, b.bytes);
  return c;
}

at::Tensor view(const Buffer& b, DType dtype, int offset, int64_t numel) {
  return at::from_blob(b.data + static_cast<size_t>(offset) * dtype_size(dtype), {numel},
                       at::TensorOptions().dtype(scalar_type(dtype)));
}

std::string describe(const Case& c, const TensorSpec& t, int64_t i) {
  std::string s = c.name + ": tensor " + std::to_string(i) + " (numel " +
                  std::to_string(t.numel) + ", param " + dtype_name(t.param_dtype) + " at +" +
                  std::to_string(t.param_offset) + ", EMA";
  for (DType d : t.ema_dtype) s += std::string(" ") + dtype_name(d);
  return s + " at +" + std::to_string(t.ema_offset) + ")";
}

// Runs one case through the emulated kernel and the CPU kernel; false on a mismatch.
bool run_case(const Case& c) {
  const int64_t n = static_cast<int64_t>(c.tensors.size());
  const int num_decays = static_cast<int>(c.decays.size());
  std::vector<std::unique_ptr<Buffer>> params, param_copy, emas, ref_emas;
  std::vector<at::Tensor> param_t, ema_t, ref_ema_t;
  for (const TensorSpec& t : c.tensors) {
    params.push_back(random_buffer(t.param_dtype, t.param_offset, t.numel));
    if (c.non_finite_params) {
      fill_cycle(*params.back(), t.param_dtype, t.param_offset + t.numel, {kNaN, kInf, -kInf, -0.0});
    }
    param_copy.push_back(clone(*params.back()));
    param_t.push_back(view(*params.back(), t.param_dtype, t.param_offset, t.numel));
  }
  ema_t.resize(n * num_decays);
  ref_ema_t.resize(n * num_decays);
  emas.resize(n * num_decays);
  ref_emas.resize(n * num_decays);
  for (int k = 0; k < num_decays; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      const TensorSpec& t = c.tensors[i];
      const int64_t j = k * n + i;
      emas[j] = random_buffer(t.ema_dtype[k], t.ema_offset, t.numel);
      if (c.non_finite_emas) {
        dispatch_dtype(t.ema_dtype[k], [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          const T bad[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                           -std::numeric_limits<T>::infinity()};
          T* e = reinterpret_cast<T*>(emas[j]->data);
          for (int64_t x = 0; x < t.ema_offset + t.numel; ++x) e[x] = bad[x % 3];
        });
      }
      if (c.non_finite_params) {
        fill_cycle(*emas[j], t.ema_dtype[k], t.ema_offset + t.numel, {-0.0, kInf, -kInf, kNaN, 1.5});
      }
      ref_emas[j] = clone(*emas[j]);
      ema_t[j] = view(*emas[j], t.ema_dtype[k], t.ema_offset, t.numel);
      ref_ema_t[j] = view(*ref_emas[j], t.ema_dtype[k], t.ema_offset, t.numel);
    }
  }

  // The real plan code builds the work list; its arrays become the "device
  // table", each in an exact-size buffer.
  const auto plan = build_plan(ema_t, param_t, num_decays);
  const auto ref_plan = build_plan(ref_ema_t, param_t, num_decays);
  Rounding rounding;
  rounding.stochastic = c.stochastic;
  rounding.seed = 7;
  rounding.step = 123456789;
  const UpdateArgs host_args =
      make_update_args(*plan, c.decays, std::nullopt, std::nullopt, rounding);
  UpdateArgs args = host_args;
  std::unique_ptr<Buffer> decay_buf, skip_buf, step_buf;
  if (c.device_step) {
    // The step read on the device: the host copy holds another step, so reading
    // it instead gives other random bits.
    step_buf = std::make_unique<Buffer>(sizeof(int64_t));
    *reinterpret_cast<int64_t*>(step_buf->data) = rounding.step;
    args.step = rounding.step + 1;
    args.step_ptr = step_buf->data;
    args.step_kind = ScalarKind::Int64;
  }
  if (c.decay_from != DecayFrom::Host) {
    // Decays read on the device: the host copies hold garbage, so reading
    // them instead shows up as a mismatch.
    const bool f32 = c.decay_from == DecayFrom::DeviceFloat;
    decay_buf = std::make_unique<Buffer>(num_decays * (f32 ? 4 : 8));
    for (int k = 0; k < num_decays; ++k) {
      if (f32) {
        reinterpret_cast<float*>(decay_buf->data)[k] = static_cast<float>(c.decays[k]);
      } else {
        reinterpret_cast<double*>(decay_buf->data)[k] = c.decays[k];
      }
      args.decays[k] = 0.5 + 0.01 * k;
    }
    args.decay_ptr = decay_buf->data;
    args.decay_kind = f32 ? ScalarKind::Float : ScalarKind::Double;
  }
  if (c.skip != Skip::None) {
    skip_buf = std::make_unique<Buffer>(1);
    skip_buf->data[0] = c.skip == Skip::DeviceTrue ? 1 : 0;
    args.skip_ptr = skip_buf->data;
    args.skip_kind = ScalarKind::Bool;
  }
  UpdateArgs ref_args = host_args;
  if (c.decay_from == DecayFrom::DeviceFloat) {
    for (int k = 0; k < num_decays; ++k) ref_args.decays[k] = static_cast<float>(c.decays[k]);
  }

  const int64_t num_rows = static_cast<int64_t>(plan->rows.size());
  if (num_rows > 0) {
    auto d_params = copy_to_buffer(plan->params);
    auto d_emas = copy_to_buffer(plan->emas);
    auto d_rows = copy_to_buffer(plan->rows);
    const auto cfg =
        kernel::launch_config(num_rows, plan->num_elements, c.multiprocessor_count);
    // A grid too small for the work would still be correct (grid-stride), but
    // leave SMs idle: one warp per segment, up to one full wave of blocks.
    const int64_t segments = plan->num_elements / kernel::kSegment;
    const int64_t wave = int64_t{c.multiprocessor_count} * kernel::kMinBlocksPerSM;
    if (int64_t{cfg.grid} < std::min(wave, (segments + kernel::kWarps - 1) / kernel::kWarps)) {
      std::printf("FAIL %s: a grid of %u blocks for %lld segments on %d SMs\n", c.name.c_str(),
                  cfg.grid, static_cast<long long>(segments), c.multiprocessor_count);
      return false;
    }
    const kernel::KernelFn kernel_fn =
        c.mixed_kernel ? (num_decays == 1 ? kernel::mixed_ema_update_kernel<false>
                                          : kernel::mixed_ema_update_kernel<true>)
                       : kernel::select_kernel(*plan);
    const auto* dp = reinterpret_cast<const ParamSlot*>(d_params->data);
    const auto* de = reinterpret_cast<const EmaSlot*>(d_emas->data);
    const auto* dr = reinterpret_cast<const Row*>(d_rows->data);
    emu::launch(cfg.grid, cfg.block,
                [&] { kernel_fn(dp, de, dr, num_rows, plan->num_tensors, args); });
  }
  if (c.skip != Skip::DeviceTrue && ref_plan->num_elements > 0) {
    ema_update_cpu(*ref_plan, ref_args);
  }

  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(params[i]->data, param_copy[i]->data, params[i]->bytes) != 0) {
      std::printf("FAIL %s: the param was written\n", describe(c, c.tensors[i], i).c_str());
      return false;
    }
  }
  for (int64_t j = 0; j < n * num_decays; ++j) {
    const int64_t i = j % n, k = j / n;
    const TensorSpec& t = c.tensors[i];
    const int size = dtype_size(t.ema_dtype[k]);
    for (size_t b = 0; b < emas[j]->bytes; ++b) {
      if (emas[j]->data[b] == ref_emas[j]->data[b]) continue;
      const int64_t e = static_cast<int64_t>(b / size) - t.ema_offset;
      double got = 0, want = 0;
      dispatch_dtype(t.ema_dtype[k], [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        got = static_cast<double>(reinterpret_cast<const T*>(emas[j]->data)[b / size]);
        want = static_cast<double>(reinterpret_cast<const T*>(ref_emas[j]->data)[b / size]);
      });
      std::printf("FAIL %s: EMA %lld element %lld is %.17g, the CPU kernel gives %.17g\n",
                  describe(c, t, i).c_str(), static_cast<long long>(k),
                  static_cast<long long>(e), got, want);
      return false;
    }
    // Decay 0 copies the (finite) param: nothing of a non-finite EMA is left.
    if (c.non_finite_emas && c.decays[k] == 0.0 && !ema_t[j].isfinite().all().item<bool>()) {
      std::printf("FAIL %s: EMA %lld of decay 0 is not the param\n", describe(c, t, i).c_str(),
                  static_cast<long long>(k));
      return false;
    }
  }
  return true;
}

const int64_t kSizes[] = {0, 1, 7, 8, 9, 1023, 1024, 65535, 65536, 65537, 200003};
const std::vector<double> kOneDecay = {0.999};

// All 16 (param, EMA) dtype pairs, every size, several offset pairs: one
// launch per pair with one tensor per (size, offsets).
std::vector<Case> pairs_cases() {
  std::vector<Case> cases;
  const int offsets[][2] = {{0, 0}, {1, 0}, {0, 3}, {5, 7}, {4, 4}};
  for (DType pd : kDTypes) {
    for (DType ed : kDTypes) {
      Case c;
      c.name = std::string("pairs ") + dtype_name(pd) + "->" + dtype_name(ed);
      c.decays = {0.9};
      for (int64_t size : kSizes) {
        for (auto& o : offsets) c.tensors.push_back({size, pd, {ed}, o[0], o[1]});
      }
      cases.push_back(c);
      c.name += " (mixed kernel)";
      c.mixed_kernel = true;
      cases.push_back(c);
    }
  }
  return cases;
}

// Params and EMAs misaligned independently (element offsets 0..7 each).
std::vector<Case> offsets_cases() {
  std::vector<Case> cases;
  const DType pairs[][2] = {{DType::Float, DType::Float},       {DType::BFloat16, DType::Float},
                            {DType::Half, DType::Half},         {DType::Double, DType::Double},
                            {DType::BFloat16, DType::BFloat16}, {DType::Float, DType::Half}};
  for (auto& pr : pairs) {
    Case c;
    c.name = std::string("offsets ") + dtype_name(pr[0]) + "->" + dtype_name(pr[1]);
    c.decays = {0.3};  // weight >= 0.5: the other branch of the lerp
    for (int po = 0; po < 8; ++po) {
      for (int eo = 0; eo < 8; ++eo) {
        for (int64_t size : {1, 8, 9, 1023, 65537}) c.tensors.push_back({size, pr[0], {pr[1]}, po, eo});
      }
    }
    cases.push_back(c);
  }
  return cases;
}

// 2 and 8 decays with mixed EMA dtypes per decay (the CPU kernel: a pass per EMA), and
// with one EMA dtype for all decays (the CPU kernel: all EMAs of a row in one loop).
std::vector<Case> multi_cases() {
  std::vector<Case> cases;
  for (int num_decays : {2, 8}) {
    // uniform 1: fp32 EMAs (fp64 for fp64 params), the common case; 2: the param's dtype.
    for (int uniform = 0; uniform < 3; ++uniform) {
    for (DType pd : kDTypes) {
      const DType uniform_ema =
          uniform == 2 || pd == DType::Double ? pd : DType::Float;
      Case c;
      c.name = "multi K=" + std::to_string(num_decays) + " param " + dtype_name(pd) +
               (uniform ? std::string(" EMAs ") + dtype_name(uniform_ema) : std::string(" mixed EMAs"));
      const double all[] = {0.999, 0.3, 0.9, 0.5, 0.75, 0.0, 1.0, 0.123};
      c.decays.assign(all, all + num_decays);
      // Equal offsets give rows whose arrays all reach pack alignment (at
      // index 0, 2 or 5 of the row); unequal ones mostly run one at a time.
      int t = 0;
      for (int64_t size : kSizes) {
        const int offsets[][2] = {{0, 0}, {2, 2}, {5, 5}, {(3 * t) % 8, (5 * t + 1) % 8}};
        for (auto& o : offsets) {
          std::vector<DType> ed;
          for (int k = 0; k < num_decays; ++k) ed.push_back(uniform ? uniform_ema : kDTypes[(k + t) % 4]);
          c.tensors.push_back({size, pd, ed, o[0], o[1]});
          ++t;
        }
      }
      cases.push_back(c);
    }
    }
  }
  return cases;
}

// Decay 0 and 1, decays and skip read through device pointers.
std::vector<Case> edge_cases() {
  std::vector<Case> cases;
  auto base = [](const std::string& name, std::vector<double> decays) {
    Case c;
    c.name = name;
    c.decays = decays;
    int t = 0;
    for (DType pd : kDTypes) {
      for (int64_t size : {1, 9, 1024, 65537}) {
        std::vector<DType> ed;
        for (size_t k = 0; k < decays.size(); ++k) ed.push_back(kDTypes[(k + t) % 4]);
        c.tensors.push_back({size, pd, ed, t % 8, (t * 3) % 8});
        ++t;
      }
    }
    return c;
  };
  cases.push_back(base("decay 0", {0.0}));
  cases.push_back(base("decay 1", {1.0}));
  cases.push_back(base("decays 0 and 1", {0.0, 1.0}));
  for (std::vector<double> d : {std::vector<double>{0.0}, std::vector<double>{0.0, 0.9, 0.0}}) {
    for (bool mixed : {false, true}) {
      Case c = base("decay 0 over NaN/inf EMAs K=" + std::to_string(d.size()), d);
      c.non_finite_emas = true;
      c.mixed_kernel = mixed;
      cases.push_back(c);
    }
  }
  for (DType pd : kDTypes) {  // decay 1 keeps the EMA: each fixed kernel, the one-pass loop
    for (DType ed : kDTypes) {
      for (std::vector<double> d : {std::vector<double>{1.0}, std::vector<double>{1.0, 0.9, 1.0}}) {
        Case c;
        c.name = std::string("decay 1 under NaN/inf params K=") + std::to_string(d.size()) + " " +
                 dtype_name(pd) + "->" + dtype_name(ed);
        c.decays = d;
        c.non_finite_params = true;
        for (int64_t size : {1, 9, 1024, 65537}) {
          c.tensors.push_back({size, pd, std::vector<DType>(d.size(), ed), 1, 1});
        }
        c.tensors.push_back({1024, pd, std::vector<DType>(d.size(), ed), 0, 0});
        cases.push_back(c);
      }
    }
  }
  for (bool mixed : {false, true}) {  // and the any-dtype kernel, EMA dtypes mixed
    Case c = base("decay 1 under NaN/inf params, mixed EMA dtypes", {1.0, 0.9, 1.0});
    c.non_finite_params = true;
    c.mixed_kernel = mixed;
    cases.push_back(c);
  }
  for (DType pd : kDTypes) {  // one dtype pair for every decay: the CPU kernel's one-pass loop
    for (DType ed : kDTypes) {
      Case c;
      c.name = std::string("decay 0 over NaN/inf EMAs K=3 ") + dtype_name(pd) + "->" +
               dtype_name(ed);
      c.decays = {0.0, 0.9, 0.0};
      c.non_finite_emas = true;
      for (int64_t size : {1, 9, 1024, 65537}) c.tensors.push_back({size, pd, {ed, ed, ed}, 1, 1});
      cases.push_back(c);
    }
  }
  for (DType pd : kDTypes) {  // each fixed-dtype kernel
    for (DType ed : kDTypes) {
      Case c;
      c.name = std::string("decay 0 over NaN/inf EMAs ") + dtype_name(pd) + "->" + dtype_name(ed);
      c.decays = {0.0};
      c.non_finite_emas = true;
      for (int64_t size : {1, 9, 1024, 65537}) c.tensors.push_back({size, pd, {ed}, 1, 1});
      for (int64_t size : {9, 1024}) c.tensors.push_back({size, pd, {ed}, 0, 0});
      cases.push_back(c);
    }
  }
  for (auto from : {DecayFrom::DeviceFloat, DecayFrom::DeviceDouble}) {
    const std::string kind = from == DecayFrom::DeviceFloat ? "float" : "double";
    for (std::vector<double> d : {std::vector<double>{0.999}, std::vector<double>{0.99, 0.3, 0.9}}) {
      Case c = base("device " + kind + " decays K=" + std::to_string(d.size()), d);
      c.decay_from = from;
      cases.push_back(c);
    }
  }
  for (auto skip : {Skip::DeviceFalse, Skip::DeviceTrue}) {
    for (std::vector<double> d : {std::vector<double>{0.999}, std::vector<double>{0.99, 0.3}}) {
      Case c = base(std::string("device skip=") + (skip == Skip::DeviceTrue ? "1" : "0") +
                        " K=" + std::to_string(d.size()),
                    d);
      c.skip = skip;
      cases.push_back(c);
    }
  }
  return cases;
}

// Stochastic rounding of bf16 EMAs: every kernel that can write a bf16 EMA (the
// fixed-dtype kernel of each param dtype, the any-dtype kernel with one and
// several decays), odd sizes and offsets, the step from a device pointer, the
// ends (decay 0 and 1) and NaN/inf on both sides.
std::vector<Case> stochastic_cases() {
  std::vector<Case> cases;
  const DType bf16 = DType::BFloat16;
  for (DType pd : kDTypes) {
    for (bool mixed : {false, true}) {
      for (std::vector<double> d : {std::vector<double>{0.9}, std::vector<double>{0.3},
                                    std::vector<double>{0.999, 0.0, 0.3, 1.0}}) {
        Case c;
        c.name = std::string("stochastic ") + dtype_name(pd) + "->bf16 K=" +
                 std::to_string(d.size()) + (mixed ? " (mixed kernel)" : "");
        c.decays = d;
        c.stochastic = true;
        c.mixed_kernel = mixed;
        int t = 0;
        for (int64_t size : kSizes) {
          const int offsets[][2] = {{0, 0}, {1, 1}, {(3 * t) % 8, (5 * t + 1) % 8}};
          for (auto& o : offsets) {
            c.tensors.push_back({size, pd, std::vector<DType>(d.size(), bf16), o[0], o[1]});
            ++t;
          }
        }
        cases.push_back(c);
      }
    }
    for (std::vector<double> d : {std::vector<double>{0.99}, std::vector<double>{0.99, 0.5}}) {
      Case c;
      c.name = std::string("stochastic, device step ") + dtype_name(pd) + "->bf16 K=" +
               std::to_string(d.size());
      c.decays = d;
      c.stochastic = true;
      c.device_step = true;
      for (int64_t size : {1, 9, 1024, 65537}) {
        c.tensors.push_back({size, pd, std::vector<DType>(d.size(), bf16), 0, 0});
      }
      cases.push_back(c);
    }
    for (std::vector<double> d : {std::vector<double>{0.0}, std::vector<double>{0.0, 0.9, 0.0}}) {
      Case c;
      c.name = std::string("stochastic, decay 0 over NaN/inf EMAs ") + dtype_name(pd) +
               "->bf16 K=" + std::to_string(d.size());
      c.decays = d;
      c.stochastic = true;
      c.non_finite_emas = true;
      for (int64_t size : {1, 9, 1024, 65537}) {
        c.tensors.push_back({size, pd, std::vector<DType>(d.size(), bf16), 1, 1});
      }
      cases.push_back(c);
    }
    for (std::vector<double> d : {std::vector<double>{1.0}, std::vector<double>{0.9},
                                  std::vector<double>{1.0, 0.9, 0.0}}) {
      Case c;
      c.name = std::string("stochastic under NaN/inf params ") + dtype_name(pd) + "->bf16 K=" +
               std::to_string(d.size());
      c.decays = d;
      c.stochastic = true;
      c.non_finite_params = true;
      for (int64_t size : {1, 9, 1024, 65537}) {
        c.tensors.push_back({size, pd, std::vector<DType>(d.size(), bf16), 1, 1});
      }
      cases.push_back(c);
    }
  }
  return cases;
}

// Many tensors of random sizes, dtypes and offsets in one launch.
std::vector<Case> many_cases() {
  std::vector<Case> cases;
  for (std::vector<double> d : {std::vector<double>{0.9999}, std::vector<double>{0.999, 0.9, 0.3}}) {
    Case c;
    c.name = "many K=" + std::to_string(d.size());
    c.decays = d;
    c.multiprocessor_count = 3;
    std::uniform_int_distribution<int> dt(0, 3), off(0, 7), small(0, 3000);
    for (int i = 0; i < 400; ++i) {
      const int64_t size = i % 50 == 0 ? 70000 + small(rng) : small(rng);
      std::vector<DType> ed;
      for (size_t k = 0; k < d.size(); ++k) ed.push_back(kDTypes[dt(rng)]);
      c.tensors.push_back({size, kDTypes[dt(rng)], ed, off(rng), off(rng)});
    }
    cases.push_back(c);
  }
  return cases;
}

// The launch of the production configuration (an H100's 132 SMs) on a few shapes.
std::vector<Case> launch_cases() {
  std::vector<Case> cases;
  for (int64_t size : {int64_t{1} << 20, int64_t{3000}}) {
    Case c;
    c.name = "launch 132 SMs numel " + std::to_string(size);
    c.decays = {0.999};
    c.multiprocessor_count = 132;
    c.tensors.push_back({size, DType::BFloat16, {DType::Float}, 0, 0});
    cases.push_back(c);
  }
  return cases;
}

}  // namespace
}  // namespace fused_ema

int main(int argc, char** argv) {
  using namespace fused_ema;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s pairs|offsets|multi|edge|many|launch|stochastic\n",
                 argv[0]);
    return 2;
  }
  const std::string group = argv[1];
  std::vector<Case> cases;
  if (group == "pairs") cases = pairs_cases();
  else if (group == "offsets") cases = offsets_cases();
  else if (group == "multi") cases = multi_cases();
  else if (group == "edge") cases = edge_cases();
  else if (group == "many") cases = many_cases();
  else if (group == "launch") cases = launch_cases();
  else if (group == "stochastic") cases = stochastic_cases();
  else {
    std::fprintf(stderr, "unknown group %s\n", group.c_str());
    return 2;
  }
  int64_t tensors = 0;
  for (const Case& c : cases) {
    if (!run_case(c)) return 1;
    tensors += static_cast<int64_t>(c.tensors.size());
  }
  std::printf("%s: %zu cases (%lld tensors) passed\n", group.c_str(), cases.size(),
              static_cast<long long>(tensors));
  return 0;
}
