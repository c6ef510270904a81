// local_affinity / local_aggregate CUDA kernels (torch-free), in the tensors' own (B, [N,] C, H, W) layouts so
// neighbouring threads (consecutive j) read neighbouring query pixels and, without offsets, neighbouring keys.
//   scores : one thread per (b, n, p, i, j) output logit, a loop over channels
//   gather : one thread per (b, c, i, j) output, a loop over the N*P candidates
//   scatter: one thread per (b, n, p, i, j) candidate, fp32 atomics into x-shaped gradients over channels
// Grid-stride loops with int64 indices (tensors beyond 2^31 elements).
#include <cmath>
#include <cstdint>

#include "local_attention/local_affinity_cuda.cuh"
#include "common/cuda_types.cuh"

namespace vosops {
namespace local_affinity {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t position(const Geometry& g, int64_t b, int64_t n, int64_t p, int64_t i, int64_t j) {
  int64_t oy = 0, ox = 0;
  if (g.offsets != nullptr) {
    const int32_t* o = g.offsets + ((b * g.N + n) * 2 * g.H + i) * g.W + j;
    ox = o[0];
    oy = o[g.H * g.W];
  }
  return candidate_pos(i, j, oy, ox, p, g.radius, g.dilation, g.H, g.W);
}

__global__ void __launch_bounds__(kThreads) scores_kernel(const Geometry g, const float* __restrict__ a,
                                                          const float* __restrict__ x, int64_t C, float scale,
                                                          float fill, float* __restrict__ out) {
  const int64_t HW = g.H * g.W, total = g.B * g.N * g.P * HW;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ij = e % HW, bnp = e / HW, p = bnp % g.P, bn = bnp / g.P, b = bn / g.N, n = bn % g.N;
    if (!in_window(p, g.radius, g.circle)) {
      out[e] = -INFINITY;
      continue;
    }
    const int64_t pos = position(g, b, n, p, ij / g.W, ij % g.W);
    if (pos < 0) {
      out[e] = fill;
      continue;
    }
    const float* ap = a + b * C * HW + ij;
    const float* xp = x + bn * C * HW + pos;
    float s = 0.f;
    for (int64_t c = 0; c < C; ++c) s = fmaf(__ldg(ap + c * HW), __ldg(xp + c * HW), s);
    out[e] = scale * s;
  }
}

__global__ void __launch_bounds__(kThreads) gather_kernel(const Geometry g, const float* __restrict__ w,
                                                          const float* __restrict__ x, int64_t C, float scale,
                                                          float* __restrict__ out) {
  const int64_t HW = g.H * g.W, total = g.B * C * HW;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ij = e % HW, bc = e / HW, c = bc % C, b = bc / C, i = ij / g.W, j = ij % g.W;
    float s = 0.f;
    for (int64_t n = 0; n < g.N; ++n) {
      const int64_t bn = b * g.N + n;
      const float* xp = x + (bn * C + c) * HW;
      for (int64_t p = 0; p < g.P; ++p) {
        if (!in_window(p, g.radius, g.circle)) continue;
        const int64_t pos = position(g, b, n, p, i, j);
        if (pos >= 0) s = fmaf(__ldg(w + (bn * g.P + p) * HW + ij), __ldg(xp + pos), s);
      }
    }
    out[e] = scale * s;
  }
}

__global__ void __launch_bounds__(kThreads) scatter_kernel(const Geometry g, const float* __restrict__ w,
                                                           const float* __restrict__ a, int64_t C, float scale,
                                                           float* __restrict__ out) {
  const int64_t HW = g.H * g.W, total = g.B * g.N * g.P * HW;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ij = e % HW, bnp = e / HW, p = bnp % g.P, bn = bnp / g.P, b = bn / g.N, n = bn % g.N;
    if (!in_window(p, g.radius, g.circle)) continue;
    const int64_t pos = position(g, b, n, p, ij / g.W, ij % g.W);
    if (pos < 0) continue;
    const float wv = scale * __ldg(w + e);
    const float* ap = a + b * C * HW + ij;
    float* op = out + bn * C * HW + pos;
    for (int64_t c = 0; c < C; ++c) atomicAdd(op + c * HW, wv * __ldg(ap + c * HW));
  }
}

}  // namespace

// Launchers. tests/cuda_emulation compiles the kernels above as host code (one emulated thread walks the
// grid-stride loops) to check their logic against the reference on machines without a GPU; it skips these.
#ifndef VOSOPS_CUDA_EMULATION
cudaError_t scores_cuda(const Geometry& g, const float* a, const float* x, int64_t C, float scale, float fill,
                        float* out, cudaStream_t stream) {
  const int64_t total = g.B * g.N * g.P * g.H * g.W;
  if (total == 0) return cudaSuccess;
  scores_kernel<<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(g, a, x, C, scale, fill, out);
  return cudaGetLastError();
}

cudaError_t gather_cuda(const Geometry& g, const float* w, const float* x, int64_t C, float scale, float* out,
                        cudaStream_t stream) {
  const int64_t total = g.B * C * g.H * g.W;
  if (total == 0) return cudaSuccess;
  gather_kernel<<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(g, w, x, C, scale, out);
  return cudaGetLastError();
}

cudaError_t scatter_cuda(const Geometry& g, const float* w, const float* a, int64_t C, float scale, float* out,
                         cudaStream_t stream) {
  const int64_t total = g.B * g.N * g.P * g.H * g.W;
  if (total == 0 || C == 0) return cudaSuccess;
  scatter_kernel<<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(g, w, a, C, scale, out);
  return cudaGetLastError();
}
#endif  // VOSOPS_CUDA_EMULATION

}  // namespace local_affinity
}  // namespace vosops
