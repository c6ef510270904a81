// topk CUDA kernels (torch-free). One block per (tile of kQT queries, batch[*head]); the key axis is swept in
// tiles of kKT keys, one key per thread for the scores. Each query row keeps a running top-k list in shared memory:
// a warp filters the row's tile scores against the current k-th logit with a ballot and lane 0 inserts the few
// survivors in key order (ties to the lower index). topk_attention folds the dense keys through an online softmax
// and the kept sparse keys after the sweep; its backward recomputes scores and scatters dk/dv with atomics.
// Plain FMA scores (no tensor cores yet); key tiles pass through shared memory so their loads are coalesced.
#include <algorithm>
#include <cstdint>

#include "common/cuda_types.cuh"
#include "topk/topk_cuda.cuh"

namespace vosops {
namespace topk {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kQT = 8;    // queries per block
constexpr int kKT = 128;  // keys per tile: one per thread

template <typename acc_t> __device__ __forceinline__ acc_t neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

inline size_t align8(size_t n) { return (n + 7) & ~size_t(7); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Keys of a tile are staged in shared memory kCT channels at a time, transposed with a padded row (kKS), so the
// loads are coalesced (consecutive threads read consecutive channels of one key) and the reads conflict-free.
constexpr int kCT = 32;
constexpr int kKS = kKT + 1;

// s[r * kKT + j] = scale * q_r . key(l0 + j) for j < lt (thread j sums its key's channels in order); q rows staged in
// shared memory (zero padded), ksh: kCT * kKS staging. Every thread of the block calls it (it synchronises).
template <typename T, typename acc_t>
__device__ void score_tile(const acc_t* qsh, const T* kb, int64_t skl, int64_t skc, int64_t C, int64_t l0, int64_t lt,
                           acc_t scale, acc_t* s, acc_t* ksh) {
  const int j = threadIdx.x;
  acc_t dot[kQT];
#pragma unroll
  for (int r = 0; r < kQT; ++r) dot[r] = acc_t(0);
  for (int64_t c0 = 0; c0 < C; c0 += kCT) {
    const int ct = static_cast<int>(C - c0 < kCT ? C - c0 : kCT);
    __syncthreads();  // every thread is done with the previous chunk
    for (int e = threadIdx.x; e < static_cast<int>(lt) * ct; e += kThreads) {
      const int jj = e / ct, cc = e % ct;
      ksh[cc * kKS + jj] = to_acc(kb[(l0 + jj) * skl + (c0 + cc) * skc]);
    }
    __syncthreads();
    if (j < lt) {
      for (int cc = 0; cc < ct; ++cc) {
        const acc_t kv = ksh[cc * kKS + j];
#pragma unroll
        for (int r = 0; r < kQT; ++r) dot[r] += qsh[r * C + c0 + cc] * kv;
      }
    }
  }
  if (j < lt) {
#pragma unroll
    for (int r = 0; r < kQT; ++r) s[r * kKT + j] = scale * dot[r];
  }
}

// Push the tile's scores of row r into its running list (one warp per row), kept sorted by logit descending with
// ties to the lower index: keys arrive in increasing index, so a new key equal to the k-th logit loses and
// `x > threshold` is the whole admission test. mask: the tile's key_mask or null.
template <typename acc_t>
__device__ __forceinline__ void select_tile(const acc_t* srow, int64_t lt, int64_t l0, const bool* mask, acc_t* vals,
                                            int64_t* idx, int64_t k, int64_t* count) {
  const int lane = threadIdx.x & 31;
  int64_t n = *count;
  acc_t thr = n < k ? neg_inf<acc_t>() : vals[k - 1];
  for (int64_t j0 = 0; j0 < lt; j0 += 32) {
    const int64_t j = j0 + lane;
    const acc_t v = j < lt ? srow[j] : neg_inf<acc_t>();
    const bool ok = j < lt && v > thr && (mask == nullptr || mask[j]);  // NaN and -inf never pass
    unsigned ballot = __ballot_sync(0xffffffffu, ok);
    if (lane == 0) {
      while (ballot) {
        const int bit = __ffs(ballot) - 1;
        ballot &= ballot - 1;
        const acc_t x = srow[j0 + bit];
        if (n == k && !(x > vals[k - 1])) continue;
        int64_t pos = n < k ? n++ : k - 1;
        while (pos > 0 && x > vals[pos - 1]) {
          vals[pos] = vals[pos - 1];
          idx[pos] = idx[pos - 1];
          --pos;
        }
        vals[pos] = x;
        idx[pos] = l0 + j0 + bit;
      }
      thr = n < k ? neg_inf<acc_t>() : vals[k - 1];
    }
    thr = __shfl_sync(0xffffffffu, thr, 0);
  }
  if (lane == 0) *count = n;
  __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) global_topk_kernel(const T* __restrict__ q, Shape3 qs,
                                                               const T* __restrict__ k, Shape3 ks,
                                                               const bool* __restrict__ mask, int64_t topk,
                                                               double scale_d, T* __restrict__ out_l,
                                                               int64_t* __restrict__ out_i) {
  using acc_t = typename AccType<T>::type;
  const int64_t M = qs.size[1], C = qs.size[2], L = ks.size[1];
  const int64_t b = blockIdx.y, m0 = static_cast<int64_t>(blockIdx.x) * kQT;
  const int qt = static_cast<int>(M - m0 < kQT ? M - m0 : kQT);
  VOSOPS_DYNAMIC_SMEM(smem);
  int64_t* idx = reinterpret_cast<int64_t*>(smem);              // kQT * topk
  int64_t* count = idx + kQT * topk;                              // kQT
  acc_t* vals = reinterpret_cast<acc_t*>(count + kQT);            // kQT * topk
  acc_t* s = vals + kQT * topk;                                   // kQT * kKT
  acc_t* qsh = s + kQT * kKT;                                     // kQT * C
  acc_t* ksh = qsh + kQT * C;                                     // kCT * kKS
  const acc_t scale = static_cast<acc_t>(scale_d);
  for (int64_t e = threadIdx.x; e < kQT * C; e += kThreads) {
    const int64_t r = e / C, c = e % C;
    qsh[e] = r < qt ? to_acc(q[b * qs.stride[0] + (m0 + r) * qs.stride[1] + c * qs.stride[2]]) : acc_t(0);
  }
  if (threadIdx.x < kQT) count[threadIdx.x] = 0;
  __syncthreads();
  const T* kb = k + b * ks.stride[0];
  const int warp = threadIdx.x >> 5;
  for (int64_t l0 = 0; l0 < L; l0 += kKT) {
    const int64_t lt = L - l0 < kKT ? L - l0 : kKT;
    score_tile(qsh, kb, ks.stride[1], ks.stride[2], C, l0, lt, scale, s, ksh);
    __syncthreads();
    for (int r = warp; r < qt; r += kWarps) {
      select_tile(s + r * kKT, lt, l0, mask ? mask + b * L + l0 : nullptr, vals + r * topk, idx + r * topk, topk,
                  count + r);
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < qt * topk; e += kThreads) {
    const int64_t r = e / topk, j = e % topk;
    const bool have = j < count[r];
    const int64_t o = (b * M + m0 + r) * topk + j;
    out_l[o] = from_acc<T>(have ? vals[e] : neg_inf<acc_t>());
    out_i[o] = have ? idx[e] : -1;
  }
}

// Per-row online-softmax step for a tile whose scores are in s: replaces them by p = exp(s - m_new) and records
// alpha = exp(m_old - m_new). One warp per row.
template <typename acc_t>
__device__ void softmax_step(acc_t* srow, int64_t lt, acc_t* m, acc_t* l, acc_t* alpha) {
  const int lane = threadIdx.x & 31;
  acc_t mx = neg_inf<acc_t>();
  for (int64_t j = lane; j < lt; j += 32) mx = max(mx, srow[j]);
  mx = warp_max(mx);
  const acc_t m_new = max(*m, mx);
  const acc_t m_safe = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
  acc_t sum = 0;
  for (int64_t j = lane; j < lt; j += 32) {
    const acc_t p = exp(srow[j] - m_safe);
    srow[j] = p;
    sum += p;
  }
  sum = warp_sum(sum);
  __syncwarp();
  if (lane == 0) {
    const acc_t a = exp(*m - m_safe);
    *alpha = a;
    *l = *l * a + sum;
    *m = m_new;
  }
  __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_kernel(const T* __restrict__ q, Shape4 qs,
                                                                     const T* __restrict__ k, Shape4 ks,
                                                                     const T* __restrict__ v, Shape4 vs, int64_t dense,
                                                                     int64_t kk, double scale_d, T* __restrict__ out,
                                                                     typename AccType<T>::type* __restrict__ lse,
                                                                     int64_t* __restrict__ index) {
  using acc_t = typename AccType<T>::type;
  const int64_t H = qs.size[1], M = qs.size[2], D = qs.size[3], L = ks.size[2], Dv = vs.size[3];
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H, m0 = static_cast<int64_t>(blockIdx.x) * kQT;
  const int qt = static_cast<int>(M - m0 < kQT ? M - m0 : kQT);
  VOSOPS_DYNAMIC_SMEM(smem);
  int64_t* idx = reinterpret_cast<int64_t*>(smem);  // kQT * kk
  int64_t* count = idx + kQT * kk;                    // kQT
  acc_t* vals = reinterpret_cast<acc_t*>(count + kQT);
  acc_t* s = vals + kQT * kk;       // kQT * kKT
  acc_t* qsh = s + kQT * kKT;       // kQT * D
  acc_t* acc = qsh + kQT * D;       // kQT * Dv
  acc_t* mrow = acc + kQT * Dv;     // kQT
  acc_t* lrow = mrow + kQT;         // kQT
  acc_t* alpha = lrow + kQT;        // kQT
  acc_t* ksh = alpha + kQT;         // kCT * kKS
  const acc_t scale = static_cast<acc_t>(scale_d);
  const T* qb = q + b * qs.stride[0] + h * qs.stride[1];
  const T* kb = k + b * ks.stride[0] + h * ks.stride[1];
  const T* vb = v + b * vs.stride[0] + h * vs.stride[1];
  for (int64_t e = threadIdx.x; e < kQT * D; e += kThreads) {
    const int64_t r = e / D, c = e % D;
    qsh[e] = r < qt ? to_acc(qb[(m0 + r) * qs.stride[2] + c * qs.stride[3]]) : acc_t(0);
  }
  for (int64_t e = threadIdx.x; e < kQT * Dv; e += kThreads) acc[e] = acc_t(0);
  if (threadIdx.x < kQT) {
    mrow[threadIdx.x] = neg_inf<acc_t>();
    lrow[threadIdx.x] = acc_t(0);
    count[threadIdx.x] = 0;
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  for (int64_t l0 = 0; l0 < dense; l0 += kKT) {
    const int64_t lt = dense - l0 < kKT ? dense - l0 : kKT;
    score_tile(qsh, kb, ks.stride[2], ks.stride[3], D, l0, lt, scale, s, ksh);
    __syncthreads();
    for (int r = warp; r < qt; r += kWarps) softmax_step(s + r * kKT, lt, mrow + r, lrow + r, alpha + r);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < qt * Dv; e += kThreads) {
      const int64_t r = e / Dv, c = e % Dv;
      acc_t a = acc[e] * alpha[r];
      const acc_t* p = s + r * kKT;
      for (int64_t j = 0; j < lt; ++j) a += p[j] * to_acc(vb[(l0 + j) * vs.stride[2] + c * vs.stride[3]]);
      acc[e] = a;
    }
    __syncthreads();
  }
  if (kk > 0) {
    for (int64_t l0 = dense; l0 < L; l0 += kKT) {
      const int64_t lt = L - l0 < kKT ? L - l0 : kKT;
      score_tile(qsh, kb, ks.stride[2], ks.stride[3], D, l0, lt, scale, s, ksh);
      __syncthreads();
      for (int r = warp; r < qt; r += kWarps) {
        select_tile(s + r * kKT, lt, l0, nullptr, vals + r * kk, idx + r * kk, kk, count + r);
      }
      __syncthreads();
    }
    if (threadIdx.x < qt) {  // fold the kept logits into the softmax: vals become the weights exp(x - m)
      const int r = threadIdx.x;
      const int64_t n = count[r];
      const acc_t m_new = n > 0 ? max(mrow[r], vals[r * kk]) : mrow[r];
      const acc_t m_safe = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
      const acc_t a = exp(mrow[r] - m_safe);
      acc_t l = lrow[r] * a;
      for (int64_t j = 0; j < n; ++j) {
        vals[r * kk + j] = exp(vals[r * kk + j] - m_safe);
        l += vals[r * kk + j];
      }
      alpha[r] = a;
      lrow[r] = l;
      mrow[r] = m_new;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < qt * Dv; e += kThreads) {
      const int64_t r = e / Dv, c = e % Dv;
      acc_t a = acc[e] * alpha[r];
      for (int64_t j = 0; j < count[r]; ++j) {
        a += vals[r * kk + j] * to_acc(vb[idx[r * kk + j] * vs.stride[2] + c * vs.stride[3]]);
      }
      acc[e] = a;
    }
    for (int64_t e = threadIdx.x; e < qt * kk; e += kThreads) {
      const int64_t r = e / kk, j = e % kk;
      index[(bh * M + m0 + r) * kk + j] = j < count[r] ? idx[e] : -1;
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < qt * Dv; e += kThreads) {
    const int64_t r = e / Dv, c = e % Dv;
    const acc_t l = lrow[r];
    out[(bh * M + m0 + r) * Dv + c] = from_acc<T>(l > acc_t(0) ? acc[e] / l : acc_t(0));  // nothing kept: 0
  }
  if (threadIdx.x < qt) {
    const acc_t l = lrow[threadIdx.x];
    lse[bh * M + m0 + threadIdx.x] = l > acc_t(0) ? mrow[threadIdx.x] + log(l) : neg_inf<acc_t>();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_kernel(
    const T* __restrict__ g, Shape4 gs, const T* __restrict__ q, Shape4 qs, const T* __restrict__ k, Shape4 ks,
    const T* __restrict__ v, Shape4 vs, const T* __restrict__ o, const typename AccType<T>::type* __restrict__ lse,
    const int64_t* __restrict__ index, int64_t dense, int64_t kk, double scale_d,
    typename AccType<T>::type* __restrict__ dq, typename AccType<T>::type* __restrict__ dk,
    typename AccType<T>::type* __restrict__ dv) {
  using acc_t = typename AccType<T>::type;
  const int64_t H = qs.size[1], M = qs.size[2], D = qs.size[3], L = ks.size[2], Dv = vs.size[3];
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H, m0 = static_cast<int64_t>(blockIdx.x) * kQT;
  const int qt = static_cast<int>(M - m0 < kQT ? M - m0 : kQT);
  VOSOPS_DYNAMIC_SMEM(smem);
  acc_t* s = reinterpret_cast<acc_t*>(smem);  // kQT * kKT: scores, then P
  acc_t* ds = s + kQT * kKT;                   // kQT * kKT
  acc_t* qsh = ds + kQT * kKT;                 // kQT * D
  acc_t* gsh = qsh + kQT * D;                  // kQT * Dv
  acc_t* dqsh = gsh + kQT * Dv;                // kQT * D
  acc_t* lrow = dqsh + kQT * D;                // kQT
  acc_t* drow = lrow + kQT;                    // kQT
  acc_t* ksh = drow + kQT;                     // kCT * kKS
  const acc_t scale = static_cast<acc_t>(scale_d);
  const T* qb = q + b * qs.stride[0] + h * qs.stride[1];
  const T* kb = k + b * ks.stride[0] + h * ks.stride[1];
  const T* vb = v + b * vs.stride[0] + h * vs.stride[1];
  const T* gb = g + b * gs.stride[0] + h * gs.stride[1];
  for (int64_t e = threadIdx.x; e < kQT * D; e += kThreads) {
    const int64_t r = e / D, c = e % D;
    qsh[e] = r < qt ? to_acc(qb[(m0 + r) * qs.stride[2] + c * qs.stride[3]]) : acc_t(0);
    dqsh[e] = acc_t(0);
  }
  for (int64_t e = threadIdx.x; e < kQT * Dv; e += kThreads) {
    const int64_t r = e / Dv, c = e % Dv;
    gsh[e] = r < qt ? to_acc(gb[(m0 + r) * gs.stride[2] + c * gs.stride[3]]) : acc_t(0);
  }
  __syncthreads();
  if (threadIdx.x < kQT) {
    const int r = threadIdx.x;
    acc_t d = 0, l = neg_inf<acc_t>();
    if (r < qt) {
      for (int64_t c = 0; c < Dv; ++c) d += gsh[r * Dv + c] * to_acc(o[(bh * M + m0 + r) * Dv + c]);
      l = lse[bh * M + m0 + r];
    }
    drow[r] = d;
    lrow[r] = l;
  }
  __syncthreads();
  acc_t* dkb = dk + bh * L * D;
  acc_t* dvb = dv + bh * L * Dv;
  for (int64_t l0 = 0; l0 < dense; l0 += kKT) {
    const int64_t lt = dense - l0 < kKT ? dense - l0 : kKT;
    score_tile(qsh, kb, ks.stride[2], ks.stride[3], D, l0, lt, scale, s, ksh);
    __syncthreads();
    const int64_t j = threadIdx.x;
    if (j < lt) {  // thread j: P and dS of its key for every query of the tile, then its dk/dv rows
      const T* vr = vb + (l0 + j) * vs.stride[2];
      for (int r = 0; r < kQT; ++r) {
        const acc_t p = (r < qt && lrow[r] != neg_inf<acc_t>()) ? exp(s[r * kKT + j] - lrow[r]) : acc_t(0);
        acc_t dp = 0;
        for (int64_t c = 0; c < Dv; ++c) dp += gsh[r * Dv + c] * to_acc(vr[c * vs.stride[3]]);
        s[r * kKT + j] = p;
        ds[r * kKT + j] = p * (dp - drow[r]);
      }
      for (int64_t c = 0; c < Dv; ++c) {
        acc_t a = 0;
        for (int r = 0; r < kQT; ++r) a += s[r * kKT + j] * gsh[r * Dv + c];
        atomicAdd(dvb + (l0 + j) * Dv + c, a);
      }
      for (int64_t c = 0; c < D; ++c) {
        acc_t a = 0;
        for (int r = 0; r < kQT; ++r) a += ds[r * kKT + j] * qsh[r * D + c];
        atomicAdd(dkb + (l0 + j) * D + c, scale * a);
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < qt * D; e += kThreads) {
      const int64_t r = e / D, c = e % D;
      acc_t a = 0;
      for (int64_t jj = 0; jj < lt; ++jj) a += ds[r * kKT + jj] * to_acc(kb[(l0 + jj) * ks.stride[2] + c * ks.stride[3]]);
      dqsh[e] += scale * a;
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < qt * kk; e += kThreads) {  // sparse pairs (query r, kept key j)
    const int64_t r = e / kk;
    const int64_t key = index[(bh * M + m0 + r) * kk + e % kk];
    // An empty slot (-1), or a key outside the sparse keys that only a directly passed index can hold (the CPU op
    // raises; here a check would synchronise with the host): skipped, never read through.
    if (key < dense || key >= L || lrow[r] == neg_inf<acc_t>()) continue;
    const T* kr = kb + key * ks.stride[2];
    const T* vr = vb + key * vs.stride[2];
    acc_t sc = 0, dp = 0;
    for (int64_t c = 0; c < D; ++c) sc += qsh[r * D + c] * to_acc(kr[c * ks.stride[3]]);
    for (int64_t c = 0; c < Dv; ++c) dp += gsh[r * Dv + c] * to_acc(vr[c * vs.stride[3]]);
    const acc_t p = exp(scale * sc - lrow[r]);
    const acc_t dsv = scale * p * (dp - drow[r]);
    for (int64_t c = 0; c < Dv; ++c) atomicAdd(dvb + key * Dv + c, p * gsh[r * Dv + c]);
    for (int64_t c = 0; c < D; ++c) {
      atomicAdd(dkb + key * D + c, dsv * qsh[r * D + c]);
      atomicAdd(dqsh + r * D + c, dsv * to_acc(kr[c * ks.stride[3]]));
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < qt * D; e += kThreads) dq[(bh * M + m0) * D + e] = dqsh[e];
}

// Dynamic shared memory of each kernel (the host emulation sizes its blocks with these too).
template <typename acc_t>
size_t global_topk_smem(int64_t topk, int64_t C) {
  return align8(sizeof(int64_t) * (kQT * topk + kQT)) +
         sizeof(acc_t) * (kQT * topk + kQT * kKT + kQT * C + kCT * kKS);
}
template <typename acc_t>
size_t attention_forward_smem(int64_t kk, int64_t D, int64_t Dv) {
  return align8(sizeof(int64_t) * (kQT * kk + kQT)) +
         sizeof(acc_t) * (kQT * kk + kQT * kKT + kQT * D + kQT * Dv + 3 * kQT + kCT * kKS);
}
template <typename acc_t>
size_t attention_backward_smem(int64_t D, int64_t Dv) {
  return sizeof(acc_t) * (2 * kQT * kKT + 2 * kQT * D + kQT * Dv + 2 * kQT + kCT * kKS);
}

#ifndef VOSOPS_CUDA_EMULATION
template <typename T>
cudaError_t launch_global_topk(const void* q, Shape3 qs, const void* k, Shape3 ks, const bool* mask, int64_t topk,
                               double scale, void* out_l, int64_t* out_i, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const int64_t B = qs.size[0], M = qs.size[1], C = qs.size[2];
  const size_t smem = global_topk_smem<acc_t>(topk, C);
  if (const cudaError_t err = allow_dynamic_smem(global_topk_kernel<T>, smem); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((M + kQT - 1) / kQT), static_cast<unsigned>(B));
  global_topk_kernel<T><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(q), qs, static_cast<const T*>(k), ks,
                                                          mask, topk, scale, static_cast<T*>(out_l), out_i);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_attention_forward(const void* q, Shape4 qs, const void* k, Shape4 ks, const void* v, Shape4 vs,
                                     int64_t dense, int64_t kk, double scale, void* out, void* lse, int64_t* index,
                                     cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const int64_t B = qs.size[0], H = qs.size[1], M = qs.size[2], D = qs.size[3], Dv = vs.size[3];
  const size_t smem = attention_forward_smem<acc_t>(kk, D, Dv);
  if (const cudaError_t err = allow_dynamic_smem(attention_forward_kernel<T>, smem); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((M + kQT - 1) / kQT), static_cast<unsigned>(B * H));
  attention_forward_kernel<T><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(q), qs, static_cast<const T*>(k), ks, static_cast<const T*>(v), vs, dense, kk, scale,
      static_cast<T*>(out), static_cast<acc_t*>(lse), index);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_attention_backward(const void* g, Shape4 gs, const void* q, Shape4 qs, const void* k, Shape4 ks,
                                      const void* v, Shape4 vs, const void* o, const void* lse, const int64_t* index,
                                      int64_t dense, int64_t kk, double scale, void* dq, void* dk, void* dv,
                                      cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const int64_t B = qs.size[0], H = qs.size[1], M = qs.size[2], D = qs.size[3], Dv = vs.size[3];
  const size_t smem = attention_backward_smem<acc_t>(D, Dv);
  if (const cudaError_t err = allow_dynamic_smem(attention_backward_kernel<T>, smem); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((M + kQT - 1) / kQT), static_cast<unsigned>(B * H));
  attention_backward_kernel<T><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(g), gs, static_cast<const T*>(q), qs, static_cast<const T*>(k), ks,
      static_cast<const T*>(v), vs, static_cast<const T*>(o), static_cast<const acc_t*>(lse), index, dense, kk, scale,
      static_cast<acc_t*>(dq), static_cast<acc_t*>(dk), static_cast<acc_t*>(dv));
  return cudaGetLastError();
}

#endif  // VOSOPS_CUDA_EMULATION

}  // namespace

size_t global_topk_shared_bytes(DType dtype, int64_t topk, int64_t C) {
  return dtype == DType::Float64 ? global_topk_smem<double>(topk, C) : global_topk_smem<float>(topk, C);
}

size_t topk_attention_shared_bytes(DType dtype, int64_t kk, int64_t D, int64_t Dv) {
  if (dtype == DType::Float64)
    return std::max(attention_forward_smem<double>(kk, D, Dv), attention_backward_smem<double>(D, Dv));
  return std::max(attention_forward_smem<float>(kk, D, Dv), attention_backward_smem<float>(D, Dv));
}

#ifndef VOSOPS_CUDA_EMULATION
cudaError_t global_topk_cuda(DType dtype, const void* q, Shape3 qs, const void* k, Shape3 ks, const bool* key_mask,
                             int64_t topk, double scale, void* out_logits, int64_t* out_index, cudaStream_t stream) {
  if (qs.size[0] * qs.size[1] == 0) return cudaSuccess;
  VOSOPS_CUDA_DISPATCH(dtype, launch_global_topk<T>(q, qs, k, ks, key_mask, topk, scale, out_logits, out_index, stream))
}

cudaError_t topk_attention_forward_cuda(DType dtype, const void* q, Shape4 qs, const void* k, Shape4 ks, const void* v,
                                        Shape4 vs, int64_t dense, int64_t kk, double scale, void* out, void* lse,
                                        int64_t* index, cudaStream_t stream) {
  if (qs.size[0] * qs.size[1] * qs.size[2] == 0) return cudaSuccess;
  VOSOPS_CUDA_DISPATCH(dtype, launch_attention_forward<T>(q, qs, k, ks, v, vs, dense, kk, scale, out, lse, index, stream))
}

cudaError_t topk_attention_backward_cuda(DType dtype, const void* grad_out, Shape4 gs, const void* q, Shape4 qs,
                                         const void* k, Shape4 ks, const void* v, Shape4 vs, const void* out,
                                         const void* lse, const int64_t* index, int64_t dense, int64_t kk, double scale,
                                         void* dq, void* dk, void* dv, cudaStream_t stream) {
  if (qs.size[0] * qs.size[1] * qs.size[2] == 0) return cudaSuccess;
  VOSOPS_CUDA_DISPATCH(dtype, launch_attention_backward<T>(grad_out, gs, q, qs, k, ks, v, vs, out, lse, index, dense,
                                                           kk, scale, dq, dk, dv, stream))
}

#endif  // VOSOPS_CUDA_EMULATION

}  // namespace topk
}  // namespace vosops
