// Shared by the CUDA glue files (*_cuda_glue.cpp, built only with CUDA): the launch check and PyTorch's current stream.
#pragma once
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <string>

#include "common/cuda_shared_memory.h"

namespace vosops {

// A launcher's cudaError_t as a RuntimeError naming the op.
inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// A kernel whose dynamic shared memory grows with an argument: the need against the current device's opt-in
// maximum per block, as a ValueError naming the argument (`what`) instead of a failed launch.
inline void check_shared_memory(const char* op, size_t need, const std::string& what) {
  int have = 0;
  TORCH_CHECK(optin_shared_memory(&have) == cudaSuccess, op, ": cannot read the device's shared memory limit");
  TORCH_CHECK_VALUE(need <= static_cast<size_t>(have), op, ": ", what, " needs ", need,
                    " bytes of shared memory per block; this GPU allows ", have, " (use a smaller value or the "
                    "triton backend)");
}

// A backward kernel that adds gradients with float atomics, whose order (and so the sum's rounding) varies from run
// to run: under torch.use_deterministic_algorithms(True), PyTorch's own rule, an error naming it (a warning with
// warn_only=True). vosops/_determinism.py does the same for the Triton kernels.
inline void alert_atomic_backward(const char* what) { at::globalContext().alertNotDeterministic(what); }

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
