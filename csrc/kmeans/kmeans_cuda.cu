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

// update_kernel: the rest of a Lloyd iteration, one CTA per problem: scikit-learn's relocation of empty clusters
// (the e-th empty cluster, in index order, takes the e-th farthest valid point, ties to the lower index; the point
// leaves its old cluster's sum and count, subtracted in e order), centre = mean (kept when the cluster is empty),
// the squared centre shift, convergence (labels unchanged or shift <= tol) and the active / n_iter flags. It reads
// the problem's N distances only when one of its clusters is empty (rare after the first iterations), so an
// iteration costs no pass over the points and no torch.topk, and it decides on the device (no host sync).
constexpr int kUpdateThreads = 256;

inline size_t update_smem_bytes(int64_t K) {
  return static_cast<size_t>(5 * K) * sizeof(int64_t);
}

template <typename T>
__global__ void __launch_bounds__(kUpdateThreads) update_kernel(
    const T* __restrict__ x, int64_t N, int64_t D, int64_t K, const int64_t* __restrict__ lengths,
    const int64_t* __restrict__ labels, const typename AccType<T>::type* __restrict__ mindist,
    const typename AccType<T>::type* __restrict__ sums, const int64_t* __restrict__ counts,
    const typename AccType<T>::type* __restrict__ centers, const bool* __restrict__ active,
    const int64_t* __restrict__ n_iter, const bool* __restrict__ labels_equal,
    const typename AccType<T>::type* __restrict__ tol, typename AccType<T>::type* __restrict__ centers_out,
    bool* __restrict__ active_out, int64_t* __restrict__ n_iter_out) {
  using acc_t = typename AccType<T>::type;
  __shared__ acc_t red_v[kUpdateThreads];
  __shared__ int64_t red_i[kUpdateThreads];
  __shared__ int64_t n_empty;
  VOSOPS_DYNAMIC_SMEM(smem);
  int64_t* cnt = reinterpret_cast<int64_t*>(smem);  // K: counts after relocation
  int64_t* empty_k = cnt + K;                        // E: the empty clusters in index order
  int64_t* pick = empty_k + K;                       // E: the point each takes (-1: none left)
  int64_t* old = pick + K;                           // E: that point's cluster
  int64_t* slot = old + K;                           // K: e for an empty cluster, else -1
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, KD = K * D;
  const acc_t* cb = centers + b * KD;
  acc_t* ob = centers_out + b * KD;
  if (!active[b]) {  // a finished problem: everything stays
    for (int64_t e = tid; e < KD; e += kUpdateThreads) ob[e] = cb[e];
    if (tid == 0) {
      active_out[b] = false;
      n_iter_out[b] = n_iter[b];
    }
    return;
  }
  if (tid == 0) {
    int64_t E = 0;
    for (int64_t k = 0; k < K; ++k) {
      cnt[k] = counts[b * K + k];
      slot[k] = -1;
      if (cnt[k] == 0) {
        slot[k] = E;
        empty_k[E++] = k;
      }
    }
    n_empty = E;
  }
  __syncthreads();
  const int64_t E = n_empty;
  int64_t len = lengths[b];
  len = len < 0 ? 0 : (len > N ? N : len);
  const int64_t* lab = labels + b * N;
  const acc_t* md = mindist + b * N;
  for (int64_t e = 0; e < E; ++e) {
    // the farthest valid point not taken yet: each thread scans a stride in increasing index (ties stay lower),
    // then a tree over the threads ordered by (distance desc, index asc)
    acc_t bv = acc_t(0);
    int64_t bi = -1;
    for (int64_t i = tid; i < len; i += kUpdateThreads) {
      if (lab[i] < 0) continue;
      bool taken = false;
      for (int64_t f = 0; f < e; ++f) taken |= pick[f] == i;
      if (taken) continue;
      if (bi < 0 || md[i] > bv) {
        bv = md[i];
        bi = i;
      }
    }
    red_v[tid] = bv;
    red_i[tid] = bi;
    __syncthreads();
    for (int h = kUpdateThreads / 2; h > 0; h /= 2) {
      if (tid < h) {
        const acc_t ov = red_v[tid + h];
        const int64_t oi = red_i[tid + h];
        const int64_t mi = red_i[tid];
        if (oi >= 0 && (mi < 0 || ov > red_v[tid] || (ov == red_v[tid] && oi < mi))) {
          red_v[tid] = ov;
          red_i[tid] = oi;
        }
      }
      __syncthreads();
    }
    if (tid == 0) {
      const int64_t p = red_i[0];
      pick[e] = p;
      old[e] = p >= 0 ? lab[p] : -1;
      if (p >= 0) {
        cnt[old[e]] -= 1;
        cnt[empty_k[e]] = 1;
      }
    }
    __syncthreads();
  }
  const T* xb = x + b * N * D;
  acc_t part = acc_t(0);
  const int D32 = static_cast<int>(D);  // K * D <= 2^24 (the launcher checks): 32-bit division
  for (int e = tid; e < static_cast<int>(KD); e += kUpdateThreads) {  // e + 256 cannot overflow either
    const int k = e / D32, d = e % D32;
    // an empty cluster's sum is its point; another's loses the points taken from it, in e order
    const int64_t s_e = slot[k];
    const bool took = s_e >= 0 && pick[s_e] >= 0;
    acc_t s = took ? acc_t(0) : sums[b * KD + e];
    for (int64_t f = 0; f < E; ++f) {
      const int64_t p = pick[f];
      if (p < 0 || !(took ? f == s_e : old[f] == k)) continue;
      const acc_t xv = to_acc(xb[p * D + d]);
      s = took ? xv : s - xv;
    }
    const acc_t c = cb[e];
    const acc_t v = cnt[k] > 0 ? s / static_cast<acc_t>(cnt[k]) : c;
    ob[e] = v;
    part += (v - c) * (v - c);
  }
  red_v[tid] = part;
  __syncthreads();
  for (int h = kUpdateThreads / 2; h > 0; h /= 2) {
    if (tid < h) red_v[tid] += red_v[tid + h];
    __syncthreads();
  }
  if (tid == 0) {
    active_out[b] = !(labels_equal[b] || red_v[0] <= tol[b]);
    n_iter_out[b] = n_iter[b] + 1;
  }
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
  // cudaErrorInvalidValue: K * D too large for shared memory
  if (const cudaError_t err = allow_dynamic_smem(kernel, smem); err != cudaSuccess) return err;
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

template <typename T>
cudaError_t launch_update(const void* x, int64_t B, int64_t N, int64_t D, int64_t K, const int64_t* lengths,
                          const int64_t* labels, const void* mindist, const void* sums, const int64_t* counts,
                          const void* centers, const bool* active, const int64_t* n_iter, const bool* labels_equal,
                          const void* tol, void* centers_out, bool* active_out, int64_t* n_iter_out,
                          cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  update_kernel<T><<<static_cast<unsigned int>(B), kUpdateThreads, update_smem_bytes(K), stream>>>(
      static_cast<const T*>(x), N, D, K, lengths, labels, static_cast<const acc_t*>(mindist),
      static_cast<const acc_t*>(sums), counts, static_cast<const acc_t*>(centers), active, n_iter, labels_equal,
      static_cast<const acc_t*>(tol), static_cast<acc_t*>(centers_out), active_out, n_iter_out);
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
cudaError_t update_cuda(DType dtype, const void* x, int64_t B, int64_t N, int64_t D, int64_t K,
                        const int64_t* lengths, const int64_t* labels, const void* mindist, const void* sums,
                        const int64_t* counts, const void* centers, const bool* active, const int64_t* n_iter,
                        const bool* labels_equal, const void* tol, void* centers_out, bool* active_out,
                        int64_t* n_iter_out, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  // K * D <= 2^24 as step_cuda takes (an int64 loop counter in the kernel would cost registers and spill)
  if (K > kCudaUpdateMaxK || B > 0x7fffffff || K * D > (1 << 24)) return cudaErrorInvalidValue;
  VOSOPS_CUDA_DISPATCH(dtype, launch_update<T>(x, B, N, D, K, lengths, labels, mindist, sums, counts, centers, active,
                                               n_iter, labels_equal, tol, centers_out, active_out, n_iter_out, stream))
}

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
