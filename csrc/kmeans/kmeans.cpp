// kmeans: op schemas and the CPU kernels: the fused Lloyd pass (kmeans_step), the assignment (kmeans_assign) and
// the whole Lloyd loop of every problem in one call (kmeans_lloyd).
//
// Distances are sum_d (x_d - c_d)^2, the reference's formula (not |c|^2 - 2 x.c, whose rounding would move labels
// away from the reference's at near-ties), accumulated in float32 (float64 for float64 input); the argmin takes
// the lower index on ties. Points are processed in chunks of kChunk; each chunk has its own partial sums and they
// are added in chunk order, so results do not depend on the thread count, nor on whether a problem runs alone or
// in a batch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "common/native.h"
#include "kmeans/kmeans.h"

namespace vosops {
namespace kmeans {
namespace {

#define VOSOPS_INLINE __attribute__((always_inline)) inline

// Explicit 8-lane vectors (GCC/Clang vector extensions): one AVX register for float in the AVX2 clone, pairs of
// SSE registers in the baseline one.
template <typename T>
struct Vec8 {
  typedef T type __attribute__((vector_size(8 * sizeof(T))));
};

template <typename V, typename T>
VOSOPS_INLINE V load8(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// Lane sums of up to 8 vectors at once: lane k of the result is the sum of a[k]'s lanes, in the fixed tree
// ((l0+l1) + (l2+l3)) + ((l4+l5) + (l6+l7)) (the pattern of vhaddps: a transpose and the sums together).
template <typename V>
VOSOPS_INLINE V hsum8x8(const V* a) {
  const auto pair = [](const V& u, const V& v) -> V {  // [u0+u1, u2+u3, v0+v1, v2+v3, u4+u5, u6+u7, v4+v5, v6+v7]
    return __builtin_shufflevector(u, v, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(u, v, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const V t0 = pair(pair(a[0], a[1]), pair(a[2], a[3]));  // [lo sums of a0..a3, hi sums of a0..a3]
  const V t1 = pair(pair(a[4], a[5]), pair(a[6], a[7]));
  return __builtin_shufflevector(t0, t1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(t0, t1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// Squared distances of one point to KB <= 8 consecutive centres, returned in lanes 0..KB-1 (the others are 0).
// All KB accumulators stay in registers so each x vector is loaded once; lane l of a centre's accumulator sums the
// dimensions l, l+8, ..., then hsum8x8 and the D % 8 tail. A centre's distance does not depend on KB.
template <int KB, typename T>
VOSOPS_INLINE typename Vec8<T>::type dist_block(const T* __restrict x, const T* __restrict c, int64_t D) {
  using V = typename Vec8<T>::type;
  static_assert(KB >= 1 && KB <= 8, "blocks of 1 to 8 centres");
  const int64_t Dv = D / 8 * 8;
  V acc[8];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) acc[k] = V{};
  for (int64_t d = 0; d < Dv; d += 8) {
    const V xv = load8<V>(x + d);
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) {
      const V t = xv - load8<V>(c + k * D + d);
      acc[k] += t * t;
    }
  }
  V r = hsum8x8(acc);
  for (int64_t d = Dv; d < D; ++d) {
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) {
      const T t = x[d] - c[k * D + d];
      r[k] += t * t;
    }
  }
  return r;
}

// Any K: blocks of 8 centres, then the remainder, into out (K).
template <typename T>
VOSOPS_INLINE void dist_any(const T* x, const T* c, int64_t K, int64_t D, T* out) {
  using V = typename Vec8<T>::type;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const V r = dist_block<8>(x, c + k * D, D);
    __builtin_memcpy(out + k, &r, sizeof(V));
  }
  const T* ck = c + k * D;
  V r{};
  switch (K - k) {
    case 1: r = dist_block<1>(x, ck, D); break;
    case 2: r = dist_block<2>(x, ck, D); break;
    case 3: r = dist_block<3>(x, ck, D); break;
    case 4: r = dist_block<4>(x, ck, D); break;
    case 5: r = dist_block<5>(x, ck, D); break;
    case 6: r = dist_block<6>(x, ck, D); break;
    case 7: r = dist_block<7>(x, ck, D); break;
    default: return;
  }
  for (int64_t j = 0; j < K - k; ++j) out[k + j] = r[j];
}

// Index of the smallest of d[0..n), ties to the lower index (the generic path, K > 8).
template <typename T>
VOSOPS_INLINE int64_t argmin(const T* d, int64_t n, T& best) {
  best = d[0];
  int64_t arg = 0;
  for (int64_t k = 1; k < n; ++k) {
    if (d[k] < best) {
      best = d[k];
      arg = k;
    }
  }
  return arg;
}

// Index of the smallest of lanes 0..KB-1 of r, ties to the lower index, without branches (their outcome is
// random once the clusters settle; mispredicted they cost more than the distances): a min tree over the lanes,
// then the lowest lane holding the minimum.
template <int KB, typename V, typename T>
VOSOPS_INLINE int64_t argmin8(V r, T& best) {
  using I = decltype(r == r);  // the integer vector of the lane masks
  const I lane = {0, 1, 2, 3, 4, 5, 6, 7};
  if constexpr (KB < 8) r = lane < KB ? r : V{} + std::numeric_limits<T>::infinity();
  const auto vmin = [](const auto& a, const auto& b) { return a < b ? a : b; };
  V m = vmin(r, __builtin_shufflevector(r, r, 4, 5, 6, 7, 0, 1, 2, 3));
  m = vmin(m, __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5));
  m = vmin(m, __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6));
  I idx = r == m ? lane : I{} + 8;
  idx = vmin(idx, __builtin_shufflevector(idx, idx, 4, 5, 6, 7, 0, 1, 2, 3));
  idx = vmin(idx, __builtin_shufflevector(idx, idx, 2, 3, 0, 1, 6, 7, 4, 5));
  idx = vmin(idx, __builtin_shufflevector(idx, idx, 1, 0, 3, 2, 5, 4, 7, 6));
  best = m[0];
  return idx[0];
}

// Points whose labels are found before any of them is added to the sums (see add_grouped).
constexpr int kBlock = 64;

// Adds the rows x[order[j]] to psum[k] for j in [start[k], start[k+1]) (the block's points grouped by cluster, in
// point order inside a cluster, so the sums are exactly those of adding point after point). Going cluster by
// cluster keeps up to 64 features of a sum in registers; adding each point to psum[label] straight after its
// argmin instead made every add wait for the argmin and chain through memory (about a third of the pass).
template <typename T>
VOSOPS_INLINE void add_grouped(const T* __restrict x, int64_t D, const int* order, const int* start, int64_t K,
                               T* __restrict psum) {
  using V = typename Vec8<T>::type;
  const int64_t Dv = D / 8 * 8;
  for (int64_t k = 0; k < K; ++k) {
    const int b = start[k], e = start[k + 1];
    if (b == e) continue;
    T* s = psum + k * D;
    int64_t d0 = 0;
    for (; d0 + 64 <= Dv; d0 += 64) {
      V acc[8];
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] = load8<V>(s + d0 + 8 * v);
      for (int j = b; j < e; ++j) {
        const T* xr = x + order[j] * D + d0;
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) acc[v] += load8<V>(xr + 8 * v);
      }
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) __builtin_memcpy(s + d0 + 8 * v, &acc[v], sizeof(V));
    }
    for (; d0 < Dv; d0 += 8) {
      V acc = load8<V>(s + d0);
      for (int j = b; j < e; ++j) acc += load8<V>(x + order[j] * D + d0);
      __builtin_memcpy(s + d0, &acc, sizeof(V));
    }
    for (int64_t d = Dv; d < D; ++d) {
      T acc = s[d];
      for (int j = b; j < e; ++j) acc += x[order[j] * D + d];
      s[d] = acc;
    }
  }
}

// One pass over the points [p0, p1) of one problem: label = nearest centre, mindist = its distance, and (when
// psum is given) the point added to its cluster's partial sum psum (K, D) and count pcount (K) (zeroed here).
// Returns whether any label differs from the one labels held before. KB > 0: K == KB known at compile time;
// KB == 0: any K, with dist (K) as scratch.
template <int KB, typename T>
VOSOPS_INLINE bool pass_body(const T* __restrict x, int64_t D, const T* __restrict c, int64_t K, int64_t p0,
                             int64_t p1, int64_t* __restrict labels, T* __restrict mindist, T* __restrict psum,
                             int64_t* __restrict pcount, T* __restrict dist) {
  if (psum != nullptr) {
    std::fill(psum, psum + K * D, T(0));
    std::fill(pcount, pcount + K, int64_t(0));
  }
  bool changed = false;
  int lab[kBlock];
  for (int64_t i0 = p0; i0 < p1; i0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, p1 - i0));
    for (int j = 0; j < n; ++j) {
      const int64_t i = i0 + j;
      T best;
      int64_t arg;
      if constexpr (KB > 0) {
        arg = argmin8<KB>(dist_block<KB>(x + i * D, c, D), best);
      } else {
        dist_any(x + i * D, c, K, D, dist);
        arg = argmin(dist, K, best);
      }
      changed |= labels[i] != arg;
      labels[i] = arg;
      mindist[i] = best;
      lab[j] = static_cast<int>(arg);
    }
    if (psum == nullptr) continue;
    if constexpr (KB > 0) {
      // counting sort of the block by cluster, then the grouped adds
      int start[KB + 1] = {}, pos[KB], order[kBlock];
      for (int j = 0; j < n; ++j) ++start[lab[j] + 1];
      for (int k = 0; k < KB; ++k) {
        pcount[k] += start[k + 1];
        start[k + 1] += start[k];
        pos[k] = start[k];
      }
      for (int j = 0; j < n; ++j) order[pos[lab[j]]++] = j;
      add_grouped(x + i0 * D, D, order, start, KB, psum);
    } else {
      for (int j = 0; j < n; ++j) {
        const T* xr = x + (i0 + j) * D;
        T* s = psum + lab[j] * D;
        for (int64_t d = 0; d < D; ++d) s[d] += xr[d];
        pcount[lab[j]] += 1;
      }
    }
  }
  return changed;
}

template <typename T>
VOSOPS_INLINE bool pass_dispatch(const T* x, int64_t D, const T* c, int64_t K, int64_t p0, int64_t p1,
                                 int64_t* labels, T* mindist, T* psum, int64_t* pcount, T* dist) {
  switch (K) {
    case 1: return pass_body<1>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    case 2: return pass_body<2>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    case 3: return pass_body<3>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    case 4: return pass_body<4>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    case 5: return pass_body<5>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    case 6: return pass_body<6>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    case 7: return pass_body<7>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    case 8: return pass_body<8>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
    default: return pass_body<0>(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
  }
}

// The pass is compiled twice, for AVX2 + FMA and for the baseline ISA, and picked once by what the CPU reports
// (by feature, not by CPU model, so AMD and Intel both get the AVX2 path). Results are reproducible on a given
// machine (FMA contraction differs between the two paths).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define VOSOPS_KMEANS_AVX2 __attribute__((target("avx2,fma")))
const bool kUseAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
#define VOSOPS_KMEANS_AVX2
const bool kUseAvx2 = false;
#endif

template <typename T>
VOSOPS_KMEANS_AVX2 bool pass_avx2(const T* x, int64_t D, const T* c, int64_t K, int64_t p0, int64_t p1,
                                  int64_t* labels, T* mindist, T* psum, int64_t* pcount, T* dist) {
  return pass_dispatch(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
}
template <typename T>
bool pass_base(const T* x, int64_t D, const T* c, int64_t K, int64_t p0, int64_t p1, int64_t* labels, T* mindist,
               T* psum, int64_t* pcount, T* dist) {
  return pass_dispatch(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
}
template <typename T>
bool pass(const T* x, int64_t D, const T* c, int64_t K, int64_t p0, int64_t p1, int64_t* labels, T* mindist, T* psum,
          int64_t* pcount, T* dist) {
  return kUseAvx2 ? pass_avx2(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist)
                  : pass_base(x, D, c, K, p0, p1, labels, mindist, psum, pcount, dist);
}

// sums (K, D) and counts (K) of a problem: its nchunk partials added in chunk order.
template <typename T>
void reduce_chunks(const T* psum, const int64_t* pcount, int64_t nchunk, int64_t K, int64_t D, T* sums,
                   int64_t* counts) {
  std::copy(psum, psum + K * D, sums);
  std::copy(pcount, pcount + K, counts);
  for (int64_t ch = 1; ch < nchunk; ++ch) {
    const T* p = psum + ch * K * D;
    for (int64_t j = 0; j < K * D; ++j) sums[j] += p[j];
    for (int64_t k = 0; k < K; ++k) counts[k] += pcount[ch * K + k];
  }
}

// scikit-learn's relocation of empty clusters (the reference's relocate_empty) for one problem of len points: the
// e-th empty cluster (in index order) takes the e-th farthest point from its centre (largest mindist, ties to the
// lower index); the point leaves its old cluster's sum and count. Labels are not changed.
template <typename T>
void relocate_empty(const T* x, int64_t len, int64_t D, int64_t K, const int64_t* labels, const T* mindist,
                    T* sums, int64_t* counts) {
  std::vector<int64_t> empty;
  for (int64_t k = 0; k < K; ++k)
    if (counts[k] == 0) empty.push_back(k);
  const size_t n = empty.size();
  std::vector<int64_t> far;  // the n farthest so far, farthest first
  far.reserve(n + 1);
  for (int64_t i = 0; i < len; ++i) {
    if (far.size() == n && !(mindist[i] > mindist[far.back()])) continue;
    auto pos = far.begin();
    while (pos != far.end() && !(mindist[i] > mindist[*pos])) ++pos;
    far.insert(pos, i);
    if (far.size() > n) far.pop_back();
  }
  for (size_t e = 0; e < n; ++e) {
    const int64_t p = far[e], old = labels[p], k = empty[e];
    const T* xp = x + p * D;
    for (int64_t d = 0; d < D; ++d) {
      sums[old * D + d] -= xp[d];
      sums[k * D + d] = xp[d];
    }
    counts[old] -= 1;
    counts[k] = 1;
  }
}

// Lloyd iterations for a set of problems, each exactly as the reference's lloyd: step (labels, sums, counts),
// relocation of empty clusters, centre = mean (kept when the cluster is empty), stop when no label changed or the
// squared centre shift summed over centres is <= tol[b], at most `iters` iterations; then the final assignment to
// the final centres. The passes over (problem, chunk) run through at::parallel_for (inline when already inside a
// parallel region: then this thread does all the work of these problems with no synchronisation).
template <typename T>
void lloyd(const T* x, const int64_t* lengths, int64_t N, int64_t D, int64_t K, const std::vector<int64_t>& probs,
           int64_t iters, const T* tol, T* centers, int64_t* labels, T* mindist, int64_t* n_iter) {
  const int64_t P = static_cast<int64_t>(probs.size());
  const int64_t maxchunk = (N + kChunk - 1) / kChunk;
  std::vector<T> psum(static_cast<size_t>(P * maxchunk * K * D)), sums(static_cast<size_t>(K * D));
  std::vector<int64_t> pcount(static_cast<size_t>(P * maxchunk * K)), counts(static_cast<size_t>(K));
  std::vector<int64_t> active;  // indices into probs
  std::vector<char> changed(static_cast<size_t>(P * maxchunk));
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (index into probs, chunk)
  auto make_tasks = [&]() {
    tasks.clear();
    for (const int64_t j : active)
      for (int64_t ch = 0; ch * kChunk < lengths[probs[j]]; ++ch) tasks.emplace_back(j, ch);
  };
  // One pass over every task; with_sums: the Lloyd step, else the final assignment.
  auto run_tasks = [&](bool with_sums) {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> dist(static_cast<size_t>(K));
      for (int64_t t = begin; t < end; ++t) {
        const auto [j, ch] = tasks[t];
        const int64_t b = probs[j], len = lengths[b];
        const int64_t slot = j * maxchunk + ch;
        changed[slot] = pass(x + b * N * D, D, centers + b * K * D, K, ch * kChunk, std::min(len, (ch + 1) * kChunk),
                             labels + b * N, mindist + b * N, with_sums ? psum.data() + slot * K * D : nullptr,
                             with_sums ? pcount.data() + slot * K : nullptr, dist.data());
      }
    });
  };
  for (int64_t j = 0; j < P; ++j) {
    const int64_t b = probs[j];
    std::fill(labels + b * N, labels + (b + 1) * N, int64_t(-1));  // also the "previous labels" of iteration 1
    std::fill(mindist + b * N + lengths[b], mindist + (b + 1) * N, T(0));
    n_iter[b] = 0;
    active.push_back(j);
  }
  for (int64_t it = 0; it < iters && !active.empty(); ++it) {
    make_tasks();
    run_tasks(true);
    std::vector<int64_t> still;
    for (const int64_t j : active) {
      const int64_t b = probs[j], len = lengths[b], nchunk = (len + kChunk - 1) / kChunk;
      bool any_changed = false;
      for (int64_t ch = 0; ch < nchunk; ++ch) any_changed |= changed[j * maxchunk + ch] != 0;
      reduce_chunks(psum.data() + j * maxchunk * K * D, pcount.data() + j * maxchunk * K, nchunk, K, D, sums.data(),
                    counts.data());
      if (std::find(counts.begin(), counts.end(), int64_t(0)) != counts.end())
        relocate_empty(x + b * N * D, len, D, K, labels + b * N, mindist + b * N, sums.data(), counts.data());
      T* c = centers + b * K * D;
      T shift = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (counts[k] == 0) continue;  // empty: the centre stays
        const T n = static_cast<T>(counts[k]);
        for (int64_t d = 0; d < D; ++d) {
          const T v = sums[k * D + d] / n;
          shift += (v - c[k * D + d]) * (v - c[k * D + d]);
          c[k * D + d] = v;
        }
      }
      n_iter[b] += 1;
      if (any_changed && !(shift <= tol[b])) still.push_back(j);
    }
    active.swap(still);
  }
  active.resize(static_cast<size_t>(P));  // every problem, once (some may still be active: iters ran out)
  for (int64_t j = 0; j < P; ++j) active[j] = j;
  make_tasks();
  run_tasks(false);
}

void check_lengths_cpu(const char* op, const at::Tensor& lengths, int64_t lo, int64_t N) {
  if (lengths.numel() == 0) return;
  const auto [mn, mx] = at::aminmax(lengths);
  TORCH_CHECK_VALUE(mn.item<int64_t>() >= lo && mx.item<int64_t>() <= N, op, ": lengths must lie in [", lo, ", ", N,
                    "], got [", mn.item<int64_t>(), ", ", mx.item<int64_t>(), "]");
}

// x as the kernels read it: contiguous, in the accumulation dtype (half inputs are widened once per call).
at::Tensor points(const at::Tensor& x) { return x.to(acc_type(x.scalar_type())).contiguous(); }

std::vector<at::Tensor> run_cpu(const char* op, const at::Tensor& x_in, const at::Tensor& lengths_in,
                                const at::Tensor& centers_in, bool accumulate) {
  check_inputs(op, x_in, lengths_in, centers_in);
  const at::Tensor x = points(x_in);
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers_in.size(1);
  TORCH_CHECK_VALUE(N > 0 && D > 0, op, ": x must have at least one point and one feature, got shape ", x.sizes());
  check_lengths_cpu(op, lengths, 0, N);
  const at::ScalarType acc = x.scalar_type();
  const at::Tensor centers = centers_in.to(acc).contiguous();
  at::Tensor labels = new_output({B, N}, x.options().dtype(at::kLong));
  at::Tensor mindist = new_output({B, N}, x.options());
  at::Tensor sums, counts;
  if (accumulate) {
    sums = new_output({B, K, D}, x.options());
    counts = new_output({B, K}, x.options().dtype(at::kLong));
  }
  const int64_t nchunk = (N + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES(acc, "kmeans_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* cp = centers.const_data_ptr<scalar_t>();
    const int64_t* len = lengths.const_data_ptr<int64_t>();
    int64_t* lab = labels.data_ptr<int64_t>();
    scalar_t* md = mindist.data_ptr<scalar_t>();
    std::vector<scalar_t> psum(accumulate ? static_cast<size_t>(B * nchunk * K * D) : 0);
    std::vector<int64_t> pcount(accumulate ? static_cast<size_t>(B * nchunk * K) : 0);
    at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> dist(static_cast<size_t>(K));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nchunk, ch = task % nchunk;
        const int64_t p0 = ch * kChunk, p1 = std::min(N, p0 + kChunk);
        const int64_t stop = std::clamp<int64_t>(len[b], p0, p1);  // padding from here: ignored
        pass(xp + b * N * D, D, cp + b * K * D, K, p0, stop, lab + b * N, md + b * N,
             accumulate ? psum.data() + task * K * D : nullptr, accumulate ? pcount.data() + task * K : nullptr,
             dist.data());
        std::fill(lab + b * N + stop, lab + b * N + p1, int64_t(-1));
        std::fill(md + b * N + stop, md + b * N + p1, scalar_t(0));
      }
    });
    if (!accumulate) return;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        reduce_chunks(psum.data() + b * nchunk * K * D, pcount.data() + b * nchunk * K, nchunk, K, D,
                      sums.data_ptr<scalar_t>() + b * K * D, counts.data_ptr<int64_t>() + b * K);
    });
  });
  if (accumulate) return {labels, mindist, sums, counts};
  return {labels, mindist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step_cpu(const at::Tensor& x,
                                                                         const at::Tensor& lengths,
                                                                         const at::Tensor& centers) {
  auto r = run_cpu("kmeans_step", x, lengths, centers, true);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& lengths,
                                                     const at::Tensor& centers) {
  auto r = run_cpu("kmeans_assign", x, lengths, centers, false);
  return {r[0], r[1]};
}

// The whole Lloyd loop of every problem in one call: no per-iteration op dispatch, allocation or Python. With at
// least two problems per thread, each thread takes whole problems (the next unstarted one when it finishes one)
// and runs them to convergence with no synchronisation between iterations; with fewer problems the threads share
// every iteration's (problem, chunk) passes. Both orders give the same result (per-chunk partial sums).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_lloyd_cpu(const at::Tensor& x_in,
                                                                          const at::Tensor& lengths_in,
                                                                          const at::Tensor& centers_in,
                                                                          int64_t iters, const at::Tensor& tol_in) {
  check_inputs("kmeans_lloyd", x_in, lengths_in, centers_in);
  const at::Tensor x = points(x_in);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers_in.size(1);
  TORCH_CHECK_VALUE(N > 0 && D > 0, "kmeans_lloyd: x must have at least one point and one feature, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(iters >= 1, "kmeans_lloyd: iters must be >= 1, got ", iters);
  TORCH_CHECK_VALUE(tol_in.dim() == 1 && tol_in.size(0) == B, "kmeans_lloyd: tol must be (B,) = (", B, ",), got ",
                    tol_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(tol_in.scalar_type()), "kmeans_lloyd: tol must be floating point, got ",
                   tol_in.scalar_type());
  TORCH_CHECK_VALUE(tol_in.device() == x.device(), "kmeans_lloyd: tol must be on ", x.device(), ", got ",
                    tol_in.device());
  const at::Tensor lengths = lengths_in.contiguous();
  // every problem needs at least K points (relocation of an empty cluster takes a point of its own problem)
  check_lengths_cpu("kmeans_lloyd", lengths, K, N);
  const at::Tensor tol = tol_in.to(x.scalar_type()).contiguous();
  at::Tensor centers = new_output({B, K, D}, x.options());
  centers.copy_(centers_in);
  at::Tensor labels = new_output({B, N}, x.options().dtype(at::kLong));
  at::Tensor mindist = new_output({B, N}, x.options());
  at::Tensor n_iter = new_output({B}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kmeans_lloyd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* len = lengths.const_data_ptr<int64_t>();
    const scalar_t* tp = tol.const_data_ptr<scalar_t>();
    scalar_t* cp = centers.data_ptr<scalar_t>();
    int64_t* lab = labels.data_ptr<int64_t>();
    scalar_t* md = mindist.data_ptr<scalar_t>();
    int64_t* ni = n_iter.data_ptr<int64_t>();
    const int64_t threads = at::get_num_threads();
    if (threads > 1 && B >= 2 * threads) {
      std::atomic<int64_t> next{0};
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        for (int64_t b = next++; b < B; b = next++) lloyd<scalar_t>(xp, len, N, D, K, {b}, iters, tp, cp, lab, md, ni);
      });
    } else {
      std::vector<int64_t> all(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) all[b] = b;
      lloyd<scalar_t>(xp, len, N, D, K, all, iters, tp, cp, lab, md, ni);
    }
  });
  return {centers, labels, mindist, n_iter};
}

}  // namespace
}  // namespace kmeans
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def("kmeans_step(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kmeans_assign(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor)");
  m.def("kmeans_lloyd(Tensor x, Tensor lengths, Tensor centers, int iters, Tensor tol) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("kmeans_step", &vosops::kmeans::kmeans_step_cpu);
  m.impl("kmeans_assign", &vosops::kmeans::kmeans_assign_cpu);
  m.impl("kmeans_lloyd", &vosops::kmeans::kmeans_lloyd_cpu);
}
