// The host-memory EMA's pipeline (see offload.h): the chunking, the copies on
// a side stream gated by the host's progress, and the CPU update per chunk.
#include "offload.h"

#include <ATen/ATen.h>
#include <torch/extension.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace fused_ema {
namespace {

constexpr int64_t kSegmentAlign = 64;  // bytes: each segment starts a cache line

int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

}  // namespace

std::vector<OffloadChunk> pack_offload_chunks(const std::vector<int64_t>& numels,
                                              const std::vector<int>& elem_sizes,
                                              int64_t chunk_bytes) {
  TORCH_CHECK(numels.size() == elem_sizes.size(), "fused_ema: one element size per tensor");
  TORCH_CHECK_VALUE(chunk_bytes >= kSegmentAlign, "fused_ema: chunk_bytes must be at least ",
                    kSegmentAlign);
  std::vector<OffloadChunk> chunks;
  OffloadChunk cur;
  auto flush = [&] {
    if (!cur.segments.empty()) chunks.push_back(std::move(cur));
    cur = OffloadChunk{};
  };
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t es = elem_sizes[i];
    int64_t start = 0;
    while (start < numels[i]) {
      int64_t offset = align_up(cur.bytes, kSegmentAlign);
      int64_t room = (chunk_bytes - offset) / es;
      if (room <= 0) {
        flush();
        offset = 0;
        room = chunk_bytes / es;
      }
      TORCH_CHECK_VALUE(room > 0, "fused_ema: chunk_bytes is smaller than one element");
      const int64_t length = std::min(room, numels[i] - start);
      cur.segments.push_back({static_cast<int32_t>(i), start, length, offset});
      cur.bytes = offset + length * es;
      start += length;
    }
  }
  flush();
  return chunks;
}

HostOffload::HostOffload(std::vector<at::Tensor> emas, std::vector<at::Tensor> params,
                         int64_t num_decays, int device, int64_t cap_bytes, int64_t chunk_bytes)
    : emas_(std::move(emas)), params_(std::move(params)), num_decays_(num_decays),
      device_(device), runtime_(&device::runtime()) {
  const int64_t n = static_cast<int64_t>(params_.size());
  TORCH_CHECK_VALUE(num_decays_ >= 1 && num_decays_ <= kMaxDecays &&
                        static_cast<int64_t>(emas_.size()) == n * num_decays_,
                    "fused_ema: the offload needs num_decays lists of one EMA per param");
  TORCH_CHECK_VALUE(cap_bytes > 0 && chunk_bytes > 0,
                    "fused_ema: the staging cap and chunk size must be positive");
  chunk_bytes = std::min(chunk_bytes, cap_bytes);
  std::vector<int64_t> numels;
  std::vector<int> sizes;
  // build_plan's rules, naming the tensors as the caller knows them (the chunk
  // plans below see slices).
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params_[i];
    check_param(p, i, params_[0].device());
    TORCH_CHECK_VALUE(p.is_contiguous(), "fused_ema: params[", i, "] must be contiguous "
                      "(pass a 1-D view of a dense tensor)");
    for (int64_t k = 0; k < num_decays_; ++k) {
      const at::Tensor& e = emas_[k * n + i];
      check_ema(e, p, num_decays_, k, i, c10::Device(at::kCPU));
      TORCH_CHECK_VALUE(e.is_contiguous(), "fused_ema: ", ema_name(num_decays_, k, i),
                        " must be contiguous");
    }
    numels.push_back(p.numel());
    sizes.push_back(static_cast<int>(p.element_size()));
  }
  chunks_ = pack_offload_chunks(numels, sizes, chunk_bytes);
  int64_t used = 0;
  for (const OffloadChunk& c : chunks_) used = std::max(used, c.bytes);
  slot_bytes_ = align_up(std::max<int64_t>(used, 1), kSegmentAlign);
  num_slots_ = std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(chunks_.size()),
                                                      cap_bytes / slot_bytes_));
  staging_ = runtime_->alloc_pinned(static_cast<size_t>(num_slots_ * slot_bytes_));
  control_ = runtime_->alloc_pinned(static_cast<size_t>(num_slots_ * 4 + 8));
  consumed_ = static_cast<uint32_t*>(control_.get());
  for (int64_t s = 0; s < num_slots_; ++s) __atomic_store_n(consumed_ + s, 0u, __ATOMIC_RELEASE);
  skip_host_ = static_cast<char*>(control_.get()) + num_slots_ * 4;
  issued_.assign(static_cast<size_t>(num_slots_), 0);
  consumed_count_.assign(static_cast<size_t>(num_slots_), 0);
  side_ = runtime_->side_stream(device_);

  // The copies (runs of adjacent device memory become one) and each chunk's CPU
  // plan: its EMA slices <- views of its slot.
  auto* base = static_cast<char*>(staging_.get());
  for (size_t c = 0; c < chunks_.size(); ++c) {
    const OffloadChunk& chunk = chunks_[c];
    char* slot = base + static_cast<int64_t>(c % num_slots_) * slot_bytes_;
    std::vector<OffloadCopy> copies;
    std::vector<at::Tensor> ps;
    std::vector<std::vector<at::Tensor>> es(num_decays_);
    for (const OffloadSegment& s : chunk.segments) {
      const at::Tensor& p = params_[s.tensor];
      const int64_t es_bytes = p.element_size();
      const char* src = static_cast<const char*>(p.data_ptr()) + s.start * es_bytes;
      bool merged = false;
      if (!copies.empty()) {
        OffloadCopy& last = copies.back();
        const char* last_src = static_cast<const char*>(params_[last.tensor].data_ptr()) +
                               last.start * params_[last.tensor].element_size();
        if (last_src + last.bytes == src && last.offset + last.bytes == s.offset) {
          last.bytes += s.length * es_bytes;  // adjacent on both sides: one copy
          merged = true;
        }
      }
      if (!merged) copies.push_back({s.tensor, s.start, s.offset, s.length * es_bytes});
      ps.push_back(at::from_blob(slot + s.offset, {s.length},
                                 p.options().device(at::kCPU).pinned_memory(false)));
      for (int64_t k = 0; k < num_decays_; ++k) {
        es[k].push_back(emas_[k * n + s.tensor].view(-1).narrow(0, s.start, s.length));
      }
    }
    std::vector<at::Tensor> flat;
    for (auto& list : es) flat.insert(flat.end(), list.begin(), list.end());
    plans_.push_back(build_plan(flat, ps, num_decays_));
    copies_.push_back(std::move(copies));
  }
}

HostOffload::~HostOffload() {
  // A pending update (issued, never consumed) still copies into the staging:
  // wait for it before the pinned memory goes back to the allocator.
  if (issued_pending_ && !events_.empty()) runtime_->sync_event(events_.back());
  for (device::Event e : events_) runtime_->destroy_event(e);
  for (device::Event e : old_events_) runtime_->destroy_event(e);
  if (after_optimizer_) runtime_->destroy_event(after_optimizer_);
}

int64_t HostOffload::num_copies() const {
  int64_t n = 0;
  for (const auto& c : copies_) n += static_cast<int64_t>(c.size());
  return n;
}

int64_t HostOffload::staged_bytes() const {
  int64_t n = 0;
  for (const auto& c : copies_) {
    for (const OffloadCopy& x : c) n += x.bytes;
  }
  return n;
}

void HostOffload::issue(device::Stream stream, const std::optional<at::Tensor>& skip) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!issued_pending_, "fused_ema: the offload's previous update was not consumed");
  const bool has_skip = skip.has_value() && skip->defined();
  if (has_skip) {  // checked before anything is queued
    skip_kind_ = checked_skip_kind(*skip);
    TORCH_CHECK_VALUE(params_.empty() || skip->device() == params_[0].device(),
                      "fused_ema: skip is on ", skip->device(), " but the params are on ",
                      params_[0].device());
  }
  if (stream == nullptr) stream = runtime_->current_stream(device_);
  for (device::Event e : old_events_) runtime_->destroy_event(e);
  old_events_ = std::move(events_);
  events_.clear();
  if (after_optimizer_) runtime_->destroy_event(after_optimizer_);
  // The copies follow everything queued on the training stream so far.
  after_optimizer_ = runtime_->record_event(device_, stream);
  runtime_->wait_event(side_, after_optimizer_);
  has_skip_ = has_skip;
  if (has_skip_) {
    runtime_->copy_to_host_async(device_, skip_host_, skip->data_ptr(),
                                 static_cast<size_t>(skip->element_size()), side_);
    // The caller may drop the flag now: its memory stays the side stream's until the copy.
    runtime_->record_stream(skip->storage().data_ptr(), side_);
  }
  auto* base = static_cast<char*>(staging_.get());
  for (size_t c = 0; c < chunks_.size(); ++c) {
    const size_t slot = c % static_cast<size_t>(num_slots_);
    // The slot's previous chunk must have been consumed by the host.
    runtime_->wait_host_value(device_, side_, consumed_ + slot, issued_[slot]);
    ++issued_[slot];
    char* dst = base + static_cast<int64_t>(slot) * slot_bytes_;
    for (const OffloadCopy& x : copies_[c]) {
      const at::Tensor& p = params_[x.tensor];
      const char* src = static_cast<const char*>(p.data_ptr()) + x.start * p.element_size();
      runtime_->copy_to_host_async(device_, dst + x.offset, src, static_cast<size_t>(x.bytes),
                                   side_);
    }
    events_.push_back(runtime_->record_event(device_, side_));
  }
  issued_pending_ = true;
}

void HostOffload::order_before_writes(device::Stream stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (events_.empty()) return;
  if (stream == nullptr) stream = runtime_->current_stream(device_);
  runtime_->wait_event(stream, events_.back());
}

bool HostOffload::consume(const std::vector<double>& decays) {
  std::vector<device::Event> events;
  bool has_skip;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(issued_pending_, "fused_ema: the offload has no update to consume");
    events = events_;
    has_skip = has_skip_;
  }
  bool skipped = false;
  std::exception_ptr error;
  for (size_t c = 0; c < chunks_.size(); ++c) {
    const size_t slot = c % static_cast<size_t>(num_slots_);
    runtime_->sync_event(events[c]);  // this (worker) thread waits, not the training one
    if (c == 0 && has_skip) skipped = read_scalar(skip_host_, skip_kind_, 0) != 0.0;
    if (!skipped && !error) {
      try {
        run_plan(*plans_[c], make_update_args(*plans_[c], decays, std::nullopt, std::nullopt));
      } catch (...) {
        error = std::current_exception();  // the slots are still released below
      }
    }
    runtime_->signal_host_value(consumed_ + slot, ++consumed_count_[slot]);  // slot free
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    issued_pending_ = false;
  }
  if (error) std::rethrow_exception(error);
  return !skipped;
}

void register_offload(pybind11::module_& m) {
  namespace py = pybind11;
  // A stream handle (cudaStream_t as an integer); None: the device's current stream.
  auto as_stream = [](std::optional<intptr_t> s) {
    return reinterpret_cast<device::Stream>(s.value_or(0));
  };
  py::class_<HostOffload>(m, "HostOffload", py::module_local(),
                          "A host-memory EMA's copies and per-chunk CPU update (offload.h).")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int, int64_t,
                    int64_t>(),
           py::arg("emas"), py::arg("params"), py::arg("num_decays"), py::arg("device"),
           py::arg("cap_bytes") = kDefaultOffloadCapBytes,
           py::arg("chunk_bytes") = kDefaultOffloadChunkBytes)
      .def("issue", [as_stream](HostOffload& o, std::optional<intptr_t> stream,
                                const std::optional<at::Tensor>& skip) {
             o.issue(as_stream(stream), skip);
           }, py::arg("stream") = py::none(), py::arg("skip") = py::none())
      .def("order_before_writes", [as_stream](HostOffload& o, std::optional<intptr_t> stream) {
             o.order_before_writes(as_stream(stream));
           }, py::arg("stream") = py::none())
      .def("consume", &HostOffload::consume, py::arg("decays"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_chunks", &HostOffload::num_chunks)
      .def_property_readonly("num_slots", &HostOffload::num_slots)
      .def_property_readonly("slot_bytes", &HostOffload::slot_bytes)
      .def_property_readonly("num_copies", &HostOffload::num_copies)
      .def_property_readonly("staged_bytes", &HostOffload::staged_bytes);
  m.def("pack_offload_chunks", [](const std::vector<int64_t>& numels,
                                  const std::vector<int>& elem_sizes, int64_t chunk_bytes) {
    std::vector<std::vector<std::tuple<int32_t, int64_t, int64_t, int64_t>>> out;
    for (const OffloadChunk& c : pack_offload_chunks(numels, elem_sizes, chunk_bytes)) {
      out.emplace_back();
      for (const OffloadSegment& s : c.segments) {
        out.back().emplace_back(s.tensor, s.start, s.length, s.offset);
      }
    }
    return out;
  });
  m.attr("OFFLOAD_CAP_BYTES") = kDefaultOffloadCapBytes;
  m.attr("OFFLOAD_CHUNK_BYTES") = kDefaultOffloadChunkBytes;
}

}  // namespace fused_ema
