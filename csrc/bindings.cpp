// The binding layer: the torch operators (TORCH_LIBRARY) and the pybind11
// module with the plan object. All work happens in plan.cpp and the kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include <unordered_map>

#include "plan.h"

namespace fused_ema {
namespace {

void multi_ema_update_op(at::TensorList emas, at::TensorList params,
                         c10::ArrayRef<double> decays,
                         const std::optional<at::Tensor>& decay_tensor,
                         const std::optional<at::Tensor>& skip) {
  // The lists say how many decays there are; make_update_args checks the count given.
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
  int64_t num_decays = has_tensor ? decay_tensor->numel() : static_cast<int64_t>(decays.size());
  if (!params.empty() && emas.size() % params.size() == 0) {
    num_decays = static_cast<int64_t>(emas.size() / params.size());
  }
  auto plan = cached_plan(emas, params, num_decays);
  run_plan(*plan, make_update_args(*plan, decays, decay_tensor, skip));
}

void ema_update_op(at::TensorList emas, at::TensorList params, double decay,
                   const std::optional<at::Tensor>& decay_tensor,
                   const std::optional<at::Tensor>& skip) {
  multi_ema_update_op(emas, params, c10::ArrayRef<double>(decay), decay_tensor, skip);
}

// A plan bound to its tensors: built (and validated) once, then each update
// only checks that the tensors are still the same ones.
class BoundPlan {
 public:
  BoundPlan(std::vector<at::Tensor> emas, std::vector<at::Tensor> params, int64_t num_decays)
      : emas_(std::move(emas)), params_(std::move(params)),
        plan_(build_plan(emas_, params_, num_decays)) {}

  void update(const std::vector<double>& decays, const std::optional<at::Tensor>& decay_tensor,
              const std::optional<at::Tensor>& skip) const {
    check_same_tensors(*plan_, emas_, params_);
    run_plan(*plan_, make_update_args(*plan_, decays, decay_tensor, skip));
  }

  const Plan& plan() const { return *plan_; }

 private:
  std::vector<at::Tensor> emas_, params_;
  std::shared_ptr<const Plan> plan_;
};

// What FusedEMA checks before each update, beyond what the plan checks: every
// tracked tensor is still the object in its module's dict (assigning
// `module.weight = nn.Parameter(...)` replaces it there, not in the plan), and
// a few tensors (staging copies, strided views) still have their data pointer.
//
// Entries are grouped by dict. Where CPython keeps a dict version tag (PEP 509,
// up to 3.13), a dict whose tag has not moved since the last check is not looked
// into: a training step then costs one load per module dict, not one lookup per
// tensor. A moved tag (any write to that dict) means its entries are looked up.
class IdentityWatch {
 public:
  IdentityWatch(const std::vector<pybind11::object>& dicts,
                const std::vector<pybind11::object>& keys,
                const std::vector<pybind11::object>& objects,
                std::vector<at::Tensor> tensors)
      : tensors_(std::move(tensors)) {
    TORCH_CHECK_VALUE(dicts.size() == keys.size() && keys.size() == objects.size(),
                      "fused_ema: IdentityWatch needs as many keys and objects as dicts");
    std::unordered_map<PyObject*, size_t> group_of;
    std::vector<std::vector<size_t>> members;
    for (size_t i = 0; i < dicts.size(); ++i) {
      TORCH_CHECK_TYPE(PyDict_Check(dicts[i].ptr()), "fused_ema: IdentityWatch watches dicts, "
                       "got ", Py_TYPE(dicts[i].ptr())->tp_name);
      auto [it, added] = group_of.emplace(dicts[i].ptr(), members.size());
      if (added) members.emplace_back();
      members[it->second].push_back(i);
    }
    for (size_t g = 0; g < members.size(); ++g) {
      Group group;
      group.dict = dicts[members[g][0]];
      group.begin = keys_.size();
      for (size_t i : members[g]) {
        keys_.push_back(keys[i]);
        objects_.push_back(objects[i]);
      }
      group.end = keys_.size();
      groups_.push_back(std::move(group));
    }
    data_.reserve(tensors_.size());
    for (const auto& t : tensors_) data_.push_back(t.unsafeGetTensorImpl()->data());
  }

  // True when nothing watched changed. Needs the GIL (it reads Python dicts).
  bool intact() {
    for (Group& g : groups_) {
      PyObject* dict = g.dict.ptr();
#if PY_VERSION_HEX < 0x030E0000
      const uint64_t tag = reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
      if (g.checked && tag == g.tag) continue;
#endif
      for (size_t i = g.begin; i < g.end; ++i) {
        PyObject* now = PyDict_GetItemWithError(dict, keys_[i].ptr());  // borrowed
        if (C10_UNLIKELY(now != objects_[i].ptr())) {
          if (now == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
          return false;
        }
      }
#if PY_VERSION_HEX < 0x030E0000
      g.tag = tag;
      g.checked = true;
#endif
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (C10_UNLIKELY(tensors_[i].unsafeGetTensorImpl()->data() != data_[i])) return false;
    }
    return true;
  }

  size_t size() const { return keys_.size() + tensors_.size(); }

 private:
  struct Group {
    pybind11::object dict;
    size_t begin = 0, end = 0;  // its entries in keys_ / objects_
    uint64_t tag = 0;
    bool checked = false;
  };
  std::vector<Group> groups_;
  std::vector<pybind11::object> keys_, objects_;
  std::vector<at::Tensor> tensors_;
  std::vector<const void*> data_;
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
        "Tensor? decay_tensor=None, Tensor? skip=None) -> ()");
  m.def("multi_ema_update_(Tensor(a!)[] emas, Tensor[] params, float[] decays, "
        "Tensor? decay_tensor=None, Tensor? skip=None) -> ()");
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
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t>(),
           py::arg("emas"), py::arg("params"), py::arg("num_decays"),
           py::call_guard<py::gil_scoped_release>())
      .def("update_", &BoundPlan::update, py::arg("decays"), py::arg("decay_tensor"),
           py::arg("skip"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_rows", [](const BoundPlan& b) { return b.plan().rows.size(); })
      .def_property_readonly("num_tensors", [](const BoundPlan& b) { return b.plan().num_tensors; })
      .def_property_readonly("num_decays", [](const BoundPlan& b) { return b.plan().num_decays; })
      .def_property_readonly("num_elements",
                             [](const BoundPlan& b) { return b.plan().num_elements; });
  py::class_<fused_ema::IdentityWatch>(
      m, "IdentityWatch",
      "dicts[i][keys[i]] is objects[i] for every i, and tensors keep their data pointers.")
      .def(py::init<const std::vector<py::object>&, const std::vector<py::object>&,
                    const std::vector<py::object>&, std::vector<at::Tensor>>(),
           py::arg("dicts"), py::arg("keys"), py::arg("objects"), py::arg("tensors"))
      .def("intact", &fused_ema::IdentityWatch::intact)
      .def("__len__", &fused_ema::IdentityWatch::size);
  m.def("compiled_with_cuda", &fused_ema::compiled_with_cuda);
  m.def("compiled_with_openmp", &fused_ema::compiled_with_openmp);
  m.def("cpu_isa", &fused_ema::ema_cpu_isa,
        "The instruction set the CPU update loop runs with here (picked at run time).");
  m.attr("CHUNK") = fused_ema::kChunk;
  m.attr("MAX_DECAYS") = fused_ema::kMaxDecays;
}
