// A fake CUDA runtime (device::Runtime over host memory) and a test module that
// drives the real host side of the CUDA path (csrc/plan.cpp: plan cache,
// table upload, lifetime under graph capture) with it, on machines without a GPU.
//
// What it simulates, and checks:
// - device and pinned memory: host blocks that are poisoned and kept (never
//   reused) when freed, so any later read of a freed table is detected;
// - streams with a sequence number each, and events: a kernel may read a table
//   only once its upload is ordered before the launch (same stream, a wait on an
//   event recorded after the upload, or a host wait on such an event);
// - graph capture: work on a capturing stream becomes nodes of a fake graph
//   instead of running; replay runs the nodes (and checks what they read is
//   alive); destroying a graph runs the release callbacks it was given;
// - counters of every runtime call.
// A "kernel" reads its table from fake device memory and runs the update with
// the CPU kernel (ema_update_cpu) over exactly what it read, so a stale or
// wrong table shows up in the EMA values. (The seam for running the CUDA
// kernel's own device code instead is `FakeRuntime::execute`.)
#include <torch/extension.h>

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "device_runtime.h"
#include "offload.h"
#include "plan.h"

void register_fake_offload(pybind11::module_& m);  // fake_offload.cpp

namespace fused_ema {
namespace fake {
namespace {

constexpr unsigned char kPoison = 0xFB;

struct Block {
  size_t size = 0;
  bool alive = true;
  bool pinned = false;
  intptr_t alloc_stream = 0;
  std::vector<intptr_t> read_by;          // streams whose kernels read it
  std::vector<intptr_t> recorded_streams; // record_stream calls
  // The last write: on a stream at a sequence number, or a node of a graph.
  intptr_t write_stream = 0;
  int64_t write_seq = 0;
  int64_t write_graph = 0;
};

struct FakeEvent {
  intptr_t stream;
  int64_t seq;
  bool destroyed = false;
};

struct Node {
  bool is_copy;
  // copy
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
  // kernel
  DeviceView table{};
  int64_t num_rows = 0, num_tensors = 0;
  int num_decays = 1;
  UpdateArgs args;
};

struct FakeGraph {
  int64_t id;
  intptr_t stream;
  std::vector<Node> nodes;
  std::vector<std::function<void()>> retained;
  bool ended = false;
  bool destroyed = false;
};

class FakeRuntime final : public device::Runtime {
 public:
  std::map<std::string, int64_t> counters;
  // The devices named by the calls that act on one (call -> each device given, in order).
  std::map<std::string, std::vector<int>> devices;
  std::vector<std::string> errors;
  intptr_t current = 1;
  intptr_t next_stream = 2;
  std::map<intptr_t, int64_t> seq;                         // per stream
  std::map<intptr_t, std::map<intptr_t, int64_t>> visible; // waiter -> (stream -> seq)
  std::map<intptr_t, int64_t> host_synced;                 // stream -> seq
  std::map<intptr_t, int64_t> capturing;                   // stream -> graph id
  std::map<int64_t, std::unique_ptr<FakeGraph>> graphs;
  int64_t next_graph = 1;
  std::map<uintptr_t, Block> blocks;
  std::vector<std::unique_ptr<FakeEvent>> events;

  void count(const char* what) { ++counters[what]; }
  void count(const char* what, int device) {
    ++counters[what];
    devices[what].push_back(device);
  }
  void error(std::string what) { errors.push_back(std::move(what)); }

  // The block holding [p, p + n), or null (an error when it is freed or unknown).
  Block* find(const void* p, size_t n, const char* what) {
    const auto addr = reinterpret_cast<uintptr_t>(p);
    auto it = blocks.upper_bound(addr);
    if (it == blocks.begin()) {
      error(std::string(what) + ": not fake device or pinned memory");
      return nullptr;
    }
    --it;
    if (addr + n > it->first + it->second.size) {
      error(std::string(what) + ": out of the bounds of its block");
      return nullptr;
    }
    if (!it->second.alive) {
      error(std::string(what) + ": reads freed memory");
      return nullptr;
    }
    return &it->second;
  }

  FakeGraph* capture_of(intptr_t stream) {
    auto it = capturing.find(stream);
    return it == capturing.end() ? nullptr : graphs.at(it->second).get();
  }

  at::DataPtr allocate(size_t bytes, bool pinned, intptr_t stream) {
    void* p = std::malloc(std::max<size_t>(bytes, 1));
    std::memset(p, 0xAB, std::max<size_t>(bytes, 1));
    Block b;
    b.size = std::max<size_t>(bytes, 1);
    b.pinned = pinned;
    b.alloc_stream = stream;
    blocks[reinterpret_cast<uintptr_t>(p)] = b;
    auto* ctx = new std::pair<FakeRuntime*, void*>(this, p);
    return at::DataPtr(p, ctx, &FakeRuntime::free_block, at::Device(at::kCPU));
  }

  static void free_block(void* ctx) {
    auto* owner = static_cast<std::pair<FakeRuntime*, void*>*>(ctx);
    FakeRuntime& rt = *owner->first;
    Block& b = rt.blocks.at(reinterpret_cast<uintptr_t>(owner->second));
    rt.count(b.pinned ? "free_pinned" : "free_device");
    // The caching allocator reuses a block only after the streams it was told
    // about are done with it: a kernel on any other stream must have been recorded.
    for (intptr_t s : b.read_by) {
      if (s != b.alloc_stream && std::find(b.recorded_streams.begin(), b.recorded_streams.end(),
                                           s) == b.recorded_streams.end()) {
        rt.error("a table read on another stream was freed without record_stream");
      }
    }
    std::memset(owner->second, kPoison, b.size);  // kept, never reused
    b.alive = false;
    delete owner;
  }

  // ---- device::Runtime ----
  device::Stream current_stream(int device) override {
    count("current_stream", device);
    return reinterpret_cast<device::Stream>(current);
  }

  device::CaptureState capture_state(device::Stream stream) override {
    count("capture_state");
    device::CaptureState state;
    if (FakeGraph* g = capture_of(reinterpret_cast<intptr_t>(stream))) {
      state.capturing = true;
      state.id = static_cast<unsigned long long>(g->id);
      state.graph = g;
    }
    return state;
  }

  at::DataPtr alloc_device(size_t bytes, int device, device::Stream stream) override {
    count("alloc_device", device);
    return allocate(bytes, false, reinterpret_cast<intptr_t>(stream));
  }

  at::DataPtr alloc_pinned(size_t bytes) override {
    count("alloc_pinned");
    return allocate(bytes, true, 0);
  }

  void copy_to_device_async(int device, void* dst, const at::DataPtr& src, size_t bytes,
                            device::Stream stream) override {
    count("copy_to_device", device);
    const auto s = reinterpret_cast<intptr_t>(stream);
    if (FakeGraph* g = capture_of(s)) {
      Node n{true};
      n.dst = dst;
      n.src = src.get();
      n.bytes = bytes;
      g->nodes.push_back(n);
      return;
    }
    run_copy(dst, src.get(), bytes, s, 0);
  }

  void run_copy(void* dst, const void* src, size_t bytes, intptr_t stream, int64_t graph) {
    Block* from = find(src, bytes, "copy source");
    Block* to = find(dst, bytes, "copy destination");
    if (!from || !to) return;
    if (!from->pinned) error("copy from memory that is not pinned");
    std::memcpy(dst, src, bytes);
    to->write_stream = stream;
    to->write_seq = ++seq[stream];
    to->write_graph = graph;
  }

  void record_stream(const at::DataPtr& memory, device::Stream stream) override {
    count("record_stream");
    if (Block* b = find(memory.get(), 1, "record_stream")) {
      b->recorded_streams.push_back(reinterpret_cast<intptr_t>(stream));
    }
  }

  device::Event record_event(int device, device::Stream stream) override {
    count("record_event", device);
    const auto s = reinterpret_cast<intptr_t>(stream);
    if (capture_of(s)) error("an event recorded on a capturing stream");
    events.push_back(std::make_unique<FakeEvent>(FakeEvent{s, seq[s]}));
    return events.back().get();
  }

  void wait_event(device::Stream stream, device::Event event) override {
    count("wait_event");
    const auto s = reinterpret_cast<intptr_t>(stream);
    auto* e = static_cast<FakeEvent*>(event);
    if (e == nullptr || e->destroyed) return error("wait on a missing or destroyed event");
    if (capture_of(s)) error("a capturing stream waits on an event recorded outside capture");
    int64_t& v = visible[s][e->stream];
    v = std::max(v, e->seq);
  }

  void sync_event(device::Event event) override {
    count("sync_event");
    auto* e = static_cast<FakeEvent*>(event);
    if (e == nullptr || e->destroyed) return error("host wait on a missing or destroyed event");
    int64_t& v = host_synced[e->stream];
    v = std::max(v, e->seq);
  }

  void destroy_event(device::Event event) noexcept override {
    ++counters["destroy_event"];
    auto* e = static_cast<FakeEvent*>(event);
    if (e->destroyed) errors.push_back("an event destroyed twice");
    e->destroyed = true;
  }

  void retain_in_graph(device::Graph graph, std::function<void()> release) override {
    count("retain_in_graph");
    auto* g = static_cast<FakeGraph*>(graph);
    if (g == nullptr || g->ended) return error("retain_in_graph on a graph not being captured");
    g->retained.push_back(std::move(release));
  }

  // The offload's calls are modelled by the queued runtime (fake_offload.cpp).
  device::Stream side_stream(int) override {
    error("side_stream: use the queued fake for the offload");
    return nullptr;
  }
  void copy_to_host_async(int, void*, const void*, size_t, device::Stream) override {
    error("copy_to_host_async: use the queued fake for the offload");
  }
  void wait_host_value(int, device::Stream, const uint32_t*, uint32_t) override {
    error("wait_host_value: use the queued fake for the offload");
  }
  void signal_host_value(uint32_t*, uint32_t) override {
    error("signal_host_value: use the queued fake for the offload");
  }

  // ---- kernels ----
  void launch(const Plan& plan, const UpdateArgs& args, DeviceView table) {
    count("launch");
    const auto s = current;
    Node n{false};
    n.table = table;
    n.num_rows = static_cast<int64_t>(plan.rows.size());
    n.num_tensors = plan.num_tensors;
    n.num_decays = plan.num_decays;
    n.args = args;
    if (FakeGraph* g = capture_of(s)) {
      g->nodes.push_back(n);
      return;
    }
    execute(n, s, 0);
  }

  // Runs a kernel node on `stream`: checks its table is alive and ordered after
  // its upload, then updates the EMAs from what the table holds.
  void execute(const Node& n, intptr_t stream, int64_t graph) {
    const auto* base = reinterpret_cast<const uint8_t*>(n.table.params);
    const auto* end = reinterpret_cast<const uint8_t*>(n.table.rows + n.num_rows);
    Block* b = find(base, static_cast<size_t>(end - base), "kernel table");
    if (!b) return;
    const bool ordered = (graph != 0 && b->write_graph == graph) ||
                         (b->write_graph == 0 &&
                          (b->write_stream == stream ||
                           visible[stream][b->write_stream] >= b->write_seq ||
                           host_synced[b->write_stream] >= b->write_seq));
    if (!ordered) error("a kernel reads a table whose upload is not ordered before it");
    // (A graph's reads need no record_stream: it holds the table until its launches are done.)
    if (graph == 0 && std::find(b->read_by.begin(), b->read_by.end(), stream) == b->read_by.end()) {
      b->read_by.push_back(stream);
    }
    ++seq[stream];
    Plan read;
    read.num_tensors = n.num_tensors;
    read.num_decays = n.num_decays;
    read.params.assign(n.table.params, n.table.params + n.num_tensors);
    read.emas.assign(n.table.emas, n.table.emas + n.num_tensors * n.num_decays);
    read.rows.assign(n.table.rows, n.table.rows + n.num_rows);
    for (const Row& r : read.rows) {
      if (r.tensor < 0 || r.tensor >= n.num_tensors || r.length <= 0 ||
          r.start + r.length > read.params[r.tensor].numel) {
        return error("a kernel read a corrupt table");
      }
      read.row_offsets.push_back(read.num_elements);
      read.num_elements += r.length;
    }
    read.row_offsets.push_back(read.num_elements);
    UpdateArgs args = n.args;
    if (args.skip_ptr && read_scalar(args.skip_ptr, args.skip_kind, 0) != 0.0) return;
    if (args.decay_ptr) {
      for (int k = 0; k < args.num_decays; ++k) {
        args.decays[k] = read_scalar(args.decay_ptr, args.decay_kind, k);
      }
    }
    ema_update_cpu(read, args);
  }

  // ---- capture ----
  int64_t begin_capture(intptr_t stream) {
    if (capturing.count(stream)) throw std::runtime_error("already capturing");
    auto g = std::make_unique<FakeGraph>();
    g->id = next_graph++;
    g->stream = stream;
    capturing[stream] = g->id;
    graphs[g->id] = std::move(g);
    return next_graph - 1;
  }

  int64_t end_capture(intptr_t stream) {
    auto it = capturing.find(stream);
    if (it == capturing.end()) throw std::runtime_error("not capturing");
    const int64_t id = it->second;
    capturing.erase(it);
    graphs.at(id)->ended = true;
    return id;
  }

  void replay(int64_t id, intptr_t stream) {
    FakeGraph& g = *graphs.at(id);
    if (!g.ended || g.destroyed) throw std::runtime_error("replay of a graph not ready");
    count("replay");
    for (const Node& n : g.nodes) {
      if (n.is_copy) {
        run_copy(n.dst, n.src, n.bytes, stream, id);
      } else {
        execute(n, stream, id);
      }
    }
  }

  void destroy_graph(int64_t id) {
    FakeGraph& g = *graphs.at(id);
    if (g.destroyed) return;
    g.destroyed = true;
    for (auto& release : g.retained) release();  // as CUDA would, after the last launch
    g.retained.clear();
  }
};

FakeRuntime* the_runtime = nullptr;

FakeRuntime& rt() {
  TORCH_CHECK(the_runtime != nullptr, "fake_cuda: install() first");
  return *the_runtime;
}

// What ema_update_cuda does around the kernel: the table for the current
// stream, then the launch.
// As ema_update_cuda: the table on the plan's device, for the current stream.
void launch(const Plan& plan, const UpdateArgs& args, int device = 0) {
  if (plan.num_elements == 0 || args.skipped) return;
  const DeviceView table =
      device_table_for_launch(plan, device, rt().current_stream(device));
  rt().launch(plan, args, table);
}

// The functional op (bindings.cpp's multi_ema_update_op) on the fake device.
void update(std::vector<at::Tensor> emas, std::vector<at::Tensor> params,
            std::vector<double> decays, std::optional<at::Tensor> decay_tensor,
            std::optional<at::Tensor> skip) {
  const int64_t num_decays =
      params.empty() ? static_cast<int64_t>(decays.size())
                     : static_cast<int64_t>(emas.size() / params.size());
  auto plan = cached_plan(emas, params, num_decays);
  launch(*plan, make_update_args(*plan, decays, decay_tensor, skip));
}

// An EMAPlan on the fake device: built, uploaded on the current stream (as
// build_plan does for CUDA tensors outside capture), then updated.
class BoundPlan {
 public:
  BoundPlan(std::vector<at::Tensor> emas, std::vector<at::Tensor> params, int64_t num_decays,
            int device)
      : emas_(std::move(emas)), params_(std::move(params)),
        plan_(build_plan(emas_, params_, num_decays)), device_(device) {
    upload_unless_capturing(*plan_, device_);
  }
  void update(std::vector<double> decays, std::optional<at::Tensor> decay_tensor,
              std::optional<at::Tensor> skip) {
    TORCH_CHECK(first_stale(*plan_, emas_, params_) < 0, "fused_ema: a tensor is stale");
    launch(*plan_, make_update_args(*plan_, decays, decay_tensor, skip), device_);
  }

 private:
  std::vector<at::Tensor> emas_, params_;
  std::shared_ptr<const Plan> plan_;
  int device_;
};

}  // namespace
}  // namespace fake
}  // namespace fused_ema

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fused_ema::fake;
  // One runtime for the process: cached plans keep tables (and their deleters)
  // from earlier tests.
  m.def("install", [] {
    if (the_runtime == nullptr) the_runtime = new FakeRuntime;
    fused_ema::device::set_runtime(the_runtime);
  });
  m.def("clear_errors", [] { rt().errors.clear(); });
  m.def("clear_plan_cache", &fused_ema::clear_plan_cache);
  m.def("uninstall", [] { fused_ema::device::set_runtime(nullptr); });
  m.def("counters", [] { return rt().counters; });
  m.def("devices", [] { return rt().devices; });
  m.def("reset_counters", [] {
    rt().counters.clear();
    rt().devices.clear();
  });
  m.def("errors", [] { return rt().errors; });
  m.def("new_stream", [] { return rt().next_stream++; });
  m.def("set_stream", [](intptr_t s) { rt().current = s; });
  m.def("current_stream", [] { return rt().current; });
  m.def("begin_capture", [](intptr_t s) { return rt().begin_capture(s); });
  m.def("end_capture", [](intptr_t s) { return rt().end_capture(s); });
  m.def("replay", [](int64_t g, intptr_t s) { rt().replay(g, s); });
  m.def("destroy_graph", [](int64_t g) { rt().destroy_graph(g); });
  m.def("live_device_blocks", [] {
    int64_t n = 0;
    for (auto& [p, b] : rt().blocks) n += b.alive && !b.pinned;
    return n;
  });
  fused_ema::register_offload(m);
  register_fake_offload(m);
  m.def("num_released_tables", &fused_ema::num_released_tables);
  m.def("free_released_tables", &fused_ema::free_released_tables);
  m.def("update", &update, py::arg("emas"), py::arg("params"), py::arg("decays"),
        py::arg("decay_tensor") = py::none(), py::arg("skip") = py::none());
  py::class_<BoundPlan>(m, "Plan")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int>(),
           py::arg("emas"), py::arg("params"), py::arg("num_decays"), py::arg("device") = 0)
      .def("update", &BoundPlan::update, py::arg("decays"), py::arg("decay_tensor") = py::none(),
           py::arg("skip") = py::none());
}
