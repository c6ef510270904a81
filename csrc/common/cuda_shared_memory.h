// Torch-free: the current CUDA device's opt-in maximum of shared memory per block, read once per device. The glue's
// argument checks and the launchers both need it on every call.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>

namespace vosops {

inline cudaError_t optin_shared_memory(int* bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0: not read yet
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int have = dev < kMaxDevices ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (have == 0) {
    err = cudaDeviceGetAttribute(&have, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    if (dev < kMaxDevices) cached[dev].store(have, std::memory_order_relaxed);
  }
  *bytes = have;
  return cudaSuccess;
}

}  // namespace vosops
