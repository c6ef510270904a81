// kmeans: op schemas and the CPU kernels: the fused Lloyd pass (kmeans_step), the assignment (kmeans_assign) and
// the whole Lloyd loop of every problem in one call (kmeans_lloyd).
//
// Distances are sum_d (x_d - c_d)^2, the reference's formula (not |c|^2 - 2 x.c, whose rounding would move labels
// away from the reference's at near-ties), accumulated in float32 (float64 for float64 input) sequentially over d;
// the argmin takes the lower index on ties. Points are processed in chunks of kChunk; each chunk has its own
// partial sums and they are added in chunk order, so results do not depend on the thread count, nor on whether a
// problem runs alone or in a batch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>
#include <limits>
#include <vector>

#include "common/native.h"
#include "kmeans/kmeans.h"

namespace vosops {
namespace kmeans {
namespace {

#define VOSOPS_INLINE __attribute__((always_inline)) inline

// Explicit vectors (GCC/Clang vector extensions) of L lanes. The distance and sum loops use register-sized ones
// (32 bytes in the AVX2 clone, 16 in the baseline one): GCC keeps wider ones in memory, not in register pairs.
template <typename T, int L>
struct VecN {
  typedef T type __attribute__((vector_size(L * sizeof(T))));
};
template <typename T>
using Vec8 = VecN<T, 8>;

template <typename V, typename T>
VOSOPS_INLINE V loadv(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}


// The distances are computed on a transposed copy of x ("tiles"; made once per kmeans_lloyd call for all its
// iterations, per chunk in kmeans_step / kmeans_assign): tile t holds the points [W t, W t + W) as D rows of W
// lanes, so one vector holds one feature of W points. Each centre's distance then needs no horizontal reduction
// and the argmin over centres is lane-wise. W = 16 for float, 8 for double: either way a row is 64 bytes, two AVX
// registers. (Tiling each block in every
// iteration instead, from x, was slower: the 8 x 8 transposes cost more than streaming the copy.)
template <typename T>
constexpr int kTile = sizeof(T) == 4 ? 16 : 8;

// In-place transpose of the 8 x 8 matrix r (rows of 8 lanes): the off-diagonal blocks of 4, 2 then 1 swapped.
template <typename V>
VOSOPS_INLINE void transpose8x8(V (&r)[8]) {
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const V a = r[i], b = r[i + 4];
    r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
#pragma GCC unroll 4
  for (int i : {0, 1, 4, 5}) {
    const V a = r[i], b = r[i + 2];
    r[i] = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
    r[i + 2] = __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  }
#pragma GCC unroll 4
  for (int i : {0, 2, 4, 6}) {
    const V a = r[i], b = r[i + 1];
    r[i] = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14);
    r[i + 1] = __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  }
}

// Copies the points [p0, p1) of x (rows of D) into tiles at xt (p0 a multiple of the tile width), 8 x 8 blocks at
// a time; the lanes of the last tile past p1 are zeroed (their distances are computed and ignored).
template <typename T>
VOSOPS_INLINE void make_tiles_body(const T* __restrict x, int64_t D, int64_t p0, int64_t p1, T* __restrict xt) {
  using V = typename Vec8<T>::type;
  constexpr int W = kTile<T>;
  const int64_t Dv = D / 8 * 8;
  for (int64_t t0 = p0; t0 < p1; t0 += W) {
    T* o = xt + (t0 - p0) * D;
    const int m = static_cast<int>(std::min<int64_t>(W, p1 - t0));
    int64_t dtail = 0;  // features from here on are copied one by one
    if (m == W) {
      for (int h = 0; h < W; h += 8)
        for (int64_t d0 = 0; d0 < Dv; d0 += 8) {
          V r[8];
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) r[i] = loadv<V>(x + (t0 + h + i) * D + d0);
          transpose8x8(r);
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) __builtin_memcpy(o + (d0 + i) * W + h, &r[i], sizeof(V));
        }
      dtail = Dv;
    }
    for (int j = 0; j < m; ++j) {
      const T* xr = x + (t0 + j) * D;
      for (int64_t d = dtail; d < D; ++d) o[d * W + j] = xr[d];
    }
    for (int j = m; j < W; ++j)
      for (int64_t d = 0; d < D; ++d) o[d * W + j] = T(0);
  }
}

// Squared distances of the W points of one tile to G consecutive centres c (rows of D), acc[k][v] lanes. Each is
// a sequential sum over d of (x_d - c_d)^2 (one multiply-add per term), so it does not depend on G or on the other
// centres. All 2G accumulators stay in registers (G <= 5 in the AVX2 clone: 10 of the 16, the rest for x, the
// broadcast centre feature and the difference) and give 2G independent add chains, enough to hide the latency.
// Cache lines to prefetch during a sweep, one of each run per feature: na lines from a, nb lines from b.
template <typename T>
struct Prefetch {
  const T* a;
  int64_t na;
  const T* b;
  int64_t nb;
};

// ct: the centres transposed, (D, K) (see pass_body), at the first of the G.
template <int G, int L, typename T, typename V = typename VecN<T, L>::type>
VOSOPS_INLINE void tile_dist(const T* __restrict xt, const T* __restrict ct, int64_t K, int64_t D,
                             V (&acc)[G][kTile<T> / L], const Prefetch<T>& pf) {
  constexpr int P = kTile<T> / L;
  static_assert(L == 2 || L == 4 || L == 8, "2, 4 or 8 lanes");
#pragma GCC unroll 8
  for (int k = 0; k < G; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < P; ++v) acc[k][v] = V{};
  for (int64_t d = 0; d < D; ++d) {
    if (d < pf.na) __builtin_prefetch(pf.a + d * (64 / sizeof(T)));
    if (d < pf.nb) __builtin_prefetch(pf.b + d * (64 / sizeof(T)));
    V xv[P];
#pragma GCC unroll 4
    for (int v = 0; v < P; ++v) xv[v] = loadv<V>(xt + d * kTile<T> + L * v);
#pragma GCC unroll 8
    for (int k = 0; k < G; ++k) {
      // the broadcast spelt out in place (V{} + ck would add 0.0 to ck first, a wasted add; built in a helper
      // function, it was lowered lane by lane for the baseline ISA before being inlined)
      const T ck = ct[d * K + k];
      V cb;
      if constexpr (L == 8) cb = V{ck, ck, ck, ck, ck, ck, ck, ck};
      else if constexpr (L == 4) cb = V{ck, ck, ck, ck};
      else cb = V{ck, ck};
#pragma GCC unroll 4
      for (int v = 0; v < P; ++v) {
        const V t = xv[v] - cb;
        acc[k][v] += t * t;
      }
    }
  }
}

// Lanes of the label vectors: the integers of the width of T.
template <typename T>
using Lane = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// Folds the distances to the G centres k0.. into the running lane-wise minimum (best, arg): strict compares in
// increasing centre order, so ties go to the lower index, and no branch depends on the data.
template <int G, int L, typename T, typename V = typename VecN<T, L>::type, typename I = decltype(V{} < V{})>
VOSOPS_INLINE void group_argmin(const T* __restrict xt, const T* __restrict ct, int64_t k0, int64_t K, int64_t D,
                                V (&best)[kTile<T> / L], I (&arg)[kTile<T> / L], const Prefetch<T>& pf) {
  V acc[G][kTile<T> / L];
  tile_dist<G, L>(xt, ct + k0, K, D, acc, pf);
#pragma GCC unroll 8
  for (int k = 0; k < G; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < kTile<T> / L; ++v) {
      const I less = acc[k][v] < best[v];
      best[v] = less ? acc[k][v] : best[v];
      arg[v] = less ? I{} + static_cast<Lane<T>>(k0 + k) : arg[v];
    }
}

// Nearest centre of each lane of a tile: the centres in groups of at most MaxG (sizes as even as possible), one
// sweep over the tile per group; the first sweep prefetches pf.
template <int MaxG, int L, typename T, typename V = typename VecN<T, L>::type, typename I = decltype(V{} < V{})>
VOSOPS_INLINE void tile_argmin(const T* __restrict xt, const T* __restrict ct, int64_t K, int64_t D,
                               V (&best)[kTile<T> / L], I (&arg)[kTile<T> / L], Prefetch<T> pf) {
  static_assert(MaxG >= 2 && MaxG <= 5, "groups of 2 to 5 centres");
#pragma GCC unroll 4
  for (int v = 0; v < kTile<T> / L; ++v) {
    best[v] = V{} + std::numeric_limits<T>::infinity();
    arg[v] = I{};
  }
  const int64_t ngroup = (K + MaxG - 1) / MaxG;
  for (int64_t g = 0, k0 = 0; g < ngroup; ++g) {
    const int64_t G = K / ngroup + (g < K % ngroup ? 1 : 0);
    switch (G) {
      case 1: group_argmin<1, L>(xt, ct, k0, K, D, best, arg, pf); break;
      case 2: group_argmin<2, L>(xt, ct, k0, K, D, best, arg, pf); break;
      case 3: if constexpr (MaxG >= 3) group_argmin<3, L>(xt, ct, k0, K, D, best, arg, pf); break;
      case 4: if constexpr (MaxG >= 4) group_argmin<4, L>(xt, ct, k0, K, D, best, arg, pf); break;
      default: if constexpr (MaxG >= 5) group_argmin<5, L>(xt, ct, k0, K, D, best, arg, pf); break;
    }
    k0 += G;
    pf.na = pf.nb = 0;
  }
}

// Points whose labels are found before any of them is added to the sums (see add_grouped); a multiple of the tile
// widths.
constexpr int kBlock = 64;

// Adds the rows x[order[j]] to psum[k] for j in [start[k], start[k+1]) (the block's points grouped by cluster, in
// point order inside a cluster, so the sums are exactly those of adding point after point). Going cluster by
// cluster keeps up to 64 features of a sum in registers; adding each point to psum[label] straight after its
// argmin instead made every add wait for the argmin and chain through memory (about a third of the pass).
template <int L, typename T>
VOSOPS_INLINE void add_grouped(const T* __restrict x, int64_t D, const int* order, const int* start, int64_t K,
                               T* __restrict psum) {
  using V = typename VecN<T, L>::type;
  const int64_t Dv = D / L * L;
  for (int64_t k = 0; k < K; ++k) {
    const int b = start[k], e = start[k + 1];
    if (b == e) continue;
    T* s = psum + k * D;
    int64_t d0 = 0;
    for (; d0 + 8 * L <= Dv; d0 += 8 * L) {
      V acc[8];
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] = loadv<V>(s + d0 + L * v);
      for (int j = b; j < e; ++j) {
        const T* xr = x + order[j] * D + d0;
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) acc[v] += loadv<V>(xr + L * v);
      }
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) __builtin_memcpy(s + d0 + L * v, &acc[v], sizeof(V));
    }
    for (; d0 < Dv; d0 += L) {
      V acc = loadv<V>(s + d0);
      for (int j = b; j < e; ++j) acc += loadv<V>(x + order[j] * D + d0);
      __builtin_memcpy(s + d0, &acc, sizeof(V));
    }
    for (int64_t d = Dv; d < D; ++d) {
      T acc = s[d];
      for (int j = b; j < e; ++j) acc += x[order[j] * D + d];
      s[d] = acc;
    }
  }
}

// One pass over the points [p0, p1) of one problem (p0 a multiple of kBlock): x its rows, xt the tiles of its
// points from p0 on. label = nearest centre, mindist = its distance, and (when psum is given) the point added to
// its cluster's partial sum psum (K, D) and count pcount (K) (zeroed here). scratch: 2K + 1 ints; ct: K D
// elements. L: the lanes of the vectors. Returns whether any label differs from the one labels held before.
template <int MaxG, int L, typename T>
VOSOPS_INLINE bool pass_body(const T* __restrict x, const T* __restrict xt, int64_t D, const T* __restrict c,
                             int64_t K, int64_t p0, int64_t p1, int64_t* __restrict labels, T* __restrict mindist,
                             T* __restrict psum, int64_t* __restrict pcount, int* __restrict scratch,
                             T* __restrict ct) {
  using V = typename VecN<T, L>::type;
  using I = decltype(V{} < V{});
  constexpr int W = kTile<T>, P = W / L;
  static_assert(kBlock % W == 0, "blocks of whole tiles");
  // The centres transposed, (D, K): the distance loop reads a group's features through one pointer (one per
  // centre ran out of registers).
  for (int64_t k = 0; k < K; ++k)
    for (int64_t d = 0; d < D; ++d) ct[d * K + k] = c[k * D + d];
  if (psum != nullptr) {
    std::fill(psum, psum + K * D, T(0));
    std::fill(pcount, pcount + K, int64_t(0));
  }
  bool changed = false;
  int lab[kBlock], order[kBlock];
  for (int64_t i0 = p0; i0 < p1; i0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, p1 - i0));
    for (int j0 = 0; j0 < n; j0 += W) {
      const int m = std::min(W, n - j0);
      // Fetched while the distances are computed, a line per feature (a burst of prefetches stalls the loads): the
      // rows of these points, for the sums after the block (not read since the tiles were made), and the next tile
      // (a tile row is 64 bytes). The loads wait on the caches without them (x and the tiles of a problem are
      // twice the size of the L2 of many CPUs).
      const bool next = i0 + j0 + W < p1;
      const Prefetch<T> pf{x + (i0 + j0) * D, psum != nullptr ? (m * D * static_cast<int64_t>(sizeof(T)) + 63) / 64 : 0,
                           next ? xt + (i0 - p0 + j0 + W) * D : xt, next ? D : 0};
      V best[P];
      I arg[P];
      tile_argmin<MaxG, L>(xt + (i0 - p0 + j0) * D, ct, K, D, best, arg, pf);
      for (int j = 0; j < m; ++j) {
        const int64_t i = i0 + j0 + j;
        const int64_t a = arg[j / L][j % L];
        changed |= labels[i] != a;
        labels[i] = a;
        mindist[i] = best[j / L][j % L];
        lab[j0 + j] = static_cast<int>(a);
      }
    }
    if (psum == nullptr) continue;
    // counting sort of the block by cluster, then the grouped adds
    int* start = scratch;        // K + 1
    int* pos = scratch + K + 1;  // K
    std::fill(start, start + K + 1, 0);
    for (int j = 0; j < n; ++j) ++start[lab[j] + 1];
    for (int64_t k = 0; k < K; ++k) {
      pcount[k] += start[k + 1];
      start[k + 1] += start[k];
      pos[k] = start[k];
    }
    for (int j = 0; j < n; ++j) order[pos[lab[j]]++] = j;
    add_grouped<L>(x + i0 * D, D, order, start, K, psum);
  }
  return changed;
}

// The pass is compiled twice, for AVX2 + FMA and for the baseline ISA, and picked once by what the CPU reports
// (by feature, not by CPU model, so AMD and Intel both get the AVX2 path); VOSOPS_KMEANS_PORTABLE=1 forces the
// baseline one (tests run it that way on AVX2 machines). Results are reproducible on a given machine (FMA
// contraction differs between the two paths). The baseline clone groups at most 2 centres: its 16 SSE registers
// hold 8 accumulators.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define VOSOPS_KMEANS_AVX2 __attribute__((target("avx2,fma")))
const bool kUseAvx2 = std::getenv("VOSOPS_KMEANS_PORTABLE") == nullptr && __builtin_cpu_supports("avx2") &&
                      __builtin_cpu_supports("fma");
#else
#define VOSOPS_KMEANS_AVX2
const bool kUseAvx2 = false;
#endif

template <typename T>
VOSOPS_KMEANS_AVX2 bool pass_avx2(const T* x, const T* xt, int64_t D, const T* c, int64_t K, int64_t p0, int64_t p1,
                                  int64_t* labels, T* mindist, T* psum, int64_t* pcount, int* scratch, T* ct) {
  return pass_body<5, 32 / sizeof(T)>(x, xt, D, c, K, p0, p1, labels, mindist, psum, pcount, scratch, ct);
}
template <typename T>
bool pass_base(const T* x, const T* xt, int64_t D, const T* c, int64_t K, int64_t p0, int64_t p1, int64_t* labels,
               T* mindist, T* psum, int64_t* pcount, int* scratch, T* ct) {
  return pass_body<2, 16 / sizeof(T)>(x, xt, D, c, K, p0, p1, labels, mindist, psum, pcount, scratch, ct);
}
template <typename T>
bool pass(const T* x, const T* xt, int64_t D, const T* c, int64_t K, int64_t p0, int64_t p1, int64_t* labels,
          T* mindist, T* psum, int64_t* pcount, int* scratch, T* ct) {
  return kUseAvx2 ? pass_avx2(x, xt, D, c, K, p0, p1, labels, mindist, psum, pcount, scratch, ct)
                  : pass_base(x, xt, D, c, K, p0, p1, labels, mindist, psum, pcount, scratch, ct);
}

template <typename T>
VOSOPS_KMEANS_AVX2 void make_tiles_avx2(const T* x, int64_t D, int64_t p0, int64_t p1, T* xt) {
  make_tiles_body(x, D, p0, p1, xt);
}
template <typename T>
void make_tiles_base(const T* x, int64_t D, int64_t p0, int64_t p1, T* xt) {
  make_tiles_body(x, D, p0, p1, xt);
}
template <typename T>
void make_tiles(const T* x, int64_t D, int64_t p0, int64_t p1, T* xt) {
  kUseAvx2 ? make_tiles_avx2(x, D, p0, p1, xt) : make_tiles_base(x, D, p0, p1, xt);
}

// Scratch memory of one thread's pass (at::empty: 64-byte aligned, so tile rows do not straddle cache lines).
template <typename T>
at::Tensor scratch_tensor(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
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
  // A problem with fewer points than empty clusters (only through a direct call of the op: kmeans() needs
  // K <= len) relocates as many as it has points; the rest stay empty, as in the CUDA update.
  for (size_t e = 0; e < far.size(); ++e) {
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

// The rest of one problem's Lloyd iteration after the step: relocation of empty clusters, then centre = mean (kept
// when the cluster is empty) in place. Returns the squared centre shift summed over the centres.
template <typename T>
T relocate_and_update(const T* x, int64_t len, int64_t D, int64_t K, const int64_t* labels, const T* mindist,
                      T* sums, int64_t* counts, T* c) {
  if (std::find(counts, counts + K, int64_t(0)) != counts + K)
    relocate_empty(x, len, D, K, labels, mindist, sums, counts);
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
  return shift;
}

// Lloyd iterations for a set of problems, each exactly as the reference's lloyd: step (labels, sums, counts),
// relocation of empty clusters, centre = mean (kept when the cluster is empty), stop when no label changed or the
// squared centre shift summed over centres is <= tol[b], at most `iters` iterations; then the final assignment to
// the final centres. The problems' points are tiled once (a copy of their size) and every pass reads the tiles for
// the distances and x for the sums. The passes over (problem, chunk) run through at::parallel_for (inline when
// already inside a parallel region: then this thread does all the work of these problems with no synchronisation).
template <typename T>
void lloyd(const T* x, const int64_t* lengths, int64_t N, int64_t D, int64_t K, const std::vector<int64_t>& probs,
           int64_t iters, const T* tol, T* centers, int64_t* labels, T* mindist, int64_t* n_iter) {
  const int64_t P = static_cast<int64_t>(probs.size());
  const int64_t maxchunk = (N + kChunk - 1) / kChunk;
  static_assert(kChunk % kBlock == 0, "chunks of whole blocks");
  const int64_t tiled = (N + kTile<T> - 1) / kTile<T> * kTile<T> * D;  // the tiles of one problem
  const at::Tensor xt_mem = scratch_tensor<T>(P * tiled);
  T* xt = xt_mem.data_ptr<T>();
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
      std::vector<int> scratch(static_cast<size_t>(2 * K + 1));
      std::vector<T> ct(static_cast<size_t>(K * D));
      for (int64_t t = begin; t < end; ++t) {
        const auto [j, ch] = tasks[t];
        const int64_t b = probs[j], len = lengths[b];
        const int64_t slot = j * maxchunk + ch;
        changed[slot] = pass(x + b * N * D, xt + j * tiled + ch * kChunk * D, D, centers + b * K * D, K, ch * kChunk,
                             std::min(len, (ch + 1) * kChunk), labels + b * N, mindist + b * N,
                             with_sums ? psum.data() + slot * K * D : nullptr,
                             with_sums ? pcount.data() + slot * K : nullptr, scratch.data(), ct.data());
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
  make_tasks();  // the tiles of every problem, once for all iterations
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto [j, ch] = tasks[t];
      const int64_t b = probs[j];
      make_tiles(x + b * N * D, D, ch * kChunk, std::min(lengths[b], (ch + 1) * kChunk),
                 xt + j * tiled + ch * kChunk * D);
    }
  });
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
      const T shift = relocate_and_update(x + b * N * D, len, D, K, labels + b * N, mindist + b * N, sums.data(),
                                          counts.data(), centers + b * K * D);
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
      // a single pass: each chunk is tiled just before it is read
      const at::Tensor tiles = scratch_tensor<scalar_t>(kChunk * D);
      scalar_t* xt = tiles.data_ptr<scalar_t>();
      std::vector<int> scratch(static_cast<size_t>(2 * K + 1));
      std::vector<scalar_t> ct(static_cast<size_t>(K * D));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nchunk, ch = task % nchunk;
        const int64_t p0 = ch * kChunk, p1 = std::min(N, p0 + kChunk);
        const int64_t stop = std::clamp<int64_t>(len[b], p0, p1);  // padding from here: ignored
        make_tiles(xp + b * N * D, D, p0, stop, xt);
        pass(xp + b * N * D, xt, D, cp + b * K * D, K, p0, stop, lab + b * N, md + b * N,
             accumulate ? psum.data() + task * K * D : nullptr, accumulate ? pcount.data() + task * K : nullptr,
             scratch.data(), ct.data());
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

// The rest of one Lloyd iteration after kmeans_step, for every problem (the reference's relocate_empty and
// kmeans_update plus lloyd_iteration's flags), exactly as the native loop does it: relocation of empty clusters,
// centre = mean, shift, convergence. The CPU loop (kmeans_lloyd) does not call it; it is here so the op has the same
// behaviour on every device and can be tested against the reference and the CUDA kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_update_cpu(
    const at::Tensor& x_in, const at::Tensor& lengths_in, const at::Tensor& labels_in, const at::Tensor& mindist_in,
    const at::Tensor& sums_in, const at::Tensor& counts_in, const at::Tensor& centers_in, const at::Tensor& active_in,
    const at::Tensor& n_iter_in, const at::Tensor& labels_equal_in, const at::Tensor& tol_in) {
  check_update_inputs("kmeans_update", x_in, lengths_in, labels_in, mindist_in, sums_in, counts_in, centers_in,
                      active_in, n_iter_in, labels_equal_in, tol_in);
  const at::Tensor x = points(x_in);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers_in.size(1);
  const at::ScalarType acc = x.scalar_type();
  const at::Tensor lengths = lengths_in.contiguous(), labels = labels_in.contiguous();
  const at::Tensor mindist = mindist_in.to(acc).contiguous(), tol = tol_in.to(acc).contiguous();
  const at::Tensor active = active_in.contiguous(), n_iter = n_iter_in.contiguous();
  const at::Tensor labels_equal = labels_equal_in.contiguous();
  at::Tensor sums = sums_in.to(acc).contiguous().clone(), counts = counts_in.contiguous().clone();
  at::Tensor centers = centers_in.to(acc).contiguous().clone();
  at::Tensor active_out = new_output({B}, active.options());
  at::Tensor n_iter_out = new_output({B}, n_iter.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "kmeans_update_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* sp = sums.data_ptr<scalar_t>();
    scalar_t* cp = centers.data_ptr<scalar_t>();
    int64_t* cnt = counts.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const bool on = active.const_data_ptr<bool>()[b];
      active_out.data_ptr<bool>()[b] = on;
      n_iter_out.data_ptr<int64_t>()[b] = n_iter.const_data_ptr<int64_t>()[b] + (on ? 1 : 0);
      if (!on) continue;
      const int64_t len = std::min(std::max(lengths.const_data_ptr<int64_t>()[b], int64_t(0)), N);
      const scalar_t shift = relocate_and_update(xp + b * N * D, len, D, K, labels.const_data_ptr<int64_t>() + b * N,
                                                 mindist.const_data_ptr<scalar_t>() + b * N, sp + b * K * D,
                                                 cnt + b * K, cp + b * K * D);
      const bool converged = labels_equal.const_data_ptr<bool>()[b] || shift <= tol.const_data_ptr<scalar_t>()[b];
      active_out.data_ptr<bool>()[b] = !converged;
    }
  });
  return {centers, active_out, n_iter_out};
}

}  // namespace
}  // namespace kmeans
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def("kmeans_step(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kmeans_assign(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor)");
  m.def("kmeans_lloyd(Tensor x, Tensor lengths, Tensor centers, int iters, Tensor tol) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("kmeans_update(Tensor x, Tensor lengths, Tensor labels, Tensor mindist, Tensor sums, Tensor counts, "
        "Tensor centers, Tensor active, Tensor n_iter, Tensor labels_equal, Tensor tol) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("kmeans_step", &vosops::kmeans::kmeans_step_cpu);
  m.impl("kmeans_assign", &vosops::kmeans::kmeans_assign_cpu);
  m.impl("kmeans_lloyd", &vosops::kmeans::kmeans_lloyd_cpu);
  m.impl("kmeans_update", &vosops::kmeans::kmeans_update_cpu);
}
