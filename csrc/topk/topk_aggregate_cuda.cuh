// topk_aggregate CUDA launchers: torch-free (raw pointers, sizes, strides, a stream). Return the launch error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/host_device.h"
#include "topk/topk_cuda.cuh"

namespace vosops {
namespace topk {

// logits (B, M, K) contiguous of `dtype`, index (B, M, K) contiguous int64 in [-1, L); values (B, L, Cv) of `dtype`,
// any strides. kth = 0 for softmax, else threshold's k. workspace: B*M*K elements of the accumulation type
// (double for Float64, float otherwise). out (B, M, Cv) contiguous of `dtype`.
cudaError_t topk_aggregate_forward_cuda(DType dtype, const void* logits, const int64_t* index, const void* values,
                                        Shape3 vs, int64_t M, int64_t K, int64_t kth, void* workspace, void* out,
                                        cudaStream_t stream);

// grad_out (B, M, Cv) of `dtype`, any strides (gs); the other inputs as in the forward. workspace: 3*B*M*K elements
// of the accumulation type. grad_logits (B, M, K) contiguous of `dtype` (written) or null; grad_values_acc
// (B, L, Cv) contiguous zero-filled accumulator of the accumulation type (atomics) or null.
cudaError_t topk_aggregate_backward_cuda(DType dtype, const void* grad_out, Shape3 gs, const void* logits,
                                         const int64_t* index, const void* values, Shape3 vs, int64_t M, int64_t K,
                                         int64_t kth, void* workspace, void* grad_logits, void* grad_values_acc,
                                         cudaStream_t stream);

}  // namespace topk
}  // namespace vosops
