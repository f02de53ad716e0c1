// The CUDA runtime calls that the host side of the CUDA path makes, behind one
// small interface. ema_cuda.cu implements it with the CUDA runtime and torch's
// caching allocators; tests/fake_cuda implements it on host memory (with freed
// blocks poisoned, streams, events and graph capture simulated), so the real
// host logic in plan.cpp (table upload, lifetime under graph capture, plan
// cache) is exercised on machines without a GPU.
//
// Deliberately absent: cudaMalloc, cudaFree and any stream or device
// synchronisation. Device memory comes from a stream-ordered caching allocator
// and the upload is stream-ordered, so no update, warm or cold, waits for the
// device; the host waits (`sync_event`) are on the rare path of a table first
// used inside a graph capture, and on the offload's worker thread (offload.h),
// never on the training thread.
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <functional>

namespace fused_ema {
namespace device {

using Stream = void*;  // cudaStream_t
using Event = void*;   // cudaEvent_t
using Graph = void*;   // cudaGraph_t

struct CaptureState {
  bool capturing = false;
  unsigned long long id = 0;  // the capture sequence, unique per capture
  Graph graph = nullptr;      // the graph being captured
};

class Runtime {
 public:
  virtual ~Runtime() = default;
  virtual Stream current_stream(int device) = 0;
  virtual CaptureState capture_state(Stream stream) = 0;
  // Device memory from a stream-ordered caching allocator, for use on `stream`.
  virtual at::DataPtr alloc_device(size_t bytes, int device, Stream stream) = 0;
  // Pinned host memory (from a caching allocator).
  virtual at::DataPtr alloc_pinned(size_t bytes) = 0;
  // Copies `bytes` from pinned `src` to `dst` on `device` on `stream`, and tells
  // the host allocator that `src` is in use until the copy is done (so it may be
  // dropped right after this call, unless the copy was captured in a graph).
  // Every call that acts on a device names it: the current device may be another.
  virtual void copy_to_device_async(int device, void* dst, const at::DataPtr& src,
                                    size_t bytes, Stream stream) = 0;
  // Device memory allocated on one stream and read on `stream` too.
  virtual void record_stream(const at::DataPtr& memory, Stream stream) = 0;
  virtual Event record_event(int device, Stream stream) = 0;  // a new event
  virtual void wait_event(Stream stream, Event event) = 0;    // stream-ordered
  virtual void sync_event(Event event) = 0;  // host wait; legal while any stream captures
  virtual void destroy_event(Event event) noexcept = 0;
  // Runs `release` once `graph`, every executable graph made from it, and all
  // their launches are gone. `release` runs on a runtime thread that must not
  // call the runtime.
  virtual void retain_in_graph(Graph graph, std::function<void()> release) = 0;

  // For the host-memory EMA (offload.h): device-to-host copies on a stream of
  // their own, gated by what the host has consumed.
  // A stream of `device` for copies, not the current one (nor one of torch's pool).
  virtual Stream side_stream(int device) = 0;
  // Copies `bytes` from device memory `src` to pinned `dst` on `stream`.
  virtual void copy_to_host_async(int device, void* dst, const void* src, size_t bytes,
                                  Stream stream) = 0;
  // Work queued on `stream` after this waits until the 32-bit word at `flag`
  // (pinned host memory, written by the host) is >= `value`: a stream wait on
  // the host's progress, no host wait.
  virtual void wait_host_value(int device, Stream stream, const uint32_t* flag,
                               uint32_t value) = 0;
  // The host's side of it: stores `value` to `flag` (release order), so work
  // waiting for it may run from now on.
  virtual void signal_host_value(uint32_t* flag, uint32_t value) = 0;
};

// The runtime in use: the CUDA one in a CUDA build, or the one a test installed.
Runtime& runtime();
// Installs a runtime (tests); nullptr restores the default.
void set_runtime(Runtime* runtime);
// The CUDA runtime (ema_cuda.cu); nullptr in a build without CUDA.
Runtime* cuda_runtime();

}  // namespace device
}  // namespace fused_ema
