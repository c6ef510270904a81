// What both emulation preludes (emulation.h: one thread walks the grid-stride loops; block_emulation.h: one host
// thread per CUDA thread) share: the CUDA keywords as host code, the toolkit's host-compilable runtime header, and
// the unpacking of a tensor's sizes and strides passed from the tests.
#pragma once
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

#include <cuda_runtime_api.h>  // cudaError_t, cudaStream_t, float4 (host-compilable toolkit headers)

inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off: never fused

namespace emu {
// A Shape3/Shape4 from R sizes followed by R strides (tests/_cuda_emulation.py: sizes_strides).
template <typename S, int R>
S shape(const int64_t* sizes_strides) {
  S r;
  for (int i = 0; i < R; ++i) {
    r.size[i] = sizes_strides[i];
    r.stride[i] = sizes_strides[R + i];
  }
  return r;
}
}  // namespace emu
