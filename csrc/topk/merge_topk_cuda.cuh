// merge_topk CUDA launcher: torch-free (raw pointers, sizes, a stream). Returns the launch error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/host_device.h"

namespace vosops {
namespace topk {

// logits, index: (rows, N) contiguous (the concatenated candidate lists), 1 <= topk <= N. out_logits (rows, topk)
// contiguous of `dtype`, out_index and out_source (rows, topk) contiguous int64; padding -inf / -1 / -1.
cudaError_t merge_topk_cuda(DType dtype, const void* logits, const int64_t* index, int64_t rows, int64_t N,
                            int64_t topk, void* out_logits, int64_t* out_index, int64_t* out_source,
                            cudaStream_t stream);

}  // namespace topk
}  // namespace vosops
