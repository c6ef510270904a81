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

// The rest of a Lloyd iteration after step_cuda, one CTA per problem (the reference's relocate_empty and
// kmeans_update, and the active / n_iter bookkeeping of lloyd_iteration): relocation of empty clusters, new centres,
// convergence. x: contiguous (B, N, D) of `dtype`; labels, mindist, sums, counts: step_cuda's outputs; centers,
// sums, mindist, tol and centers_out in the accumulation type; active, labels_equal: (B,) bool; n_iter: (B,) int64.
// Inactive problems are copied through. K at most kCudaUpdateMaxK (its per-cluster lists sit in shared memory).
constexpr int64_t kCudaUpdateMaxK = 1024;
cudaError_t update_cuda(DType dtype, const void* x, int64_t B, int64_t N, int64_t D, int64_t K,
                        const int64_t* lengths, const int64_t* labels, const void* mindist, const void* sums,
                        const int64_t* counts, const void* centers, const bool* active, const int64_t* n_iter,
                        const bool* labels_equal, const void* tol, void* centers_out, bool* active_out,
                        int64_t* n_iter_out, cudaStream_t stream);

}  // namespace kmeans
}  // namespace vosops
