// kmeans CUDA kernels (torch-free): one launch per Lloyd step for all problems, then a deterministic reduction.
//
// step_kernel: a CTA per (chunk of kCudaChunk points, problem). The problem's centres sit in shared memory; the
// chunk is streamed through a shared tile of kTile points (coalesced loads, each x element read from global memory
// once). Eight lanes share a point: each sums a strided eighth of its D squared differences to every centre, the
// group reduces with shuffles, and all eight agree on the argmin (ties to the lower index). Per-cluster sums are
// accumulated in shared memory by column: thread t owns feature columns t, t+blockDim, ..., walking the tile's
// points in order, so no atomics and a fixed summation order. Each CTA writes its partial sums and counts.
// reduce_kernel: sums the partials of every chunk in chunk order (split over 8 slices, then combined in a fixed
// order), so the result is bitwise reproducible.
#include <cstdint>

#include "common/cuda_types.cuh"
#include "kmeans/kmeans_cuda.cuh"

namespace vosops {
namespace kmeans {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerPoint = 8;
constexpr int kTile = kThreads / kLanesPerPoint;  // points per shared tile
constexpr int kSlices = 8;                       // chunk slices per reduction CTA

// Row stride of the shared tile: a multiple of 32 plus 8, so the 4 points x 8 lanes of a warp hit 32 banks.
__host__ __device__ inline int tile_stride(int64_t D) { return static_cast<int>(((D + 31) / 32) * 32 + 8); }

template <typename acc_t>
size_t step_smem_bytes(int64_t D, int64_t K, bool accumulate) {
  const size_t accs = static_cast<size_t>(K * D) * (accumulate ? 2 : 1) + static_cast<size_t>(kTile) * tile_stride(D);
  return accs * sizeof(acc_t) + static_cast<size_t>(kTile + K) * sizeof(int);
}

template <typename T, bool ACCUM>
__global__ void __launch_bounds__(kThreads, 4) step_kernel(const T* __restrict__ x, int64_t N, int D, int K,
                                                        const int64_t* __restrict__ lengths,
                                                        const typename AccType<T>::type* __restrict__ centers,
                                                        int64_t* __restrict__ labels,
                                                        typename AccType<T>::type* __restrict__ mindist,
                                                        typename AccType<T>::type* __restrict__ psum,
                                                        int64_t* __restrict__ pcount) {
  using acc_t = typename AccType<T>::type;
  VOSOPS_DYNAMIC_SMEM(smem_raw);
  const int S = tile_stride(D);
  acc_t* cs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* xs = cs + K * D;
  acc_t* ssum = xs + kTile * S;
  int* slab = reinterpret_cast<int*>(ssum + (ACCUM ? K * D : 0));
  int* scount = slab + kTile;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.y, chunk = blockIdx.x, nchunk = gridDim.x;
  int64_t len = lengths[b];
  len = len < 0 ? 0 : (len > N ? N : len);
  const int64_t p0 = chunk * kCudaChunk;
  const int64_t p1 = (p0 + kCudaChunk < N) ? p0 + kCudaChunk : N;

  const acc_t* cb = centers + b * K * D;
  for (int e = tid; e < K * D; e += kThreads) {
    cs[e] = cb[e];
    if (ACCUM) ssum[e] = acc_t(0);
  }
  for (int k = tid; ACCUM && k < K; k += kThreads) scount[k] = 0;
  __syncthreads();

  const int pl = tid / kLanesPerPoint, q = tid % kLanesPerPoint;
  for (int64_t t0 = p0; t0 < p1; t0 += kTile) {
    const int np = static_cast<int>((p1 - t0) < kTile ? (p1 - t0) : kTile);
    const T* xt = x + (b * N + t0) * D;
    for (int e = tid; e < kTile * D; e += kThreads) {
      const int row = e / D, col = e % D;
      xs[row * S + col] = row < np ? to_acc(xt[e]) : acc_t(0);
    }
    __syncthreads();

    acc_t best = acc_t(0);
    int arg = 0;
    const acc_t* xr = xs + pl * S;
    for (int k = 0; k < K; ++k) {
      const acc_t* ck = cs + k * D;
      acc_t part = acc_t(0);
      for (int d = q; d < D; d += kLanesPerPoint) {
        const acc_t v = xr[d] - ck[d];
        part += v * v;
      }
      for (int off = kLanesPerPoint / 2; off > 0; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
      if (k == 0 || part < best) {
        best = part;
        arg = k;
      }
    }
    if (q == 0 && pl < np) {
      const int64_t i = t0 + pl;
      const bool valid = i < len;
      labels[b * N + i] = valid ? arg : -1;
      mindist[b * N + i] = valid ? best : acc_t(0);
      slab[pl] = valid ? arg : -1;
    }
    __syncthreads();
    if (ACCUM) {
      for (int d = tid; d < D; d += kThreads) {
        for (int p = 0; p < np; ++p) {
          const int l = slab[p];
          if (l >= 0) ssum[l * D + d] += xs[p * S + d];
        }
      }
      if (tid == 0) {
        for (int p = 0; p < np; ++p)
          if (slab[p] >= 0) scount[slab[p]] += 1;
      }
      __syncthreads();  // the next tile overwrites xs and slab
    }
  }
  if (ACCUM) {
    __syncthreads();
    acc_t* out = psum + (b * nchunk + chunk) * K * D;
    for (int e = tid; e < K * D; e += kThreads) out[e] = ssum[e];
    for (int k = tid; k < K; k += kThreads) pcount[(b * nchunk + chunk) * K + k] = scount[k];
  }
}

// grid (ceil(K*D / 32), B), kThreads threads: lane e of 32 elements, slice s sums chunks s, s+8, ...; the 8 slice
// sums are then added in slice order. CTA x == 0 also reduces the counts.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const acc_t* __restrict__ psum,
                                                          const int64_t* __restrict__ pcount, int64_t nchunk,
                                                          int64_t K, int64_t D, acc_t* __restrict__ sums,
                                                          int64_t* __restrict__ counts) {
  __shared__ acc_t part[kSlices][32];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int64_t b = blockIdx.y, KD = K * D;
  const int64_t e = blockIdx.x * 32 + lane;
  acc_t s = acc_t(0);
  if (e < KD) {
    for (int64_t ch = slice; ch < nchunk; ch += kSlices) s += psum[(b * nchunk + ch) * KD + e];
  }
  part[slice][lane] = s;
  __syncthreads();
  if (slice == 0 && e < KD) {
    acc_t total = acc_t(0);
    for (int j = 0; j < kSlices; ++j) total += part[j][lane];
    sums[b * KD + e] = total;
  }
  if (blockIdx.x == 0) {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      int64_t c = 0;
      for (int64_t ch = 0; ch < nchunk; ++ch) c += pcount[(b * nchunk + ch) * K + k];
      counts[b * K + k] = c;
    }
  }
}

// Byte size of the partial sums, rounded up to 8 so the int64 counts that follow are aligned.
inline size_t partial_sum_bytes(size_t acc, int64_t parts, int64_t K, int64_t D) {
  return (static_cast<size_t>(parts * K * D) * acc + 7) / 8 * 8;
}

#ifndef VOSOPS_CUDA_EMULATION
template <typename T>
cudaError_t launch(const void* x, int64_t B, int64_t N, int64_t D, const int64_t* lengths, const void* centers,
                   int64_t K, int64_t* labels, void* mindist, void* sums, int64_t* counts, void* workspace,
                   cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const bool accumulate = sums != nullptr;
  const int64_t nchunk = cuda_chunks(N);
  if (B > 65535 || nchunk > 0x7fffffff || K * D > (1 << 24)) return cudaErrorInvalidConfiguration;
  const size_t smem = step_smem_bytes<acc_t>(D, K, accumulate);
  auto kernel = accumulate ? step_kernel<T, true> : step_kernel<T, false>;
  if (smem > 48 * 1024) {
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // K * D too large for shared memory
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  acc_t* psum = static_cast<acc_t*>(workspace);
  int64_t* pcount = accumulate ? reinterpret_cast<int64_t*>(static_cast<char*>(workspace) +
                                                            partial_sum_bytes(sizeof(acc_t), B * nchunk, K, D))
                               : nullptr;
  const dim3 grid(static_cast<unsigned int>(nchunk), static_cast<unsigned int>(B));
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x), N, static_cast<int>(D), static_cast<int>(K), lengths,
                                           static_cast<const acc_t*>(centers), labels, static_cast<acc_t*>(mindist),
                                           psum, pcount);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !accumulate) return err;
  const dim3 rgrid(static_cast<unsigned int>((K * D + 31) / 32), static_cast<unsigned int>(B));
  reduce_kernel<acc_t><<<rgrid, kThreads, 0, stream>>>(psum, pcount, nchunk, K, D, static_cast<acc_t*>(sums), counts);
  return cudaGetLastError();
}
#endif  // VOSOPS_CUDA_EMULATION

}  // namespace

size_t step_workspace_bytes(DType dtype, int64_t B, int64_t N, int64_t D, int64_t K, bool accumulate) {
  if (!accumulate) return 0;
  const size_t acc = dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  const int64_t parts = B * cuda_chunks(N);
  return partial_sum_bytes(acc, parts, K, D) + static_cast<size_t>(parts * K) * sizeof(int64_t);
}

#ifndef VOSOPS_CUDA_EMULATION
cudaError_t step_cuda(DType dtype, const void* x, int64_t B, int64_t N, int64_t D, const int64_t* lengths,
                      const void* centers, int64_t K, int64_t* labels, void* mindist, void* sums, int64_t* counts,
                      void* workspace, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch<float>(x, B, N, D, lengths, centers, K, labels, mindist, sums, counts, workspace, stream);
    case DType::Float64:
      return launch<double>(x, B, N, D, lengths, centers, K, labels, mindist, sums, counts, workspace, stream);
    case DType::Float16:
      return launch<__half>(x, B, N, D, lengths, centers, K, labels, mindist, sums, counts, workspace, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(x, B, N, D, lengths, centers, K, labels, mindist, sums, counts, workspace,
                                   stream);
  }
  return cudaErrorInvalidValue;
}
#endif  // VOSOPS_CUDA_EMULATION

}  // namespace kmeans
}  // namespace vosops
