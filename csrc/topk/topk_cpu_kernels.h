// Row kernels of the CPU top-k ops (global_topk, topk_attention): candidate selection, softmax pieces and the
// gather/scatter of value rows. Torch-free; CPU only.
//
// The extension is compiled for the baseline x86-64 ISA (portable builds), which leaves these loops at SSE2 width.
// Functions marked VOSOPS_TOPK_CLONES are compiled a second time for x86-64-v3 (AVX2 + FMA) and the variant is
// picked when the library loads (GCC function multi-versioning); the candidate compaction and exp have AVX2
// intrinsics paths picked by a CPUID check. Other compilers and architectures get the portable code.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <type_traits>

#include "common/avx2_exp.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VOSOPS_TOPK_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VOSOPS_TOPK_CLONES
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VOSOPS_TOPK_AVX2 1
#include <immintrin.h>
#else
#define VOSOPS_TOPK_AVX2 0
#endif

namespace vosops {
namespace topk {
namespace cpu {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

#if VOSOPS_TOPK_AVX2
// VOSOPS_TOPK_PORTABLE=1 forces the portable paths (tests run them that way on AVX2 machines).
inline bool have_avx2() {
  static const bool yes = std::getenv("VOSOPS_TOPK_PORTABLE") == nullptr && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  return yes;
}
#endif

// `omp simd` (the build has -fopenmp; without it the pragma is ignored) vectorises these loops, reductions
// included, without -ffast-math and without runtime alias checks.
#define VOSOPS_SIMD _Pragma("omp simd")
#define VOSOPS_SIMD_SUM(x) _Pragma(VOSOPS_STR(omp simd reduction(+ : x)))
#define VOSOPS_STR(x) #x

// Eight independent partial sums held as one vector register (omp simd's reduction goes through the stack, which
// costs as much as a 64-long dot itself).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int u = 0; u < 8; ++u) p[u] += a[c + u] * b[c + u];
  }
  T s = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
  for (; c < n; ++c) s += a[c] * b[c];
  return s;
}

// a * b rounded to T, kept from being fused with a following subtraction into one FMA: an exponent
// fl(scale * s) - m must be exactly 0 for the row's maximum m = fl(scale * s), and a fused one is off by the
// product's rounding error, which is beyond exp's range once |scale * s| passes ~1e9 (see rounded_product).
template <typename T>
inline T rounded_mul(T a, T b) {
  T p = a * b;
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(p));
#elif defined(__aarch64__)
  asm("" : "+w"(p));
#endif
  return p;
}

// --- exp ------------------------------------------------------------------------------------------------------------
// exp256 (common/avx2_exp.h) for the vectors; the scalar tails match its 0 below -87.3.
inline float exp_scalar(float x) { return x < -87.33654f ? 0.0f : std::exp(x); }
inline double exp_scalar(double x) { return std::exp(x); }

#if VOSOPS_TOPK_AVX2
// scale * s as a rounded product, the value scaled_max compared. Left to itself the compiler fuses the product and
// the subtraction of m into one FMA, which leaves the row's maximum at minus the product's rounding error instead
// of 0: past |scale * s| ~ 1e9 that error is beyond exp's range, and the softmax came out 0 or inf.
__attribute__((target("avx2,fma"))) inline __m256 rounded_product(__m256 a, __m256 b) {
  __m256 p = _mm256_mul_ps(a, b);
  asm("" : "+x"(p));  // an opaque use: the product is materialised, so it cannot be contracted with what follows
  return p;
}

__attribute__((target("avx2,fma"))) inline float exp_shift_sum_avx2(float* s, int64_t n, float scale, float m) {
  const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(rounded_product(_mm256_loadu_ps(s + j), vs), vm));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (j < n) {  // the tail as one masked vector: libm's exp per element cost more than the rest of a short row
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 e = exp256(_mm256_sub_ps(rounded_product(_mm256_maskload_ps(s + j, live), vs), vm));
    _mm256_maskstore_ps(s + j, live, e);
    acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_castsi256_ps(live)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

// s[j] <- exp(scale * s[j] - m) in place; returns the sum.
template <typename T>
T exp_shift_sum_portable(T* s, int64_t n, T scale, T m) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_scalar(rounded_mul(scale, s[j]) - m);
    sum += s[j];
  }
  return sum;
}
inline float exp_shift_sum(float* s, int64_t n, float scale, float m) {
#if VOSOPS_TOPK_AVX2
  if (have_avx2()) return exp_shift_sum_avx2(s, n, scale, m);
#endif
  return exp_shift_sum_portable(s, n, scale, m);
}
inline double exp_shift_sum(double* s, int64_t n, double scale, double m) {
  return exp_shift_sum_portable(s, n, scale, m);
}

// max_j scale * s[j] (NaN ignored; -inf when n == 0).
template <typename T>
VOSOPS_TOPK_CLONES T scaled_max(const T* s, int64_t n, T scale) {
  T m = kNegInf<T>;
  _Pragma("omp simd reduction(max : m)")
  for (int64_t j = 0; j < n; ++j) {
    const T v = scale * s[j];
    m = v > m ? v : m;
  }
  return m;
}

// acc[0, width) += sum_j w[j] * rows[base + idx[j]] (rows of `width` elements).
template <typename T>
VOSOPS_TOPK_CLONES void gather_rows(T* acc, const T* rows, int64_t width, int64_t base, const int32_t* idx,
                                    const T* w, int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    const T* r = rows + (base + idx[j]) * width;
    const T a = w[j];
    VOSOPS_SIMD
    for (int64_t d = 0; d < width; ++d) acc[d] += a * r[d];
  }
}

// Backward of one row's dense part, in place: s (raw q.k) becomes P = exp(scale s - lse) and dp (g.v) becomes
// dS * scale = P (dp - d) scale, ready for the dQ/dK/dV products.
template <typename T>
VOSOPS_TOPK_CLONES void dense_grad_row(T* s, T* dp, int64_t n, T scale, T lse, T d) {
  exp_shift_sum(s, n, scale, lse);
  VOSOPS_SIMD
  for (int64_t j = 0; j < n; ++j) dp[j] = s[j] * (dp[j] - d) * scale;
}

// Backward of one sparse key over the queries that kept it (key-major, so the key's rows stay in L1 and the
// queries' rows in L2): P = exp(scale q_i.k_j - lse_i) recomputed, dS = P (g_i.v_j - d_i) scale, then dv_j += P g_i,
// dk_j += dS q_i, dq_i += dS k_j. `work` holds 2 * n values.
template <typename T>
VOSOPS_TOPK_CLONES void sparse_grad_key_portable(const T* kj, const T* vj, T* dkj, T* dvj, const int32_t* rows,
                                                 int64_t n, const T* q, const T* g, T* dq, const T* lse,
                                                 const T* drow, int64_t D, int64_t Dv, T scale, T* work) {
  T* p = work;
  T* ds = work + n;
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = rows[a];
    p[a] = rounded_mul(scale, dot(q + i * D, kj, D)) - lse[i];
    ds[a] = dot(g + i * Dv, vj, Dv) - drow[i];
  }
  exp_shift_sum(p, n, T(1), T(0));
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = rows[a];
    const T pa = p[a], da = p[a] * ds[a] * scale;
    const T* gi = g + i * Dv;
    const T* qi = q + i * D;
    T* dqi = dq + i * D;
    VOSOPS_SIMD
    for (int64_t c = 0; c < Dv; ++c) dvj[c] += pa * gi[c];
    VOSOPS_SIMD
    for (int64_t c = 0; c < D; ++c) {
      dkj[c] += da * qi[c];
      dqi[c] += da * kj[c];
    }
  }
}

// Rows per block of the vectorised sparse backward: a whole key's rows in the benchmarked configurations (about 40
// to 60 queries keep a key); per-block overheads made 8- and 16-row blocks 10-20% slower, 32 rows about the same.
constexpr int64_t kSparseBlock = 64;

#if VOSOPS_TOPK_AVX2
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// out[a] = x . base[rows[a]] (rows of w floats): eight rows at a time, so that eight independent FMA chains hide
// the FMA latency (one row's dot is a chain of w / 8 dependent FMAs).
__attribute__((target("avx2,fma"))) inline void gathered_dots_avx2(const float* x, const float* base, int64_t w,
                                                                   const int32_t* rows, int64_t n, float* out) {
  const int64_t w8 = w & ~int64_t(7);
  int64_t a = 0;
  for (; a + 8 <= n; a += 8) {
    const float* r[8];
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) {
      r[u] = base + static_cast<int64_t>(rows[a + u]) * w;
      acc[u] = _mm256_setzero_ps();
    }
    for (int64_t c = 0; c < w8; c += 8) {
      const __m256 xv = _mm256_loadu_ps(x + c);
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(r[u] + c), xv, acc[u]);
    }
    for (int u = 0; u < 8; ++u) {
      float s = hsum256(acc[u]);
      for (int64_t c = w8; c < w; ++c) s += r[u][c] * x[c];
      out[a + u] = s;
    }
  }
  for (; a < n; ++a) {
    const float* r = base + static_cast<int64_t>(rows[a]) * w;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < w8; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(r + c), _mm256_loadu_ps(x + c), acc);
    float s = hsum256(acc);
    for (int64_t c = w8; c < w; ++c) s += r[c] * x[c];
    out[a] = s;
  }
}

// acc[0, w) += sum_a coef[a] * base[rows[a]]: 64 columns at a time held in eight registers across all rows (one
// load and store of acc per block instead of per row).
__attribute__((target("avx2,fma"))) inline void gathered_axpy_avx2(float* acc, const float* base, int64_t w,
                                                                   const int32_t* rows, int64_t n,
                                                                   const float* coef) {
  int64_t c = 0;
  for (; c + 64 <= w; c += 64) {
    __m256 s[8];
    for (int u = 0; u < 8; ++u) s[u] = _mm256_loadu_ps(acc + c + 8 * u);
    for (int64_t a = 0; a < n; ++a) {
      const float* r = base + static_cast<int64_t>(rows[a]) * w + c;
      const __m256 f = _mm256_broadcast_ss(coef + a);
      for (int u = 0; u < 8; ++u) s[u] = _mm256_fmadd_ps(f, _mm256_loadu_ps(r + 8 * u), s[u]);
    }
    for (int u = 0; u < 8; ++u) _mm256_storeu_ps(acc + c + 8 * u, s[u]);
  }
  for (; c + 8 <= w; c += 8) {
    __m256 s = _mm256_loadu_ps(acc + c);
    for (int64_t a = 0; a < n; ++a) {
      s = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + a),
                          _mm256_loadu_ps(base + static_cast<int64_t>(rows[a]) * w + c), s);
    }
    _mm256_storeu_ps(acc + c, s);
  }
  for (; c < w; ++c) {
    float s = acc[c];
    for (int64_t a = 0; a < n; ++a) s += coef[a] * base[static_cast<int64_t>(rows[a]) * w + c];
    acc[c] = s;
  }
}

// base[rows[a]] += coef[a] * x for every a (rows of w floats): x's block stays in registers across the rows.
__attribute__((target("avx2,fma"))) inline void scattered_axpy_avx2(float* base, int64_t w, const int32_t* rows,
                                                                    int64_t n, const float* coef, const float* x) {
  int64_t c = 0;
  for (; c + 64 <= w; c += 64) {
    __m256 xv[8];
    for (int u = 0; u < 8; ++u) xv[u] = _mm256_loadu_ps(x + c + 8 * u);
    for (int64_t a = 0; a < n; ++a) {
      float* r = base + static_cast<int64_t>(rows[a]) * w + c;
      const __m256 f = _mm256_broadcast_ss(coef + a);
      for (int u = 0; u < 8; ++u) _mm256_storeu_ps(r + 8 * u, _mm256_fmadd_ps(f, xv[u], _mm256_loadu_ps(r + 8 * u)));
    }
  }
  for (; c + 8 <= w; c += 8) {
    const __m256 xv = _mm256_loadu_ps(x + c);
    for (int64_t a = 0; a < n; ++a) {
      float* r = base + static_cast<int64_t>(rows[a]) * w + c;
      _mm256_storeu_ps(r, _mm256_fmadd_ps(_mm256_broadcast_ss(coef + a), xv, _mm256_loadu_ps(r)));
    }
  }
  for (; c < w; ++c) {
    for (int64_t a = 0; a < n; ++a) base[static_cast<int64_t>(rows[a]) * w + c] += coef[a] * x[c];
  }
}

// The same key backward as sparse_grad_key_portable, in blocks of rows, five passes per block, each keeping its
// fixed operand in registers. `work` holds 2 * kSparseBlock values.
__attribute__((target("avx2,fma"))) inline void sparse_grad_key_avx2(const float* kj, const float* vj, float* dkj,
                                                                     float* dvj, const int32_t* rows, int64_t n,
                                                                     const float* q, const float* g, float* dq,
                                                                     const float* lse, const float* drow, int64_t D,
                                                                     int64_t Dv, float scale, float* work) {
  float* p = work;
  float* ds = work + kSparseBlock;
  for (int64_t a0 = 0; a0 < n; a0 += kSparseBlock) {
    const int64_t nb = std::min(kSparseBlock, n - a0);
    const int32_t* rb = rows + a0;
    gathered_dots_avx2(kj, q, D, rb, nb, p);
    gathered_dots_avx2(vj, g, Dv, rb, nb, ds);
    for (int64_t a = 0; a < nb; ++a) p[a] = rounded_mul(scale, p[a]) - lse[rb[a]];
    exp_shift_sum_avx2(p, nb, 1.0f, 0.0f);
    for (int64_t a = 0; a < nb; ++a) ds[a] = p[a] * (ds[a] - drow[rb[a]]) * scale;
    gathered_axpy_avx2(dvj, g, Dv, rb, nb, p);
    gathered_axpy_avx2(dkj, q, D, rb, nb, ds);
    scattered_axpy_avx2(dq, D, rb, nb, ds, kj);
  }
}
#endif

// One sparse key's backward (see sparse_grad_key_portable). `work` holds 2 * max(n, kSparseBlock) values.
template <typename T>
void sparse_grad_key(const T* kj, const T* vj, T* dkj, T* dvj, const int32_t* rows, int64_t n, const T* q,
                     const T* g, T* dq, const T* lse, const T* drow, int64_t D, int64_t Dv, T scale, T* work) {
#if VOSOPS_TOPK_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) return sparse_grad_key_avx2(kj, vj, dkj, dvj, rows, n, q, g, dq, lse, drow, D, Dv, scale, work);
  }
#endif
  sparse_grad_key_portable(kj, vj, dkj, dvj, rows, n, q, g, dq, lse, drow, D, Dv, scale, work);
}

// How many of scale * s[j] are > t (NaN never).
template <typename T>
VOSOPS_TOPK_CLONES int64_t count_above(const T* s, int64_t n, T scale, T t) {
  int64_t c = 0;
  VOSOPS_SIMD_SUM(c)
  for (int64_t j = 0; j < n; ++j) c += scale * s[j] > t;
  return c;
}

// Mean and standard deviation of the values scale * s[j]; false when they are not finite (an inf or NaN among them).
template <typename T>
VOSOPS_TOPK_CLONES bool moments(const T* s, int64_t n, T scale, T* mean, T* sd) {
  T sum = 0, sq = 0;
  _Pragma("omp simd reduction(+ : sum, sq)")
  for (int64_t j = 0; j < n; ++j) {
    const T v = scale * s[j];
    sum += v;
    sq += v * v;
  }
  *mean = sum / static_cast<T>(n);
  *sd = std::sqrt(std::max(sq / static_cast<T>(n) - *mean * *mean, T(0)));
  return std::isfinite(*mean) && std::isfinite(*sd);
}

// --- candidate selection -----------------------------------------------------------------------------------------

// Appends (scale * s[j], j) for every j < n with scale * s[j] > thr, in key order, and returns how many: NaN and
// -inf never pass. vals/idx need n + 8 slots (the vector path stores whole lanes).
template <typename T>
inline int64_t collect_above_portable(const T* s, int64_t n, T scale, T thr, T* vals, int32_t* idx) {
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {  // branch-free: at 10-20% admission a branch mispredicts constantly
    const T v = scale * s[j];
    vals[m] = v;
    idx[m] = static_cast<int32_t>(j);
    m += v > thr;
  }
  return m;
}

#if VOSOPS_TOPK_AVX2
// For each 8-lane compare mask, the lane numbers of its set bits first: a permutation that left-packs the lanes.
inline const std::array<std::array<int32_t, 8>, 256>& pack_table() {
  static const std::array<std::array<int32_t, 8>, 256> table = [] {
    std::array<std::array<int32_t, 8>, 256> t{};
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if (mask & (1 << lane)) t[mask][n++] = lane;
      }
      for (int lane = 0; n < 8; ++lane) t[mask][n++] = lane;  // don't-care lanes
    }
    return t;
  }();
  return table;
}

__attribute__((target("avx2,popcnt"))) inline int64_t collect_above_avx2(const float* s, int64_t n, float scale,
                                                                           float thr, float* vals, int32_t* idx) {
  const auto& table = pack_table();
  const __m256 vs = _mm256_set1_ps(scale), vt = _mm256_set1_ps(thr);
  const __m256i step = _mm256_set1_epi32(8);
  __m256i vi = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + j), vs);
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_GT_OQ));  // ordered: NaN fails
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table[mask].data()));
    _mm256_storeu_ps(vals + m, _mm256_permutevar8x32_ps(v, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m), _mm256_permutevar8x32_epi32(vi, perm));
    m += _mm_popcnt_u32(static_cast<unsigned>(mask));
    vi = _mm256_add_epi32(vi, step);
  }
  for (; j < n; ++j) {
    const float v = scale * s[j];
    vals[m] = v;
    idx[m] = static_cast<int32_t>(j);
    m += v > thr;
  }
  return m;
}

#endif

inline int64_t collect_above(const float* s, int64_t n, float scale, float thr, float* vals, int32_t* idx) {
#if VOSOPS_TOPK_AVX2
  if (have_avx2()) return collect_above_avx2(s, n, scale, thr, vals, idx);
#endif
  return collect_above_portable(s, n, scale, thr, vals, idx);
}
inline int64_t collect_above(const double* s, int64_t n, double scale, double thr, double* vals, int32_t* idx) {
  return collect_above_portable(s, n, scale, thr, vals, idx);
}

// Of c candidates in key order, keep the best k (larger value, ties to the earlier = lower key), still in key order.
// Returns the new count min(c, k) and sets *kth to the k-th best value when k are kept (else -inf). When fewer than
// k candidates are known to be > hi, only those <= hi are searched for the cut. tmp: c slots.
template <typename T, typename I>
int64_t keep_best(T* vals, I* idx, int64_t c, int64_t k, T* tmp, T* kth,
                  T hi = std::numeric_limits<T>::infinity()) {
  if (c <= k) {
    T t = kNegInf<T>;
    if (c == k) {
      t = vals[0];
      for (int64_t i = 1; i < c; ++i) t = std::min(t, vals[i]);
    }
    *kth = t;
    return c;
  }
  int64_t mid = 0;
  for (int64_t i = 0; i < c; ++i) {  // branch-free compaction of the values <= hi
    tmp[mid] = vals[i];
    mid += !(vals[i] > hi);
  }
  const int64_t need = k - (c - mid);  // rank of the cut among them (>= 1: fewer than k are > hi)
  std::nth_element(tmp, tmp + (need - 1), tmp + mid, std::greater<T>());
  const T t = tmp[need - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < c; ++i) above += vals[i] > t;
  int64_t ties = k - above, m = 0;
  for (int64_t i = 0; i < c; ++i) {
    const T v = vals[i];
    if (v > t || (v == t && ties-- > 0)) {
      vals[m] = v;
      idx[m++] = idx[i];
    }
  }
  *kth = t;
  return k;
}

// z with P(Z > z) = p for a standard normal Z, 0 < p <= 0.5 (Abramowitz & Stegun 26.2.23, error < 5e-4).
inline double normal_upper_quantile(double p) {
  const double t = std::sqrt(-2.0 * std::log(p));
  return t - (2.515517 + t * (0.802853 + t * 0.010328)) / (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308)));
}

// A cut `lo` that at least k of the n values scale * s[j] exceed, and in the common case exactly k, so that the
// candidates above it need no further selection: a first guess from the row's mean and spread (attention logits are
// close to normal), then vectorised counting passes that interpolate between the best counts above and below k.
// *hi gets a value that fewer than k exceed (+inf if none was seen). Returns -inf (everything passes) when there is
// nothing to gain. Exact whatever the distribution: with at least k values above lo, all of the top k are.
template <typename T>
T find_threshold(const T* s, int64_t n, T scale, int64_t k, T* hi) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  *hi = inf;
  T mean, sd;
  if (n <= k + 8 || !moments(s, n, scale, &mean, &sd) || !(sd > 0)) return kNegInf<T>;
  const double target = static_cast<double>(k) + 0.5;  // aim between the k-th and (k+1)-th value
  const double p = target / static_cast<double>(n);
  const double z = p <= 0.5 ? normal_upper_quantile(p) : -normal_upper_quantile(1.0 - p);
  T lo = kNegInf<T>, t = mean + sd * static_cast<T>(z);
  int64_t c_lo = n, c_hi = 0;
  for (int it = 0; it < 12; ++it) {
    const int64_t c = count_above(s, n, scale, t);
    if (c >= k) {
      lo = t;
      c_lo = c;
      if (c == k) break;
    } else {
      *hi = t;
      c_hi = c;
    }
    T next;
    if (lo > kNegInf<T> && *hi < inf) {  // bracketed: interpolate the count linearly
      next = lo + (*hi - lo) * static_cast<T>((static_cast<double>(c_lo) - target) / static_cast<double>(c_lo - c_hi));
    } else {  // one side only: a Newton step on the normal model's count, at most one spread
      const double zz = (static_cast<double>(t) - mean) / sd;
      const double density = static_cast<double>(n) * std::exp(-0.5 * zz * zz) * 0.3989422804014327 / sd;
      const double step = (static_cast<double>(c) - target) / std::max(density, 1e-30);
      next = t + static_cast<T>(std::clamp(step, -static_cast<double>(sd), static_cast<double>(sd)));
    }
    if (!(next > lo && next < *hi)) {
      if (lo == kNegInf<T>) next = *hi - sd;
      else if (*hi == inf) next = lo + sd;
      else next = lo + (*hi - lo) / 2;
      if (!(next > lo && next < *hi)) break;  // no float left between them (ties at the cut)
    }
    t = next;
  }
  return lo;
}

// The best k of the n values scale * s[j] (ties to the lower j), in key order, into vals/idx (n + 8 slots each);
// returns how many (fewer than k only when fewer than k values are > -inf). tmp: n slots.
template <typename T>
int64_t select_row(const T* s, int64_t n, T scale, int64_t k, T* vals, int32_t* idx, T* tmp) {
  T hi, kth;
  const T lo = find_threshold(s, n, scale, k, &hi);
  const int64_t c = collect_above(s, n, scale, lo, vals, idx);
  return keep_best(vals, idx, c, k, tmp, &kth, hi);
}

}  // namespace cpu
}  // namespace topk
}  // namespace vosops
