// The EMA of an accelerator's model kept in host memory, updated without a
// host wait on the training thread (FusedEMA(..., device="cpu",
// non_blocking=True)).
//
// The averaged tensors are cut into chunks of at most `chunk_bytes` (small
// tensors share a chunk, a large one spans several) and copied device-to-host
// into pinned staging slots, on a side stream, in one copy per run of device
// memory (adjacent tensors are one copy). The staging is bounded: `cap_bytes`
// holds cap / chunk slots, and the chunks go through them in turn.
//
// Order (every call through device::Runtime, so tests/fake_cuda checks it):
//  training thread, issue(): an event after the work queued so far on the
//    training stream (the optimizer's writes); the side stream waits on it;
//    for each chunk: the side stream waits until the host has consumed the
//    slot's previous chunk (wait_host_value: a stream wait, no host wait),
//    copies, records the chunk's event. No host wait.
//  worker thread, consume(): for each chunk, a host wait on its event, the CPU
//    update of the chunk's EMAs from the slot, then the slot is marked
//    consumed (a store to pinned memory the side stream waits on).
//  training thread, order_before_writes() (before the next optimizer step):
//    the training stream waits on the last copy's event: the next writes
//    cannot overtake the copies, and nothing waits on the host.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "device_runtime.h"
#include "plan.h"

namespace pybind11 {
class module_;
}

namespace fused_ema {

constexpr int64_t kDefaultOffloadCapBytes = int64_t{256} << 20;   // pinned staging
constexpr int64_t kDefaultOffloadChunkBytes = int64_t{32} << 20;  // one slot

struct OffloadSegment {
  int32_t tensor;  // index into the params
  int64_t start;   // first element
  int64_t length;  // elements
  int64_t offset;  // byte offset in the chunk's slot
};

struct OffloadCopy {
  int32_t tensor;  // the first segment's tensor (its start gives the source)
  int64_t start;
  int64_t offset;  // in the slot
  int64_t bytes;
};

struct OffloadChunk {
  std::vector<OffloadSegment> segments;
  int64_t bytes = 0;  // used bytes of the slot
};

// Packs tensors of `numels[i]` elements of `elem_sizes[i]` bytes into chunks
// of at most `chunk_bytes` (each segment's offset aligned to 64 bytes): a pure
// function, so its rules are tested alone.
std::vector<OffloadChunk> pack_offload_chunks(const std::vector<int64_t>& numels,
                                              const std::vector<int>& elem_sizes,
                                              int64_t chunk_bytes);

class HostOffload {
 public:
  // `emas`: num_decays lists of params.size() contiguous CPU tensors, one
  // after the other; `params`: contiguous tensors on CUDA device `device`.
  HostOffload(std::vector<at::Tensor> emas, std::vector<at::Tensor> params,
              int64_t num_decays, int device, int64_t cap_bytes, int64_t chunk_bytes);
  ~HostOffload();

  // Training thread, after the optimizer step. `stream`: the training stream
  // (nullptr: the device's current one). `skip`: a 0-d flag on the device (a
  // GradScaler's found-inf), copied with the first chunk. No host wait.
  void issue(device::Stream stream, const std::optional<at::Tensor>& skip);
  // Training thread, before the next optimizer step: `stream` (nullptr: the
  // current one) waits for the last issue()'s copies (a stream wait). No host wait.
  void order_before_writes(device::Stream stream);
  // Worker thread: updates the EMAs chunk by chunk as their copies complete
  // (a host wait on each chunk's event, on this thread). Returns whether the
  // update ran (false: the skip flag was set).
  bool consume(const std::vector<double>& decays);

  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  int64_t num_slots() const { return num_slots_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  int64_t num_copies() const;  // device-to-host copies per update
  int64_t staged_bytes() const;  // bytes copied per update (the params once)

 private:
  std::vector<at::Tensor> emas_, params_;
  int64_t num_decays_;
  int device_;
  device::Runtime* runtime_;
  device::Stream side_ = nullptr;
  std::vector<OffloadChunk> chunks_;
  std::vector<std::vector<OffloadCopy>> copies_;  // per chunk
  std::vector<std::shared_ptr<const Plan>> plans_;  // per chunk: its EMAs <- its slot
  int64_t num_slots_ = 0, slot_bytes_ = 0;
  at::DataPtr staging_;  // num_slots_ * slot_bytes_, pinned
  at::DataPtr control_;  // pinned: one uint32 per slot (uses consumed), then the skip flag
  std::vector<uint32_t> issued_;  // per slot: uses issued (training thread)
  uint32_t* consumed_ = nullptr;  // per slot, in control_ (worker writes, GPU reads)
  std::vector<uint32_t> consumed_count_;  // per slot: what the worker wrote there
  void* skip_host_ = nullptr;
  ScalarKind skip_kind_ = ScalarKind::Bool;
  // The last issue(): its events (one per chunk) and whether it carried a skip flag.
  std::mutex mutex_;
  std::vector<device::Event> events_;
  std::vector<device::Event> old_events_;  // of the issue before (order_before_writes may
                                           // still name the last one)
  device::Event after_optimizer_ = nullptr;
  bool has_skip_ = false;
  bool issued_pending_ = false;
};

// Adds HostOffload and pack_offload_chunks to a pybind11 module (bindings.cpp,
// and the fake-CUDA test module).
void register_offload(pybind11::module_& m);

}  // namespace fused_ema
