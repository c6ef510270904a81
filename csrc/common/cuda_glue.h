// Shared by the CUDA glue files (*_cuda_glue.cpp, built only with CUDA): the launch check and PyTorch's current stream.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace vosops {

// A launcher's cudaError_t as a RuntimeError naming the op.
inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// Every kernel runs on PyTorch's current stream of the current device (set by the caller's CUDAGuard).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Sizes and strides of a tensor's leading dimensions into a torch-free launcher shape (int64 size[N], stride[N]).
template <typename ShapeT>
ShapeT shape_of(const at::Tensor& t) {
  ShapeT s;
  constexpr int n = sizeof(s.size) / sizeof(s.size[0]);
  for (int i = 0; i < n; ++i) {
    s.size[i] = t.size(i);
    s.stride[i] = t.stride(i);
  }
  return s;
}

}  // namespace vosops
