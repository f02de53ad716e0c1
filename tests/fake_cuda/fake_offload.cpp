// A fake CUDA runtime whose streams are queues, for the host-memory EMA's
// pipeline (csrc/offload.cpp): work runs only once what it waits on is done,
// as on a GPU, so an order bug shows up in the values as well as in the checks.
//
// - Streams hold queued ops (copies, event waits, waits on a host-written word,
//   test "kernels" that write device memory, holds that stand for a kernel
//   still running); every runtime call runs whatever has become runnable.
// - An event fires once its stream has run every op queued before its record.
// - Hazards are checked as ops run: a copy that runs before a write queued
//   earlier to its source (the copy not ordered after the optimizer), a write
//   that runs before a copy queued earlier from its memory (the next step not
//   ordered after the copy).
// - A host signal (signal_host_value) runs what waited for it at once, before
//   the host goes on: the earliest a GPU could, so a slot released too early is
//   overwritten before the host has read it, every time.
// - Host waits (sync_event) are logged with the thread: one on the training
//   thread is an error. Device-to-host bytes and copies are counted, and the
//   pinned memory alive (and its peak).
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "device_runtime.h"

namespace fused_ema {
namespace fake {
namespace {

struct QEvent {
  intptr_t stream;
  size_t position;  // fires when the stream has run this many ops
  bool destroyed = false;
};

struct QOp {
  enum Kind { Copy, WaitEvent, WaitValue, Write, Hold } kind;
  int64_t seq = 0;  // enqueue order, over all streams
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
  QEvent* event = nullptr;
  const uint32_t* flag = nullptr;
  uint32_t value = 0;
  std::vector<char> data;  // Write
  int64_t hold = 0;        // Hold
};

struct QStream {
  std::vector<QOp> ops;
  size_t done = 0;
};

bool overlaps(const void* a, size_t na, const void* b, size_t nb) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + nb && y < x + na;
}

class QueuedRuntime final : public device::Runtime {
 public:
  std::recursive_mutex mu;
  std::map<intptr_t, QStream> streams;
  intptr_t next_stream = 1000;
  int64_t next_seq = 0;
  int64_t next_hold = 1;
  std::set<int64_t> released;
  std::vector<std::unique_ptr<QEvent>> events;
  std::vector<std::string> errors;
  std::vector<std::string> calls;  // "T:name" on the training thread, "W:name" elsewhere
  std::thread::id training = std::this_thread::get_id();
  int64_t d2h_bytes = 0, d2h_copies = 0, pinned_live = 0, pinned_peak = 0;
  int64_t training_host_waits = 0, host_waits = 0;

  void log(const char* name) {
    calls.push_back(std::string(std::this_thread::get_id() == training ? "T:" : "W:") + name);
  }

  bool fired(const QEvent* e) { return streams[e->stream].done >= e->position; }

  bool ready(const QOp& op) {
    switch (op.kind) {
      case QOp::WaitEvent: return fired(op.event);
      case QOp::WaitValue: return __atomic_load_n(op.flag, __ATOMIC_ACQUIRE) >= op.value;
      case QOp::Hold: return released.count(op.hold) > 0;
      default: return true;
    }
  }

  // Ops queued before `op` (by seq) that have not run, of the kind `kind`,
  // touching [p, p + n).
  bool earlier_pending(const QOp& op, QOp::Kind kind, const void* p, size_t n) {
    for (auto& [id, s] : streams) {
      for (size_t i = s.done; i < s.ops.size(); ++i) {
        const QOp& o = s.ops[i];
        if (o.seq >= op.seq || o.kind != kind || &o == &op) continue;
        const void* q = kind == QOp::Write ? o.dst : o.src;
        if (overlaps(p, n, q, o.bytes)) return true;
      }
    }
    return false;
  }

  void run(const QOp& op) {
    if (op.kind == QOp::Copy) {
      if (earlier_pending(op, QOp::Write, op.src, op.bytes)) {
        errors.push_back("a device-to-host copy ran before a write queued earlier to its "
                         "source (not ordered after the optimizer)");
      }
      std::memcpy(op.dst, op.src, op.bytes);
    } else if (op.kind == QOp::Write) {
      if (earlier_pending(op, QOp::Copy, op.dst, op.bytes)) {
        errors.push_back("a write ran before a copy queued earlier from its memory (the "
                         "next step not ordered after the copy)");
      }
      std::memcpy(op.dst, op.data.data(), op.bytes);
    }
  }

  void pump() {
    bool progress = true;
    while (progress) {
      progress = false;
      for (auto& [id, s] : streams) {
        while (s.done < s.ops.size() && ready(s.ops[s.done])) {
          run(s.ops[s.done]);
          ++s.done;
          progress = true;
        }
      }
    }
  }

  QOp& enqueue(intptr_t stream, QOp op) {
    op.seq = next_seq++;
    auto& ops = streams[stream].ops;
    ops.push_back(std::move(op));
    return ops.back();
  }

  size_t stuck() {
    size_t n = 0;
    for (auto& [id, s] : streams) n += s.ops.size() - s.done;
    return n;
  }

  // ---- device::Runtime ----
  device::Stream current_stream(int) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("current_stream");
    return reinterpret_cast<device::Stream>(intptr_t{1});
  }
  device::CaptureState capture_state(device::Stream) override { return {}; }
  at::DataPtr alloc_device(size_t, int, device::Stream) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    errors.push_back("alloc_device: not used by the offload");
    return {};
  }
  at::DataPtr alloc_pinned(size_t bytes) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("alloc_pinned");
    const size_t n = std::max<size_t>(bytes, 1);
    void* p = std::malloc(n);
    std::memset(p, 0xAB, n);
    pinned_live += static_cast<int64_t>(n);
    pinned_peak = std::max(pinned_peak, pinned_live);
    auto* ctx = new std::pair<QueuedRuntime*, size_t>(this, n);
    return at::DataPtr(p, ctx, &QueuedRuntime::free_pinned, at::Device(at::kCPU));
  }
  static void free_pinned(void* ctx) {
    auto* c = static_cast<std::pair<QueuedRuntime*, size_t>*>(ctx);
    std::lock_guard<std::recursive_mutex> lock(c->first->mu);
    c->first->pinned_live -= static_cast<int64_t>(c->second);
    delete c;  // the memory is leaked on purpose: a late copy into it stays harmless
  }
  void copy_to_device_async(int, void*, const at::DataPtr&, size_t, device::Stream) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    errors.push_back("copy_to_device_async: not used by the offload");
  }
  void record_stream(const at::DataPtr&, device::Stream) override {}
  device::Event record_event(int, device::Stream stream) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("record_event");
    const auto s = reinterpret_cast<intptr_t>(stream);
    events.push_back(std::make_unique<QEvent>(QEvent{s, streams[s].ops.size()}));
    pump();
    return events.back().get();
  }
  void wait_event(device::Stream stream, device::Event event) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("wait_event");
    auto* e = static_cast<QEvent*>(event);
    if (e == nullptr || e->destroyed) {
      errors.push_back("wait on a missing or destroyed event");
      return;
    }
    QOp op{QOp::WaitEvent};
    op.event = e;
    enqueue(reinterpret_cast<intptr_t>(stream), std::move(op));
    pump();
  }
  void sync_event(device::Event event) override {
    auto* e = static_cast<QEvent*>(event);
    {
      std::lock_guard<std::recursive_mutex> lock(mu);
      log("sync_event");
      ++host_waits;
      if (std::this_thread::get_id() == training) {
        ++training_host_waits;
        errors.push_back("a host wait on the training thread");
      }
      if (e == nullptr || e->destroyed) {
        errors.push_back("host wait on a missing or destroyed event");
        return;
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (true) {
      {
        std::lock_guard<std::recursive_mutex> lock(mu);
        pump();
        if (fired(e)) return;
        if (std::chrono::steady_clock::now() > deadline) {
          errors.push_back("a host wait that never completes");
          return;
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  void destroy_event(device::Event event) noexcept override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    auto* e = static_cast<QEvent*>(event);
    if (e->destroyed) errors.push_back("an event destroyed twice");
    e->destroyed = true;
  }
  void retain_in_graph(device::Graph, std::function<void()>) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    errors.push_back("retain_in_graph: not used by the offload");
  }
  device::Stream side_stream(int) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("side_stream");
    return reinterpret_cast<device::Stream>(next_stream++);
  }
  void copy_to_host_async(int, void* dst, const void* src, size_t bytes,
                          device::Stream stream) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("copy_to_host");
    d2h_bytes += static_cast<int64_t>(bytes);
    ++d2h_copies;
    QOp op{QOp::Copy};
    op.dst = dst;
    op.src = src;
    op.bytes = bytes;
    enqueue(reinterpret_cast<intptr_t>(stream), std::move(op));
    pump();
  }
  void wait_host_value(int, device::Stream stream, const uint32_t* flag,
                       uint32_t value) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("wait_host_value");
    QOp op{QOp::WaitValue};
    op.flag = flag;
    op.value = value;
    enqueue(reinterpret_cast<intptr_t>(stream), std::move(op));
    pump();
  }

  void signal_host_value(uint32_t* flag, uint32_t value) override {
    std::lock_guard<std::recursive_mutex> lock(mu);
    log("signal_host_value");
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
    pump();  // what waited for it runs now, before the host goes on: as early as a GPU could
  }

  // ---- the test's side ----
  void write(intptr_t stream, const at::Tensor& dst, const at::Tensor& src) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    TORCH_CHECK(dst.nbytes() == src.nbytes() && dst.is_contiguous() && src.is_contiguous());
    QOp op{QOp::Write};
    op.dst = dst.data_ptr();
    op.bytes = dst.nbytes();
    op.data.assign(static_cast<const char*>(src.data_ptr()),
                   static_cast<const char*>(src.data_ptr()) + src.nbytes());
    enqueue(stream, std::move(op));
    pump();
  }
  int64_t hold(intptr_t stream) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    QOp op{QOp::Hold};
    op.hold = next_hold++;
    const int64_t id = op.hold;
    enqueue(stream, std::move(op));
    return id;
  }
  void release(int64_t id) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    released.insert(id);
    pump();
  }
};

std::vector<QueuedRuntime*> runtimes;  // kept: offloads built on one may outlive a test

// A thread that runs the streams continuously, as a GPU runs beside the host.
std::atomic<bool> gpu_running{false};
std::thread gpu_thread;

QueuedRuntime& q() {
  TORCH_CHECK(!runtimes.empty(), "fake_offload: q_install() first");
  return *runtimes.back();
}

}  // namespace
}  // namespace fake
}  // namespace fused_ema

void register_fake_offload(pybind11::module_& m) {
  namespace py = pybind11;
  using fused_ema::fake::q;
  using fused_ema::fake::QueuedRuntime;
  m.def("q_install", [] {
    fused_ema::fake::runtimes.push_back(new QueuedRuntime);
    fused_ema::device::set_runtime(fused_ema::fake::runtimes.back());
  }, "A fresh queued runtime; the calling thread is the training thread.");
  m.def("q_uninstall", [] { fused_ema::device::set_runtime(nullptr); });
  m.def("q_new_stream", [] {
    std::lock_guard<std::recursive_mutex> lock(q().mu);
    return q().next_stream++;
  });
  m.def("q_write", [](intptr_t s, const at::Tensor& dst, const at::Tensor& src) {
    q().write(s, dst, src);
  });
  m.def("q_hold", [](intptr_t s) { return q().hold(s); });
  m.def("q_release", [](int64_t id) { q().release(id); });
  m.def("q_drain", [] {
    std::lock_guard<std::recursive_mutex> lock(q().mu);
    q().pump();
    return q().stuck();
  }, "Runs what can run; returns the number of ops still waiting.");
  m.def("q_gpu_start", [] {
    using namespace fused_ema::fake;
    TORCH_CHECK(!gpu_running.exchange(true), "fake_offload: the GPU thread already runs");
    QueuedRuntime* r = &q();
    gpu_thread = std::thread([r] {
      while (gpu_running.load()) {
        {
          std::lock_guard<std::recursive_mutex> lock(r->mu);
          r->pump();
        }
        std::this_thread::yield();
      }
    });
  }, "Runs the streams on a thread of their own until q_gpu_stop().");
  m.def("q_gpu_stop", [] {
    using namespace fused_ema::fake;
    gpu_running.store(false);
    if (gpu_thread.joinable()) gpu_thread.join();
  }, py::call_guard<py::gil_scoped_release>());
  m.def("q_errors", [] {
    std::lock_guard<std::recursive_mutex> lock(q().mu);
    return q().errors;
  });
  m.def("q_calls", [] {
    std::lock_guard<std::recursive_mutex> lock(q().mu);
    return q().calls;
  });
  m.def("q_clear_calls", [] {
    std::lock_guard<std::recursive_mutex> lock(q().mu);
    q().calls.clear();
  });
  m.def("q_counters", [] {
    std::lock_guard<std::recursive_mutex> lock(q().mu);
    auto& r = q();
    return std::map<std::string, int64_t>{{"d2h_bytes", r.d2h_bytes},
                                          {"d2h_copies", r.d2h_copies},
                                          {"pinned_live", r.pinned_live},
                                          {"pinned_peak", r.pinned_peak},
                                          {"host_waits", r.host_waits},
                                          {"training_host_waits", r.training_host_waits}};
  });
  m.def("q_reset_counters", [] {
    std::lock_guard<std::recursive_mutex> lock(q().mu);
    q().d2h_bytes = q().d2h_copies = q().host_waits = q().training_host_waits = 0;
  });
}
