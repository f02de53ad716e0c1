// CUDA host side: the launch and the device table of a plan. The device code
// is in ema_kernel.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ema_kernel.cuh"
#include "plan.h"

namespace fused_ema {
namespace {

int multiprocessor_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

}  // namespace

void ema_update_cuda(const Plan& plan, const UpdateArgs& args) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const int64_t num_rows = static_cast<int64_t>(plan.rows.size());
  const kernel::LaunchConfig cfg = kernel::launch_config(
      num_rows, plan.num_elements, multiprocessor_count(plan.device.index()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(plan.device.index()).stream();
  const kernel::KernelFn kernel = kernel::select_kernel(plan);
  kernel<<<cfg.grid, cfg.block, 0, stream>>>(plan.device_params, plan.device_emas,
                                             plan.device_rows, num_rows, plan.num_tensors, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::shared_ptr<void> upload_table_cuda(const void* src, size_t bytes, c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone,
              "fused_ema: these tensors are updated for the first time inside CUDA graph "
              "capture, which cannot upload the update's table; build an EMAPlan, or call the "
              "update once before capturing (the usual warm-up)");
  void* dst = nullptr;
  C10_CUDA_CHECK(cudaMalloc(&dst, bytes));
  std::shared_ptr<void> table(dst, [device](void* p) {
    const c10::cuda::CUDAGuard free_guard(device);
    (void)cudaFree(p);  // never throw from a deleter
  });
  // Wait for the copy, so the table is ready for kernels on any stream.
  C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return table;
}

}  // namespace fused_ema
