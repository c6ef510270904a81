// local_affinity / local_aggregate CUDA launchers: torch-free (raw pointers, sizes, a stream). Return the launch
// error. All tensors float32 and contiguous in their own layouts: a (B, C, H, W) query-side tensor, x (B, N, C, H, W)
// reference-side, w (B, N, P, H, W) per-candidate weights; g.offsets int32 (B, N, 2, H, W) already rounded, or null.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "local_attention/local_affinity_math.h"

namespace vosops {
namespace local_affinity {

// out (B, N, P, H, W) = scale * <a[b, :, i, j], x[b, n, :, pos]>; out of frame: fill; outside a circle: -inf.
cudaError_t scores_cuda(const Geometry& g, const float* a, const float* x, int64_t C, float scale, float fill,
                        float* out, cudaStream_t stream);

// out (B, C, H, W) = scale * sum over in-window, in-frame candidates of w * x[b, n, c, pos].
cudaError_t gather_cuda(const Geometry& g, const float* w, const float* x, int64_t C, float scale, float* out,
                        cudaStream_t stream);

// out (B, N, C, H, W) += scale * w * a[b, c, i, j] at every in-window, in-frame candidate (fp32 atomics; out
// zero-filled by the caller).
cudaError_t scatter_cuda(const Geometry& g, const float* w, const float* a, int64_t C, float scale, float* out,
                         cudaStream_t stream);

}  // namespace local_affinity
}  // namespace vosops
