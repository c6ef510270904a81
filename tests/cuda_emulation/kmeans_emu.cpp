// Host emulation of the kmeans CUDA kernels (csrc/kmeans/kmeans_cuda.cu), for tests on machines without a GPU:
// every CUDA thread is a host thread (block_emulation.h: shared memory, __syncthreads, shuffles), blocks run in turn,
// with the launcher's geometry (kThreads, one CTA per chunk of kCudaChunk points and problem, then the reduction).
#include <vector>

#include "block_emulation.h"

#include "kmeans/kmeans_cuda.cu"

namespace {

template <typename T>
int step(const void* x_, int64_t B, int64_t N, int64_t D, const int64_t* lengths, const void* centers_, int64_t K,
         int64_t* labels, void* mindist_, void* sums_, int64_t* counts) {
  using namespace vosops::kmeans;
  using acc_t = typename vosops::AccType<T>::type;
  const T* x = static_cast<const T*>(x_);
  const acc_t* centers = static_cast<const acc_t*>(centers_);
  acc_t *mindist = static_cast<acc_t*>(mindist_), *sums = static_cast<acc_t*>(sums_);
  const bool accumulate = sums != nullptr;
  const int64_t nchunk = cuda_chunks(N);
  const vosops::DType dtype = sizeof(acc_t) == 8 ? vosops::DType::Float64 : vosops::DType::Float32;
  std::vector<int64_t> workspace((step_workspace_bytes(dtype, B, N, D, K, accumulate) + 7) / 8);
  acc_t* psum = reinterpret_cast<acc_t*>(workspace.data());
  int64_t* pcount = accumulate ? reinterpret_cast<int64_t*>(reinterpret_cast<char*>(workspace.data()) +
                                                            partial_sum_bytes(sizeof(acc_t), B * nchunk, K, D))
                               : nullptr;
  const auto grid_x = static_cast<unsigned>(nchunk), grid_y = static_cast<unsigned>(B);
  const size_t smem = step_smem_bytes<acc_t>(D, K, accumulate);
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
    reduce_kernel<acc_t>(psum, pcount, nchunk, K, D, sums, counts);
  }) ? 0 : 1;
}

template <typename T>
int update(const void* x, int64_t B, int64_t N, int64_t D, int64_t K, const int64_t* lengths, const int64_t* labels,
           const void* mindist, const void* sums, const int64_t* counts, const void* centers, const bool* active,
           const int64_t* n_iter, const bool* labels_equal, const void* tol, void* centers_out, bool* active_out,
           int64_t* n_iter_out) {
  using namespace vosops::kmeans;
  using acc_t = typename vosops::AccType<T>::type;
  if (K > kCudaUpdateMaxK) return 2;
  return emu::launch(static_cast<unsigned>(B), 1, kUpdateThreads, update_smem_bytes(K), [&] {
    update_kernel<T>(static_cast<const T*>(x), N, D, K, lengths, labels, static_cast<const acc_t*>(mindist),
                     static_cast<const acc_t*>(sums), counts, static_cast<const acc_t*>(centers), active, n_iter,
                     labels_equal, static_cast<const acc_t*>(tol), static_cast<acc_t*>(centers_out), active_out,
                     n_iter_out);
  }) ? 0 : 1;
}

}  // namespace

// The update kernel (the rest of a Lloyd iteration) with the launcher's geometry: one CTA per problem. Floating
// arguments other than x are in the accumulation type.
extern "C" int emu_kmeans_update(int dtype, const void* x, int64_t B, int64_t N, int64_t D, int64_t K,
                                 const int64_t* lengths, const int64_t* labels, const void* mindist, const void* sums,
                                 const int64_t* counts, const void* centers, const bool* active, const int64_t* n_iter,
                                 const bool* labels_equal, const void* tol, void* centers_out, bool* active_out,
                                 int64_t* n_iter_out) {
  EMU_DISPATCH(dtype, update<T>(x, B, N, D, K, lengths, labels, mindist, sums, counts, centers, active, n_iter,
                                labels_equal, tol, centers_out, active_out, n_iter_out))
}

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (x's type); centres, mindist and sums are in the accumulation
// type (float64 for float64, else float32). sums/counts null: assignment only.
extern "C" int emu_kmeans_step(int dtype, const void* x, int64_t B, int64_t N, int64_t D, const int64_t* lengths,
                               const void* centers, int64_t K, int64_t* labels, void* mindist, void* sums,
                               int64_t* counts) {
  EMU_DISPATCH(dtype, step<T>(x, B, N, D, lengths, centers, K, labels, mindist, sums, counts))
}
