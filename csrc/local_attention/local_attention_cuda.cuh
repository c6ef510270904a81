// local_attention CUDA launchers: torch-free (raw pointers, sizes, a stream). Return the launch error.
//
// Layouts (the glue prepares them): q (B, H, W, C), k (B, N, H, W, C), v (B, N, H, W, Cv), all float32 and
// contiguous (channels-last, so a score is one contiguous dot product); offsets (B, N, 2, H, W) int32 already
// rounded, or null; cols: the Q in-window columns p = (dy+r)(2r+1) + (dx+r), ascending, in device memory.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "local_attention/local_attention_math.h"

namespace vosops {
namespace local_attention {

// Largest topk the CUDA kernels keep per thread (the glue rejects larger ones with a clear error).
constexpr int64_t kCudaMaxTopk = 128;

struct CudaProblem {
  int64_t B, N, C, Cv, H, W;
  int64_t radius, dilation, P, Q;
  float scale;
  int64_t topk;  // 0: every candidate
  Normalize normalize;
  bool zero_border;
  const float* q;
  const float* k;
  const float* v;
  const int32_t* offsets;
  const int32_t* cols;
};

// out (B, Cv, H, W) float32; stats (B, H, W, 2) float32 [log-sum-exp (+inf: nothing kept), threshold];
// top_logits float32 / top_index int64 (B, H, W, topk), untouched when topk == 0.
cudaError_t forward_cuda(const CudaProblem& p, float* out, float* stats, float* top_logits, int64_t* top_index,
                         cudaStream_t stream);

// grad_out (B, H, W, Cv) float32 channels-last; grad_logits (B, H, W, topk) float32 or null. The gradients are
// zero-filled float32 accumulators in the channels-last layouts of q, k, v (dk, dv through atomics), or null.
cudaError_t backward_cuda(const CudaProblem& p, const float* grad_out, const float* grad_logits, const float* stats,
                          const int64_t* top_index, float* dq, float* dk, float* dv, cudaStream_t stream);

}  // namespace local_attention
}  // namespace vosops
