// kmeans CUDA launchers: torch-free (raw pointers, sizes, a stream). Return the launch error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/host_device.h"

namespace vosops {
namespace kmeans {

// Points per CTA of the step kernel; the partial sums are per chunk, so the reduction order is fixed.
constexpr int64_t kCudaChunk = 1024;

inline int64_t cuda_chunks(int64_t N) { return (N + kCudaChunk - 1) / kCudaChunk; }

// Bytes of scratch step_cuda needs for the per-chunk partial sums and counts (0 for the assignment only).
size_t step_workspace_bytes(DType dtype, int64_t B, int64_t N, int64_t D, int64_t K, bool accumulate);

// x: contiguous (B, N, D) of `dtype`; lengths: (B,) int64 (clamped to [0, N]); centers: contiguous (B, K, D) in the
// accumulation type (float64 for Float64, else float32). Outputs: labels (B, N) int64 (-1 past the length),
// mindist (B, N) and, when sums is not null, sums (B, K, D) (accumulation type) and counts (B, K) int64.
// workspace: step_workspace_bytes(...) bytes, suitably aligned (any cudaMalloc'd / caching-allocator block).
cudaError_t step_cuda(DType dtype, const void* x, int64_t B, int64_t N, int64_t D, const int64_t* lengths,
                      const void* centers, int64_t K, int64_t* labels, void* mindist, void* sums, int64_t* counts,
                      void* workspace, cudaStream_t stream);

}  // namespace kmeans
}  // namespace vosops
