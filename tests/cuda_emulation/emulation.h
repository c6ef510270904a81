// Shared prelude of the host emulations of the CUDA kernels (tests on machines without a GPU): the CUDA keywords
// and intrinsics become host code and one emulated thread (blockDim = gridDim = 1) walks every grid-stride loop.
// It checks the kernels' logic (indexing, selection, windows, borders, gradients) - not races, occupancy or glue.
#pragma once
#include <cmath>
#include <cstdint>

#include "emulation_common.h"

namespace {
struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};
Dim3 blockIdx, threadIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T atomicAdd(T* a, T v) {  // one emulated thread: a plain read-modify-write
  const T old = *a;
  *a = old + v;
  return old;
}
}  // namespace
