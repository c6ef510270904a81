// Torch-free element-type helpers for the CUDA kernels: load any supported type as its accumulation type.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_shared_memory.h"

namespace vosops {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// A kernel's dynamic shared memory as `unsigned char name[]` (16-byte aligned). The host emulation of the kernels
// (tests/cuda_emulation/block_emulation.h) defines this macro first, to hand out its own per-block buffer.
#ifndef VOSOPS_DYNAMIC_SMEM
#define VOSOPS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Lets `kernel` launch with `need` bytes of dynamic shared memory past the 48 KB default: cudaErrorInvalidValue when
// the device's opt-in maximum is smaller. The attribute is set to that maximum, the same value on every call, not to
// `need`: it is process-wide, and two host threads setting their own sizes could lower it under each other's launch
// (A sets 100 KB, B sets 60 KB, A's launch fails).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, size_t need) {
  if (need <= 48 * 1024) return cudaSuccess;
  int optin = 0;
  if (const cudaError_t err = optin_shared_memory(&optin); err != cudaSuccess) return err;
  if (need > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
}

// Blocks for a grid-stride loop over `total` items, `threads` per block: capped at 2^30 (the loop covers the rest).
inline unsigned int grid_stride_blocks(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < (1LL << 30) ? blocks : (1LL << 30));
}

}  // namespace vosops

// In a launcher returning cudaError_t: `return CALL;` with T bound to the element type `dtype` (a vosops::DType).
#define VOSOPS_CUDA_DISPATCH(dtype, CALL)                           \
  switch (dtype) {                                                  \
    case DType::Float32: { using T = float; return CALL; }          \
    case DType::Float64: { using T = double; return CALL; }         \
    case DType::Float16: { using T = __half; return CALL; }         \
    case DType::BFloat16: { using T = __nv_bfloat16; return CALL; } \
  }                                                                 \
  return cudaErrorInvalidValue;
