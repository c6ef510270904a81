// Host emulation of the kmeans CUDA kernels (csrc/kmeans/kmeans_cuda.cu), for tests on machines without a GPU:
// every CUDA thread is a host thread (block_emulation.h: shared memory, __syncthreads, shuffles), blocks run in turn,
// with the launcher's geometry (kThreads, one CTA per chunk of kCudaChunk points and problem, then the reduction).
#include <vector>

#include "block_emulation.h"

#include "kmeans/kmeans_cuda.cu"

namespace {

template <typename T>
int step(const T* x, int64_t B, int64_t N, int64_t D, const int64_t* lengths, const T* centers, int64_t K,
         int64_t* labels, T* mindist, T* sums, int64_t* counts) {
  using namespace vosops::kmeans;
  const bool accumulate = sums != nullptr;
  const int64_t nchunk = cuda_chunks(N);
  const vosops::DType dtype = sizeof(T) == 8 ? vosops::DType::Float64 : vosops::DType::Float32;
  std::vector<int64_t> workspace((step_workspace_bytes(dtype, B, N, D, K, accumulate) + 7) / 8);
  T* psum = reinterpret_cast<T*>(workspace.data());
  int64_t* pcount = accumulate ? reinterpret_cast<int64_t*>(reinterpret_cast<char*>(workspace.data()) +
                                                            partial_sum_bytes(sizeof(T), B * nchunk, K, D))
                               : nullptr;
  const auto grid_x = static_cast<unsigned>(nchunk), grid_y = static_cast<unsigned>(B);
  const size_t smem = step_smem_bytes<T>(D, K, accumulate);
  const bool ok = emu::launch(grid_x, grid_y, kThreads, smem, [&] {
    if (accumulate) {
      step_kernel<T, true>(x, N, static_cast<int>(D), static_cast<int>(K), lengths, centers, labels, mindist, psum,
                           pcount);
    } else {
      step_kernel<T, false>(x, N, static_cast<int>(D), static_cast<int>(K), lengths, centers, labels, mindist, psum,
                            pcount);
    }
  });
  if (!ok) return 1;
  if (!accumulate) return 0;
  const auto rgrid_x = static_cast<unsigned>((K * D + 31) / 32);
  return emu::launch(rgrid_x, grid_y, kThreads, 0, [&] {
    reduce_kernel<T>(psum, pcount, nchunk, K, D, sums, counts);
  }) ? 0 : 1;
}

}  // namespace

// double_ != 0: x, centres, mindist and sums are double, else float. sums/counts null: assignment only.
extern "C" int emu_kmeans_step(int double_, const void* x, int64_t B, int64_t N, int64_t D, const int64_t* lengths,
                               const void* centers, int64_t K, int64_t* labels, void* mindist, void* sums,
                               int64_t* counts) {
  if (double_) {
    return step(static_cast<const double*>(x), B, N, D, lengths, static_cast<const double*>(centers), K, labels,
                static_cast<double*>(mindist), static_cast<double*>(sums), counts);
  }
  return step(static_cast<const float*>(x), B, N, D, lengths, static_cast<const float*>(centers), K, labels,
              static_cast<float*>(mindist), static_cast<float*>(sums), counts);
}
