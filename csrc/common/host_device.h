// Torch-free helpers shared by the CPU (.cpp) and CUDA (.cu) kernels: one definition of each op's math.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define VOSOPS_HD __host__ __device__ __forceinline__
#else
#define VOSOPS_HD inline
#endif

namespace vosops {

// Element types the torch-free launchers accept; the glue maps at::ScalarType onto these.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Sizes and strides in elements, 64-bit so tensors beyond 2^31 elements index safely.
struct Shape4 {
  int64_t size[4];
  int64_t stride[4];
};

}  // namespace vosops
