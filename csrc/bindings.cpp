// The binding layer: the torch operators (TORCH_LIBRARY) and the pybind11
// module with the plan object. All work happens in plan.cpp and the kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include <unordered_map>

#include "offload.h"
#include "plan.h"

namespace fused_ema {
namespace {

void multi_ema_update_op(at::TensorList emas, at::TensorList params,
                         c10::ArrayRef<double> decays,
                         const std::optional<at::Tensor>& decay_tensor,
                         const std::optional<at::Tensor>& skip, bool stochastic, int64_t seed,
                         int64_t step, const std::optional<at::Tensor>& step_tensor) {
  // The lists say how many decays there are; make_update_args checks the count given.
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
  int64_t num_decays = has_tensor ? decay_tensor->numel() : static_cast<int64_t>(decays.size());
  if (!params.empty() && emas.size() % params.size() == 0) {
    num_decays = static_cast<int64_t>(emas.size() / params.size());
  }
  auto plan = cached_plan(emas, params, num_decays);
  run_plan(*plan, make_update_args(*plan, decays, decay_tensor, skip,
                                   {stochastic, seed, step, step_tensor}));
}

void ema_update_op(at::TensorList emas, at::TensorList params, double decay,
                   const std::optional<at::Tensor>& decay_tensor,
                   const std::optional<at::Tensor>& skip, bool stochastic, int64_t seed,
                   int64_t step, const std::optional<at::Tensor>& step_tensor) {
  multi_ema_update_op(emas, params, c10::ArrayRef<double>(decay), decay_tensor, skip,
                      stochastic, seed, step, step_tensor);
}

// A plan bound to its tensors: built (and validated) once, then each update
// first checks that none of them is stale (nothing is written if one is).
class BoundPlan {
 public:
  // `stochastic`: every update rounds the (bf16) EMAs stochastically with `seed`.
  BoundPlan(std::vector<at::Tensor> emas, std::vector<at::Tensor> params, int64_t num_decays,
            bool stochastic, int64_t seed)
      : emas_(std::move(emas)), params_(std::move(params)),
        plan_(build_plan(emas_, params_, num_decays)), stochastic_(stochastic), seed_(seed) {
    if (stochastic_) check_stochastic(*plan_);
  }

  // -1 once updated; else the index of the first stale tensor (see first_stale),
  // and nothing was written: the caller names it, or binds again. `step` (or
  // `step_tensor`) keys stochastic rounding's random bits.
  int64_t update(const std::vector<double>& decays, const std::optional<at::Tensor>& decay_tensor,
                 const std::optional<at::Tensor>& skip, int64_t step,
                 const std::optional<at::Tensor>& step_tensor) const {
    const int64_t stale = first_stale(*plan_, emas_, params_);
    if (C10_UNLIKELY(stale >= 0)) return stale;
    run_plan(*plan_, make_update_args(*plan_, decays, decay_tensor, skip,
                                      {stochastic_, seed_, step, step_tensor}));
    return -1;
  }

  const Plan& plan() const { return *plan_; }

 private:
  std::vector<at::Tensor> emas_, params_;
  std::shared_ptr<const Plan> plan_;
  bool stochastic_;
  int64_t seed_;
};

// Where CPython keeps a dict version tag (PEP 509, up to 3.13), an owner dict
// whose tag has not moved since its entries were last verified is not looked
// into: a training step costs one load per module dict, not one lookup per
// tensor (measured on ResNet-50, GPT-2 small and a model of 5,000 modules: see
// docs/DESIGN.md, "The per-step check").
#ifndef FUSED_EMA_DICT_VERSION_TAG
#define FUSED_EMA_DICT_VERSION_TAG (PY_VERSION_HEX < 0x030E0000)
#endif

// What FusedEMA checks before each update beyond its plans' own check: every
// watched object is still what its owner holds under its key (a parameter in
// its module's dict, a submodule in its parent's, a DTensor's local shard:
// `module.weight = nn.Parameter(...)` replaces it there, not in the plan), and
// the tensors the plans reach only through a copy or a view (staging sources,
// strided tensors) are not stale, by the plans' own rule (first_changed).
class Watch {
 public:
  Watch(std::vector<at::Tensor> tensors, const std::vector<pybind11::object>& owners,
        const std::vector<pybind11::object>& keys, const std::vector<pybind11::object>& objects)
      : tensors_(std::move(tensors)), keys_(plan_key({}, tensors_)) {
    TORCH_CHECK_VALUE(owners.size() == keys.size() && keys.size() == objects.size(),
                      "fused_ema: Watch needs as many keys and objects as owners");
    // Entries of one owner side by side (in first-seen order), each with its index.
    std::unordered_map<PyObject*, size_t> group_of;
    std::vector<std::vector<size_t>> members;
    for (size_t j = 0; j < owners.size(); ++j) {
      auto [it, added] = group_of.emplace(owners[j].ptr(), members.size());
      if (added) members.emplace_back();
      members[it->second].push_back(j);
    }
    for (const auto& m : members) {
      Group g{owners[m[0]], entries_.size(), entries_.size() + m.size()};
      for (size_t j : m) entries_.push_back({keys[j], objects[j], static_cast<int64_t>(j)});
      groups_.push_back(std::move(g));
    }
  }

  // -1 when nothing changed; else the first change: a tensor's index, or
  // tensors.size() + j for entry j. Needs the GIL (it reads Python objects).
  int64_t first_changed() {
    const int64_t t = fused_ema::first_changed(tensors_, keys_.data());
    if (t >= 0) return t;
    const int64_t base = static_cast<int64_t>(tensors_.size());
    int64_t first = -1;
    for (Group& g : groups_) {
      PyObject* owner = g.owner.ptr();
      const bool is_dict = PyDict_Check(owner);
#if FUSED_EMA_DICT_VERSION_TAG
      const uint64_t tag = is_dict ? reinterpret_cast<PyDictObject*>(owner)->ma_version_tag : 0;
      if (is_dict && g.verified && tag == g.tag) continue;
#endif
      bool same = true;
      for (size_t e = g.begin; e < g.end; ++e) {
        if (C10_UNLIKELY(lookup(owner, is_dict, entries_[e].key.ptr()) !=
                         entries_[e].object.ptr())) {
          same = false;
          if (first < 0 || entries_[e].index < first) first = entries_[e].index;
        }
      }
#if FUSED_EMA_DICT_VERSION_TAG
      g.tag = tag;
      g.verified = same && is_dict;
#endif
    }
    return first < 0 ? -1 : base + first;
  }

  size_t size() const { return tensors_.size() + entries_.size(); }

 private:
  // owner[key] (borrowed) for a dict, else the identity of getattr(owner, key).
  static PyObject* lookup(PyObject* owner, bool is_dict, PyObject* key) {
    if (is_dict) {
      PyObject* now = PyDict_GetItemWithError(owner, key);
      if (now == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
      return now;
    }
    PyObject* now = PyObject_GetAttr(owner, key);  // a new reference
    if (now == nullptr) throw pybind11::error_already_set();
    Py_DECREF(now);  // only its identity is compared (the owner keeps it alive)
    return now;
  }
  struct Entry {
    pybind11::object key, object;
    int64_t index;  // its position in the constructor's lists
  };
  struct Group {
    pybind11::object owner;
    size_t begin = 0, end = 0;  // its entries in entries_
    uint64_t tag = 0;
    bool verified = false;      // every entry matched when the owner had version `tag`
  };
  std::vector<at::Tensor> tensors_;
  std::vector<TensorKey> keys_;
  std::vector<Entry> entries_;
  std::vector<Group> groups_;
};

bool compiled_with_cuda() {
#ifdef FUSED_EMA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool compiled_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fused_ema

TORCH_LIBRARY(fused_ema, m) {
  m.def("ema_update_(Tensor(a!)[] emas, Tensor[] params, float decay, "
        "Tensor? decay_tensor=None, Tensor? skip=None, bool stochastic=False, int seed=0, "
        "int step=0, Tensor? step_tensor=None) -> ()");
  m.def("multi_ema_update_(Tensor(a!)[] emas, Tensor[] params, float[] decays, "
        "Tensor? decay_tensor=None, Tensor? skip=None, bool stochastic=False, int seed=0, "
        "int step=0, Tensor? step_tensor=None) -> ()");
}

TORCH_LIBRARY_IMPL(fused_ema, CPU, m) {
  m.impl("ema_update_", &fused_ema::ema_update_op);
  m.impl("multi_ema_update_", &fused_ema::multi_ema_update_op);
}

#ifdef FUSED_EMA_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_ema, CUDA, m) {
  m.impl("ema_update_", &fused_ema::ema_update_op);
  m.impl("multi_ema_update_", &fused_ema::multi_ema_update_op);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using fused_ema::BoundPlan;
  py::class_<BoundPlan>(m, "Plan", "A validated chunk plan bound to its tensors.")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, bool, int64_t>(),
           py::arg("emas"), py::arg("params"), py::arg("num_decays"),
           py::arg("stochastic") = false, py::arg("seed") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("update_", &BoundPlan::update, py::arg("decays"), py::arg("decay_tensor"),
           py::arg("skip"), py::arg("step") = 0, py::arg("step_tensor") = py::none(),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_rows", [](const BoundPlan& b) { return b.plan().rows.size(); })
      .def_property_readonly("num_tensors", [](const BoundPlan& b) { return b.plan().num_tensors; })
      .def_property_readonly("num_decays", [](const BoundPlan& b) { return b.plan().num_decays; })
      .def_property_readonly("num_elements",
                             [](const BoundPlan& b) { return b.plan().num_elements; });
  py::class_<fused_ema::Watch>(
      m, "Watch",
      "Whether anything FusedEMA's plans cannot see changed: tensors by the plans' rule, and "
      "objects by identity in their owner (a dict, or an object's attribute).")
      .def(py::init<std::vector<at::Tensor>, const std::vector<py::object>&,
                    const std::vector<py::object>&, const std::vector<py::object>&>(),
           py::arg("tensors"), py::arg("owners"), py::arg("keys"), py::arg("objects"))
      .def("first_changed", &fused_ema::Watch::first_changed)
      .def("__len__", &fused_ema::Watch::size);
  m.def("compiled_with_cuda", &fused_ema::compiled_with_cuda);
  m.def("compiled_with_openmp", &fused_ema::compiled_with_openmp);
  m.def("cpu_isa", &fused_ema::ema_cpu_isa,
        "The instruction set the CPU update loop runs with here (picked at run time).");
  m.attr("CHUNK") = fused_ema::kChunk;
  m.attr("MAX_DECAYS") = fused_ema::kMaxDecays;
  fused_ema::register_offload(m);
}
