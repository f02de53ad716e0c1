// CUDA host side: the launch, and device::Runtime over the CUDA runtime and
// torch's caching allocators (the table logic itself is in plan.cpp). The
// device code is in ema_kernel.cuh.
// gcc 12 warns that this header sizes structs by hardware_destructive_interference_size.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/core/CachingHostAllocator.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>

#include "device_runtime.h"
#include "ema_kernel.cuh"
#include "plan.h"

namespace fused_ema {
namespace {

int multiprocessor_count(int device) {
  // Written by whichever thread asks first; an int store is atomic, and every
  // writer stores the same value.
  static std::atomic<int> counts[64] = {};
  if (device < 0 || device >= 64) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

cudaStream_t as_cuda(device::Stream s) { return static_cast<cudaStream_t>(s); }

// cuStreamWaitValue32 (a driver call) through the runtime's entry-point query,
// so the extension does not link libcuda itself.
using WaitValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
WaitValue32 wait_value32() {
  static const WaitValue32 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &p, 12000,
                                                    cudaEnableDefault, &found));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuStreamWaitValue32", &p, cudaEnableDefault,
                                           &found));
#endif
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && p != nullptr,
                "fused_ema: the CUDA driver has no cuStreamWaitValue32");
    return reinterpret_cast<WaitValue32>(p);
  }();
  return fn;
}

// Lets this thread make calls that global-mode capture forbids (an event wait
// is safe: it touches no capturing stream).
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

class CudaRuntime final : public device::Runtime {
 public:
  device::Stream current_stream(int device) override {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  }

  device::CaptureState capture_state(device::Stream stream) override {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    device::CaptureState state;
    cudaGraph_t graph = nullptr;
#if CUDART_VERSION >= 13000
    C10_CUDA_CHECK(cudaStreamGetCaptureInfo(as_cuda(stream), &status, &state.id, &graph));
#else
    C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(as_cuda(stream), &status, &state.id, &graph));
#endif
    // An invalidated capture makes the next call on the stream fail with its reason.
    state.capturing = status == cudaStreamCaptureStatusActive;
    state.graph = graph;
    return state;
  }

  at::DataPtr alloc_device(size_t bytes, int device, device::Stream stream) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromExternal(
        as_cuda(stream), static_cast<c10::DeviceIndex>(device)));
    return c10::cuda::CUDACachingAllocator::get()->allocate(bytes);  // on the current stream
  }

  at::DataPtr alloc_pinned(size_t bytes) override {
    return at::getHostAllocator(at::kCUDA)->allocate(bytes);
  }

  void copy_to_device_async(int device, void* dst, const at::DataPtr& src, size_t bytes,
                            device::Stream stream) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src.get(), bytes, cudaMemcpyHostToDevice,
                                   as_cuda(stream)));
    at::getHostAllocator(at::kCUDA)->record_event(
        src.get(), src.get_context(),
        c10::cuda::getStreamFromExternal(as_cuda(stream), static_cast<c10::DeviceIndex>(device))
            .unwrap());
  }

  void record_stream(const at::DataPtr& memory, device::Stream stream) override {
    c10::cuda::CUDACachingAllocator::recordStream(
        memory, c10::cuda::getStreamFromExternal(as_cuda(stream), memory.device().index()));
  }

  device::Event record_event(int device, device::Stream stream) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaEvent_t event = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    const cudaError_t err = cudaEventRecord(event, as_cuda(stream));
    if (err != cudaSuccess) {
      (void)cudaEventDestroy(event);
      C10_CUDA_CHECK(err);
    }
    return event;
  }

  void wait_event(device::Stream stream, device::Event event) override {
    C10_CUDA_CHECK(cudaStreamWaitEvent(as_cuda(stream), static_cast<cudaEvent_t>(event), 0));
  }

  void sync_event(device::Event event) override {
    const RelaxedCaptureMode relaxed;
    C10_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
  }

  void destroy_event(device::Event event) noexcept override {
    (void)cudaEventDestroy(static_cast<cudaEvent_t>(event));  // does not wait for the device
  }

  void retain_in_graph(device::Graph graph, std::function<void()> release) override {
    auto* owned = new std::function<void()>(std::move(release));
    cudaUserObject_t object = nullptr;
    const cudaError_t err = cudaUserObjectCreate(
        &object, owned,
        [](void* p) {
          auto* f = static_cast<std::function<void()>*>(p);
          (*f)();
          delete f;
        },
        1, cudaUserObjectNoDestructorSync);
    if (err != cudaSuccess) {
      delete owned;
      C10_CUDA_CHECK(err);
    }
    // The graph takes over our reference; executable graphs made from it take their own.
    const cudaError_t retain_err = cudaGraphRetainUserObject(
        static_cast<cudaGraph_t>(graph), object, 1, cudaGraphUserObjectMove);
    if (retain_err != cudaSuccess) {
      (void)cudaUserObjectRelease(object, 1);  // runs `release`
      C10_CUDA_CHECK(retain_err);
    }
  }

  // One stream per device, of our own and kept for the process, not one of
  // torch's pool: the pool hands its streams out round robin (torch.cuda.Stream()
  // too), and this one blocks on the host's progress (wait_host_value), so work
  // another library queued on a shared pool stream would wait behind it.
  device::Stream side_stream(int device) override {
    std::lock_guard<std::mutex> lock(side_mutex_);
    cudaStream_t& stream = side_streams_[device];
    if (stream == nullptr) {
      const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
      C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    }
    return stream;
  }

  void copy_to_host_async(int device, void* dst, const void* src, size_t bytes,
                          device::Stream stream) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, as_cuda(stream)));
  }

  void wait_host_value(int device, device::Stream stream, const uint32_t* flag,
                       uint32_t value) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* mapped = nullptr;  // pinned memory is mapped (the same address under UVA)
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, const_cast<uint32_t*>(flag), 0));
    const CUresult err = wait_value32()(reinterpret_cast<CUstream>(as_cuda(stream)),
                                        reinterpret_cast<CUdeviceptr>(mapped), value,
                                        CU_STREAM_WAIT_VALUE_GEQ);
    TORCH_CHECK(err == CUDA_SUCCESS, "fused_ema: cuStreamWaitValue32 failed (CUresult ",
                static_cast<int>(err), ")");
  }

  void signal_host_value(uint32_t* flag, uint32_t value) override {
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);  // the GPU reads it from host memory
  }

 private:
  std::mutex side_mutex_;
  std::map<int, cudaStream_t> side_streams_;
};

}  // namespace

namespace device {
Runtime* cuda_runtime() {
  static CudaRuntime runtime;
  return &runtime;
}
}  // namespace device

void ema_update_cuda(const Plan& plan, const UpdateArgs& args) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const int64_t num_rows = static_cast<int64_t>(plan.rows.size());
  const kernel::LaunchConfig cfg = kernel::launch_config(
      num_rows, plan.num_elements, multiprocessor_count(plan.device.index()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(plan.device.index()).stream();
  const DeviceView table = device_table_for_launch(plan, plan.device.index(), stream);
  const kernel::KernelFn kernel = kernel::select_kernel(plan);
  kernel<<<cfg.grid, cfg.block, 0, stream>>>(table.params, table.emas, table.rows, num_rows,
                                             plan.num_tensors, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fused_ema
