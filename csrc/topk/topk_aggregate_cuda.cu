// topk_aggregate CUDA kernels (torch-free). The work is O(B·M·K·Cv) gathers: a few flat grid-stride kernels,
// one thread per (row, candidate) for the weights and per (row, channel) for the sums, so every thread's loop is
// O(K) (O(K) more for "threshold": a count of the larger logits instead of a sort).
//   weights:   e[row, j] = exp(logit_j - row max) for kept candidates, else 0 (unnormalised)
//   forward:   out[row, c] = sum_j e_j v[b, index_j, c] / sum_j e_j          (0 for a row with nothing kept)
//   backward:  w = e / sum e, d_j = g . v_j; dlogit_j = w_j (d_j - sum_i w_i d_i); dv[index_j] += w_j g (atomics)
#include <cstdint>

#include "common/cuda_types.cuh"
#include "topk/merge_topk_math.h"
#include "topk/topk_aggregate_cuda.cuh"

namespace vosops {
namespace topk {
namespace {

constexpr int kAggThreads = 256;

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }

// Out-of-range indices are also rejected by the glue's device-side assert; skipping them here keeps every read
// in bounds whatever the order the stream reaches the two.
template <typename acc_t>
__device__ __forceinline__ bool takes_part(acc_t logit, int64_t index, int64_t L) {
  return candidate_valid(logit, index) && index < L;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kAggThreads)
    agg_weights_kernel(const T* __restrict__ logits, const int64_t* __restrict__ index, int64_t total, int64_t K,
                       int64_t L, int64_t kth, acc_t* __restrict__ e) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = t / K, j = t % K;
    const T* lr = logits + row * K;
    const int64_t* ir = index + row * K;
    const acc_t x = to_acc(lr[j]);
    acc_t mx = static_cast<acc_t>(-INFINITY);
    int64_t greater = 0;
    for (int64_t i = 0; i < K; ++i) {
      const acc_t y = to_acc(lr[i]);
      if (!takes_part(y, ir[i], L)) continue;
      mx = y > mx ? y : mx;
      greater += y > x;
    }
    // The row maximum is always kept (nothing is greater), so the max over valid candidates is the kept max.
    const bool kept = takes_part(x, ir[j], L) && (kth == 0 || threshold_keeps(greater, kth, K));
    e[t] = kept ? acc_exp(x - mx) : acc_t(0);
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kAggThreads)
    agg_forward_kernel(const acc_t* __restrict__ e, const int64_t* __restrict__ index, const T* __restrict__ values,
                       Shape3 vs, int64_t total, int64_t M, int64_t K, int64_t Cv, T* __restrict__ out) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = t / Cv, c = t % Cv, b = row / M;
    const T* vb = values + b * vs.stride[0] + c * vs.stride[2];
    acc_t s = 0, acc = 0;
    for (int64_t j = 0; j < K; ++j) {
      const acc_t w = e[row * K + j];
      if (w == acc_t(0)) continue;  // dropped (or underflowed): its index may be -1
      s += w;
      acc += w * to_acc(vb[index[row * K + j] * vs.stride[1]]);
    }
    out[t] = from_acc<T>(s > acc_t(0) ? acc / s : acc_t(0));
  }
}

// Thread per (row, j): normalised weight w_j and, when the logits' gradient is wanted, d_j = g_row . v[index_j].
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kAggThreads)
    agg_backward_weights_kernel(const acc_t* __restrict__ e, const T* __restrict__ grad, Shape3 gs,
                                const int64_t* __restrict__ index, const T* __restrict__ values, Shape3 vs,
                                int64_t total, int64_t M, int64_t K, int64_t Cv, bool need_dots, acc_t* __restrict__ w,
                                acc_t* __restrict__ d) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = t / K, b = row / M, m = row % M;
    acc_t s = 0;
    for (int64_t i = 0; i < K; ++i) s += e[row * K + i];
    const acc_t wj = s > acc_t(0) ? e[t] / s : acc_t(0);
    w[t] = wj;
    if (!need_dots) continue;
    acc_t dot = 0;
    if (wj != acc_t(0)) {
      const T* gr = grad + b * gs.stride[0] + m * gs.stride[1];
      const T* vr = values + b * vs.stride[0] + index[t] * vs.stride[1];
      for (int64_t c = 0; c < Cv; ++c) dot += to_acc(gr[c * gs.stride[2]]) * to_acc(vr[c * vs.stride[2]]);
    }
    d[t] = dot;
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kAggThreads)
    agg_grad_logits_kernel(const acc_t* __restrict__ w, const acc_t* __restrict__ d, int64_t total, int64_t K,
                           T* __restrict__ grad_logits) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = t / K;
    acc_t mean = 0;  // sum_i w_i d_i: the softmax Jacobian's shared term
    for (int64_t i = 0; i < K; ++i) mean += w[row * K + i] * d[row * K + i];
    grad_logits[t] = from_acc<T>(w[t] * (d[t] - mean));
  }
}

// Thread per (row, j, c): dv[b, index_j, c] += w_j g[row, c]. Rows of one batch share memory slots: atomics.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kAggThreads)
    agg_grad_values_kernel(const acc_t* __restrict__ w, const T* __restrict__ grad, Shape3 gs,
                           const int64_t* __restrict__ index, int64_t total, int64_t M, int64_t K, int64_t L,
                           int64_t Cv, acc_t* __restrict__ dv) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t rj = t / Cv, c = t % Cv, row = rj / K, b = row / M, m = row % M;
    const acc_t wj = w[rj];
    if (wj == acc_t(0)) continue;
    const acc_t g = to_acc(grad[b * gs.stride[0] + m * gs.stride[1] + c * gs.stride[2]]);
    atomicAdd(dv + (b * L + index[rj]) * Cv + c, wj * g);
  }
}

}  // namespace

// Launchers. tests/cuda_emulation compiles the kernels above as host code (one emulated thread walks the
// grid-stride loops) to check their logic on machines without a GPU; it skips these.
#ifndef VOSOPS_CUDA_EMULATION
namespace {

template <typename T>
cudaError_t launch_aggregate_forward(const void* logits, const int64_t* index, const void* values, Shape3 vs,
                                     int64_t M, int64_t K, int64_t kth, void* workspace, void* out,
                                     cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const int64_t rows = vs.size[0] * M, Cv = vs.size[2];
  acc_t* e = static_cast<acc_t*>(workspace);
  if (rows * K > 0) {
    agg_weights_kernel<T, acc_t><<<grid_stride_blocks(rows * K, kAggThreads), kAggThreads, 0, stream>>>(
        static_cast<const T*>(logits), index, rows * K, K, vs.size[1], kth, e);
  }
  agg_forward_kernel<T, acc_t><<<grid_stride_blocks(rows * Cv, kAggThreads), kAggThreads, 0, stream>>>(
      e, index, static_cast<const T*>(values), vs, rows * Cv, M, K, Cv, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_aggregate_backward(const void* grad_out, Shape3 gs, const void* logits, const int64_t* index,
                                      const void* values, Shape3 vs, int64_t M, int64_t K, int64_t kth,
                                      void* workspace, void* grad_logits, void* grad_values_acc, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const int64_t rows = vs.size[0] * M, L = vs.size[1], Cv = vs.size[2], n = rows * K;
  acc_t* e = static_cast<acc_t*>(workspace);
  acc_t* w = e + n;
  acc_t* d = w + n;
  const T* g = static_cast<const T*>(grad_out);
  const T* v = static_cast<const T*>(values);
  const unsigned int blocks = grid_stride_blocks(n, kAggThreads);
  agg_weights_kernel<T, acc_t><<<blocks, kAggThreads, 0, stream>>>(static_cast<const T*>(logits), index, n, K, L, kth,
                                                                   e);
  agg_backward_weights_kernel<T, acc_t><<<blocks, kAggThreads, 0, stream>>>(e, g, gs, index, v, vs, n, M, K, Cv,
                                                                            grad_logits != nullptr, w, d);
  if (grad_logits != nullptr) {
    agg_grad_logits_kernel<T, acc_t><<<blocks, kAggThreads, 0, stream>>>(w, d, n, K, static_cast<T*>(grad_logits));
  }
  if (grad_values_acc != nullptr && Cv > 0) {
    agg_grad_values_kernel<T, acc_t><<<grid_stride_blocks(n * Cv, kAggThreads), kAggThreads, 0, stream>>>(
        w, g, gs, index, n * Cv, M, K, L, Cv, static_cast<acc_t*>(grad_values_acc));
  }
  return cudaGetLastError();
}

}  // namespace


cudaError_t topk_aggregate_forward_cuda(DType dtype, const void* logits, const int64_t* index, const void* values,
                                        Shape3 vs, int64_t M, int64_t K, int64_t kth, void* workspace, void* out,
                                        cudaStream_t stream) {
  if (vs.size[0] * M * vs.size[2] == 0) return cudaSuccess;
  VOSOPS_CUDA_DISPATCH(dtype, launch_aggregate_forward<T>(logits, index, values, vs, M, K, kth, workspace, out, stream))
}

cudaError_t topk_aggregate_backward_cuda(DType dtype, const void* grad_out, Shape3 gs, const void* logits,
                                         const int64_t* index, const void* values, Shape3 vs, int64_t M, int64_t K,
                                         int64_t kth, void* workspace, void* grad_logits, void* grad_values_acc,
                                         cudaStream_t stream) {
  if (vs.size[0] * M * K == 0) return cudaSuccess;
  VOSOPS_CUDA_DISPATCH(dtype, launch_aggregate_backward<T>(grad_out, gs, logits, index, values, vs, M, K, kth,
                                                          workspace, grad_logits, grad_values_acc, stream))
}

#endif  // VOSOPS_CUDA_EMULATION

}  // namespace topk
}  // namespace vosops
