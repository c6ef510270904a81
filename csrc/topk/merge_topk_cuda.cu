// merge_topk CUDA kernel (torch-free). One thread per (row, input candidate p): p's rank is the number of valid
// candidates of its row that come before it (logit desc, index asc, position asc), so every output slot is
// written by exactly one thread without a sort or any shared state; the thread of position p also writes padding
// slot p when the row has fewer than topk valid candidates. O(N) per thread: the lists being merged are short
// (CRW: 10 + 10), and the row is read from L1/L2 by N neighbouring threads.
#include <cstdint>

#include "common/cuda_types.cuh"
#include "topk/merge_topk_cuda.cuh"
#include "topk/merge_topk_math.h"

namespace vosops {
namespace topk {
namespace {

constexpr int kMergeThreads = 256;

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    merge_topk_kernel(const T* __restrict__ logits, const int64_t* __restrict__ index, int64_t total, int64_t N,
                      int64_t topk, T* __restrict__ out_logits, int64_t* __restrict__ out_index,
                      int64_t* __restrict__ out_source) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = t / N, p = t % N;
    const T* lr = logits + row * N;
    const int64_t* ir = index + row * N;
    const acc_t x = to_acc(lr[p]);
    const int64_t xi = ir[p];
    int64_t rank = 0, valid = 0;
    for (int64_t q = 0; q < N; ++q) {
      const acc_t y = to_acc(lr[q]);
      const int64_t yi = ir[q];
      if (!candidate_valid(y, yi)) continue;
      ++valid;
      rank += merge_before(y, yi, q, x, xi, p);
    }
    const int64_t o = row * topk;
    if (candidate_valid(x, xi) && rank < topk) {
      out_logits[o + rank] = lr[p];
      out_index[o + rank] = xi;
      out_source[o + rank] = p;
    }
    if (p >= valid && p < topk) {
      out_logits[o + p] = from_acc<T>(static_cast<acc_t>(-INFINITY));
      out_index[o + p] = -1;
      out_source[o + p] = -1;
    }
  }
}

}  // namespace

// The launcher; tests/cuda_emulation compiles the kernel above as host code and skips it.
#ifndef VOSOPS_CUDA_EMULATION
namespace {

template <typename T>
cudaError_t launch_merge(const void* logits, const int64_t* index, int64_t rows, int64_t N, int64_t topk,
                         void* out_logits, int64_t* out_index, int64_t* out_source, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const int64_t total = rows * N;
  const int64_t blocks = (total + kMergeThreads - 1) / kMergeThreads;
  const unsigned int grid = static_cast<unsigned int>(blocks < (1LL << 30) ? blocks : (1LL << 30));
  merge_topk_kernel<T, acc_t><<<grid, kMergeThreads, 0, stream>>>(static_cast<const T*>(logits), index, total, N,
                                                                   topk, static_cast<T*>(out_logits), out_index,
                                                                   out_source);
  return cudaGetLastError();
}

}  // namespace

cudaError_t merge_topk_cuda(DType dtype, const void* logits, const int64_t* index, int64_t rows, int64_t N,
                            int64_t topk, void* out_logits, int64_t* out_index, int64_t* out_source,
                            cudaStream_t stream) {
  if (rows * N == 0) return cudaSuccess;
#define VOSOPS_MERGE_LAUNCH(T) launch_merge<T>(logits, index, rows, N, topk, out_logits, out_index, out_source, stream)
  switch (dtype) {
    case DType::Float32: return VOSOPS_MERGE_LAUNCH(float);
    case DType::Float64: return VOSOPS_MERGE_LAUNCH(double);
    case DType::Float16: return VOSOPS_MERGE_LAUNCH(__half);
    case DType::BFloat16: return VOSOPS_MERGE_LAUNCH(__nv_bfloat16);
  }
#undef VOSOPS_MERGE_LAUNCH
  return cudaErrorInvalidValue;
}
#endif  // VOSOPS_CUDA_EMULATION

}  // namespace topk
}  // namespace vosops
