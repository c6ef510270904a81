// local_attention: op schemas and the fused CPU kernels.
//
// Forward, per query pixel: score its N*Q in-window candidates into per-thread scratch (channels-last q and k, so
// each score is one contiguous dot product; without offsets eight queries of a row at a time, local_attention_rows.h),
// select (running top-k / threshold / all), then a max-subtracted softmax over the kept set and a gather of only
// the kept values. The (B, N*P, H, W) affinity never exists.
// Saved per query: log-sum-exp and threshold (stats) and the top-k list (also the op's top-k outputs).
// Backward recomputes the kept scores from q and k (flash-style): dq per query, dk/dv scattered into per-task
// private accumulators that are summed at the end (no atomics, deterministic). A softmax over every candidate
// without offsets instead writes the logits' gradient per chunk of batches and gathers dq, dk and dv from it
// (row_softmax_backward).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/native.h"
#include "local_attention/local_attention.h"
#include "local_attention/local_affinity_rows.h"
#include "local_attention/local_attention_rows.h"

namespace vosops {
namespace local_attention {
namespace {

#define VOSOPS_INLINE inline __attribute__((always_inline))

// Contiguous dot products; `omp simd` lets the compiler vectorise the reductions. dot4 runs four independent
// accumulator chains against one query vector (one chain is FMA-latency bound).
template <typename T>
VOSOPS_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// Value-side products (Cv = 1-7 for label maps): below 8 channels a plain loop, since the vectorised reduction's
// horizontal sum costs more than the products.
template <typename T>
VOSOPS_INLINE T dot_short(const T* __restrict a, const T* __restrict b, int64_t n) {
  if (n >= 8) return dot(a, b, n);
  T s = T(0);
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

template <typename T>
VOSOPS_INLINE void dot4(const T* __restrict q, const T* __restrict k0, const T* __restrict k1,
                        const T* __restrict k2, const T* __restrict k3, int64_t n, T* out) {
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < n; ++c) {
    const T qc = q[c];
    s0 += qc * k0[c];
    s1 += qc * k1[c];
    s2 += qc * k2[c];
    s3 += qc * k3[c];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// Channels-last, accumulation-precision views of the inputs plus the window geometry; with row scores also the
// padded row-layout copies that score_rows reads (then the forward needs no channels-last q and k).
template <typename acc_t>
struct Views {
  const acc_t* q;      // (B, H, W, C), or null when only the row scores read q
  const acc_t* k;      // (B, N, H, W, C), or null when only the row scores read k
  const acc_t* v;      // (B, N, H, W, Cv)
  const int32_t* off;  // (B, N, 2, H, W) rounded, or nullptr
  std::vector<int64_t> dy, dx;  // per in-window column, times dilation
  std::vector<int64_t> colpos;  // window column p -> its position t among the in-window columns, -1 if none
  RowViews rows;                // on() when the scores are computed eight queries of a row at a time
};

// Pointer of a tensor that may be absent.
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// qp / kp: the row-score copies (row_kernels::pad_tail / pad_ends), undefined for the per-query path.
template <typename acc_t>
Views<acc_t> make_views(const Config& c, const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& vc,
                        const at::Tensor& oc, const at::Tensor& qp = {}, const at::Tensor& kp = {}) {
  Views<acc_t> x;
  x.q = ptr_or_null<acc_t>(qc);
  x.k = ptr_or_null<acc_t>(kc);
  x.v = ptr_or_null<acc_t>(vc);
  x.off = ptr_or_null<int32_t>(oc);
  x.colpos.assign(c.P, -1);
  for (int64_t t = 0; t < c.Q(); ++t) {
    x.dy.push_back((c.cols[t] / c.D - c.radius) * c.dilation);
    x.dx.push_back((c.cols[t] % c.D - c.radius) * c.dilation);
    x.colpos[c.cols[t]] = t;
  }
  if (qp.defined()) x.rows = make_row_views(qp, kp, x.dy, x.dx);  // x.dx's buffer moves with x
  return x;
}

// Key position of candidate (n, t) of query (b, i, j): flat y*W + x, or -1 outside the frame.
template <typename acc_t>
inline int64_t key_pos(const Config& c, const Views<acc_t>& x, int64_t b, int64_t n, int64_t t, int64_t i,
                       int64_t j) {
  int64_t oy = 0, ox = 0;
  if (x.off) {
    const int32_t* o = x.off + ((b * c.N + n) * 2 * c.H + i) * c.W + j;
    ox = o[0];
    oy = o[c.H * c.W];
  }
  const int64_t y = i + oy + x.dy[t], xx = j + ox + x.dx[t];
  return (y >= 0 && y < c.H && xx >= 0 && xx < c.W) ? y * c.W + xx : -1;
}

// One candidate's score (the key at flat position pos of frame n), computed as the forward computed it.
template <typename acc_t>
inline acc_t score(const Config& c, const Views<acc_t>& x, const acc_t* qv, int64_t b, int64_t n, int64_t i,
                   int64_t j, int64_t pos) {
  if (pos < 0) return c.zero_border ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  if constexpr (std::is_same_v<acc_t, float>) {
    if (x.rows.on()) return score_row_chain(c, x.rows, b, n, i, j, pos / c.W, pos % c.W);
  }
  const acc_t* kv = x.k + ((b * c.N + n) * c.H * c.W + pos) * c.C;
  return static_cast<acc_t>(c.scale) * dot(qv, kv, c.C);
}

// Scores and key positions of every candidate n*Q + t of one query. Compiled once per instruction set as a
// non-inlined function that the forward and the backward both call, so a recomputed score is bit-identical to the
// forward's (the threshold rule compares scores exactly).
template <typename acc_t>
VOSOPS_INLINE void score_all_impl(const Config& c, const Views<acc_t>& x, int64_t b, int64_t i, int64_t j, acc_t* s,
                                  int64_t* pos) {
  const int64_t N = c.N, H = c.H, W = c.W, C = c.C, Q = c.Q(), HW = H * W;
  const acc_t scale = static_cast<acc_t>(c.scale);
  const acc_t fill = c.zero_border ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  const acc_t* qv = x.q + ((b * H + i) * W + j) * C;
  const int64_t* dys = x.dy.data();
  const int64_t* dxs = x.dx.data();
  for (int64_t n = 0; n < N; ++n) {
    int64_t oy = 0, ox = 0;
    if (x.off) {
      const int32_t* o = x.off + ((b * N + n) * 2 * H + i) * W + j;
      ox = o[0];
      oy = o[HW];
    }
    const int64_t y0 = i + oy, x0 = j + ox;
    const acc_t* kb = x.k + (b * N + n) * HW * C;
    acc_t* sn = s + n * Q;
    int64_t* pn = pos + n * Q;
    int64_t group[4];
    int ng = 0;
    acc_t d[4];
    for (int64_t t = 0; t < Q; ++t) {
      const int64_t y = y0 + dys[t], xx = x0 + dxs[t];
      if (y >= 0 && y < H && xx >= 0 && xx < W) {
        pn[t] = y * W + xx;
        group[ng++] = t;
        if (ng == 4) {
          dot4(qv, kb + pn[group[0]] * C, kb + pn[group[1]] * C, kb + pn[group[2]] * C, kb + pn[group[3]] * C, C, d);
          for (int e = 0; e < 4; ++e) sn[group[e]] = scale * d[e];
          ng = 0;
        }
      } else {
        pn[t] = -1;
        sn[t] = fill;
      }
    }
    for (int e = 0; e < ng; ++e) sn[group[e]] = scale * dot(qv, kb + pn[group[e]] * C, C);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define VOSOPS_LA_AVX2 1
template <typename acc_t>
__attribute__((noinline, target("avx2,fma"))) void score_all_avx2(const Config& c, const Views<acc_t>& x, int64_t b,
                                                                    int64_t i, int64_t j, acc_t* s, int64_t* pos) {
  score_all_impl(c, x, b, i, j, s, pos);
}
#endif

template <typename acc_t>
__attribute__((noinline)) void score_all_base(const Config& c, const Views<acc_t>& x, int64_t b, int64_t i,
                                              int64_t j, acc_t* s, int64_t* pos) {
  score_all_impl(c, x, b, i, j, s, pos);
}

template <typename acc_t>
inline void score_all(const Config& c, const Views<acc_t>& x, int64_t b, int64_t i, int64_t j, acc_t* s,
                      int64_t* pos) {
#ifdef VOSOPS_LA_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return score_all_avx2(c, x, b, i, j, s, pos);
#endif
  score_all_base(c, x, b, i, j, s, pos);
}

// Queries scored per call of score_block: eight on the row path, else one.
template <typename acc_t>
inline int64_t block_lanes(const Views<acc_t>& x) {
  return x.rows.on() ? kRowLanes : 1;
}

// Scores and key positions of queries (b, i, j0 + l), l < block_lanes (clipped at W): lane l's candidates at
// s + l * N*Q and pos + l * N*Q.
template <typename acc_t>
inline void score_block(const Config& c, const Views<acc_t>& x, int64_t b, int64_t i, int64_t j0, acc_t* s,
                        int64_t* pos) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (x.rows.on()) return score_rows(c, x.rows, b, i, j0, s, pos);
  }
  score_all(c, x, b, i, j0, s, pos);
}

// Whether any score is NaN (from a NaN or inf feature): one vectorised pass, so that the selection's hot loop
// compares numbers only and a row with a NaN takes the NaN-aware order.
template <typename acc_t>
inline bool any_nan(const acc_t* s, int64_t n) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t e = 0; e < n; ++e) nan |= s[e] != s[e];
  return nan != 0;
}

// Largest of n scores known not to be NaN (-inf when all are -inf); vectorised.
template <typename acc_t>
inline acc_t max_of(const acc_t* s, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t e = 0; e < n; ++e) m = s[e] > m ? s[e] : m;
  return m;
}

// w[e] = exp(s[e] - shift) for e < n (float: vectorised, exp_shifted).
template <typename acc_t>
inline void exp_all(const acc_t* s, int64_t n, acc_t shift, acc_t* w) {
  if constexpr (std::is_same_v<acc_t, float>) {
    exp_shifted(s, n, shift, w);
  } else {
    for (int64_t e = 0; e < n; ++e) w[e] = std::exp(s[e] - shift);
  }
}

// Running top-k over candidates visited in increasing index order: a heap whose top is the worst kept entry, so a
// later candidate enters only when it ranks before it (an equal later one has the higher index and loses the tie).
// kNan: the row holds a NaN, which ranks first (ranks_before); otherwise plain comparisons.
template <bool kNan, typename acc_t>
inline void select_topk(const acc_t* s, int64_t count, int64_t k, std::vector<std::pair<acc_t, int64_t>>& heap) {
  auto before = [](acc_t sa, int64_t ia, acc_t sb, int64_t ib) {
    return kNan ? ranks_before(sa, ia, sb, ib) : ranks_before_numbers(sa, ia, sb, ib);
  };
  auto better = [&](const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& b) {
    return before(a.first, a.second, b.first, b.second);
  };
  heap.clear();
  for (int64_t e = 0; e < k; ++e) heap.emplace_back(s[e], e);
  std::make_heap(heap.begin(), heap.end(), better);
  for (int64_t e = k; e < count; ++e) {
    if (before(s[e], e, heap.front().first, heap.front().second)) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {s[e], e};
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), better);  // best first
}

template <typename scalar_t>
void forward_cpu(const Config& c, const Views<at::opmath_type<scalar_t>>& x, at::Tensor& out, at::Tensor& stats,
                 at::Tensor& top_logits, at::Tensor& top_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = c.Q(), NQ = c.N * Q, K = c.topk, HW = c.H * c.W, Cv = c.Cv;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* sp = stats.data_ptr<acc_t>();
  scalar_t* lp = K ? top_logits.data_ptr<scalar_t>() : nullptr;
  int64_t* ip = K ? top_index.data_ptr<int64_t>() : nullptr;
  const int64_t lanes = block_lanes(x);
  at::parallel_for(0, c.B * c.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_block(lanes * NQ), acc(Cv), wts(K ? 0 : NQ);
    std::vector<int64_t> pos_block(lanes * NQ);
    std::vector<std::pair<acc_t, int64_t>> heap;
    heap.reserve(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / c.H, i = row % c.H;
      for (int64_t j = 0; j < c.W; ++j) {
        const int64_t qi = row * c.W + j;  // (b, i, j) in (B, H, W)
        const int64_t lane = j % lanes;
        if (lane == 0) score_block(c, x, b, i, j, s_block.data(), pos_block.data());
        const acc_t* s = s_block.data() + lane * NQ;
        const int64_t* pos = pos_block.data() + lane * NQ;
        acc_t m = -kInf, thr = -kInf;
        const bool nan_row = any_nan(s, NQ);
        if (K) {
          if (nan_row) {
            select_topk<true>(s, NQ, K, heap);
          } else {
            select_topk<false>(s, NQ, K, heap);
          }
          for (int64_t e = 0; e < K; ++e) {
            const int64_t cand = heap[e].second;
            lp[qi * K + e] = static_cast<scalar_t>(heap[e].first);
            ip[qi * K + e] = (cand / Q) * c.P + c.cols[cand % Q];
          }
          m = heap[0].first;
          if (c.normalize == Normalize::Threshold) thr = heap[K - 1].first;
        } else if (!nan_row) {
          m = max_of(s, NQ);
        }
        if (nan_row) {  // a NaN score (from a NaN or inf feature): the query's output is NaN, as the reference's
          constexpr acc_t kNan = std::numeric_limits<acc_t>::quiet_NaN();
          for (int64_t cv = 0; cv < Cv; ++cv) op[(b * Cv + cv) * HW + i * c.W + j] = static_cast<scalar_t>(kNan);
          sp[qi * 2] = kNan;
          sp[qi * 2 + 1] = thr;
          continue;
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t sum = acc_t(0);
        // Softmax over every candidate: all the exponentials at once (vectorised), the values after.
        const bool all = !K && m > -kInf;
        if (all) exp_all(s, NQ, m, wts.data());
        // vframe: the values of the candidate's reference frame (B, N, H, W, Cv)
        auto take = [&](int64_t e, const acc_t* vframe) {
          const acc_t w = all ? wts[e] : std::exp(s[e] - m);
          sum += w;
          if (pos[e] >= 0) {
            const acc_t* vv = vframe + pos[e] * Cv;
            for (int64_t cv = 0; cv < Cv; ++cv) acc[cv] += w * vv[cv];
          }
        };
        if (m > -kInf) {
          if (K && c.normalize == Normalize::Softmax) {
            for (int64_t e = 0; e < K; ++e)
              if (heap[e].first > -kInf) take(heap[e].second, x.v + (b * c.N + heap[e].second / Q) * HW * Cv);
          } else {
            // by frame, so no candidate index is divided (the division stalled the value loads)
            for (int64_t n = 0, e = 0; n < c.N; ++n) {
              const acc_t* vframe = x.v + (b * c.N + n) * HW * Cv;
              for (int64_t t = 0; t < Q; ++t, ++e)
                if (s[e] > -kInf && s[e] >= thr) take(e, vframe);
            }
          }
        }
        // Nothing kept (every candidate masked): output 0, and lse = +inf makes every backward weight 0.
        const bool empty = !(m > -kInf);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / sum;
        for (int64_t cv = 0; cv < Cv; ++cv) op[(b * Cv + cv) * HW + i * c.W + j] = static_cast<scalar_t>(acc[cv] * inv);
        sp[qi * 2] = empty ? kInf : m + std::log(sum);
        sp[qi * 2 + 1] = thr;
      }
    }
  });
}

// Per-thread scratch of the backward: one query's candidates (scores and positions: one block of queries').
template <typename acc_t>
struct BwdScratch {
  std::vector<acc_t> s, p, dp, ds;
  std::vector<int64_t> pos, krow, items;  // krow: a kept candidate's key row in (B*N*H*W), -1 out of frame
  BwdScratch(int64_t NQ, int64_t lanes)
      : s(lanes * NQ), p(NQ), dp(NQ), ds(NQ), pos(lanes * NQ), krow(NQ) {
    items.reserve(NQ);
  }
};

template <typename acc_t>
struct BwdIO {
  const acc_t* g;    // grad_out (B, H, W, Cv)
  const acc_t* gl;   // grad of the returned top-k logits (B, H, W, topk), or null
  const acc_t* st;   // stats (B, H, W, 2)
  const int64_t* idx;  // top-k indices (B, H, W, topk)
  acc_t* dq;         // (B, H, W, C) or null
};

// dq = scale * sum over the kept candidates of ds * k, by blocks of up to kDqBlock channels held in registers across
// the candidates (one accumulator array in memory made every candidate wait for the previous one's stores); the
// order of the sum per channel is the candidates' order, as before.
constexpr int64_t kDqBlock = 32;

template <typename acc_t>
VOSOPS_INLINE void dq_block(const acc_t* __restrict k, const int64_t* __restrict krow, const acc_t* __restrict ds,
                            const std::vector<int64_t>& items, acc_t scale, int64_t C, int64_t c0, int64_t width,
                            acc_t* __restrict out) {
  acc_t a[kDqBlock] = {};
  for (int64_t e : items) {
    if (krow[e] < 0) continue;  // zero-border candidate: constant logit, zero value
    const acc_t w = scale * ds[e];
    const acc_t* __restrict kv = k + krow[e] * C + c0;
#pragma omp simd
    for (int64_t cc = 0; cc < width; ++cc) a[cc] += w * kv[cc];
  }
  for (int64_t cc = 0; cc < width; ++cc) out[cc] = a[cc];
}

template <typename acc_t>
VOSOPS_INLINE void dq_of_query(const acc_t* k, const int64_t* krow, const acc_t* ds, const std::vector<int64_t>& items,
                               acc_t scale, int64_t C, acc_t* out) {
  int64_t c0 = 0;
  // full blocks with a constant width (fixed-length loops the compiler keeps in registers), then the rest
  for (; c0 + kDqBlock <= C; c0 += kDqBlock) dq_block(k, krow, ds, items, scale, C, c0, kDqBlock, out + c0);
  if (c0 < C) dq_block(k, krow, ds, items, scale, C, c0, C - c0, out + c0);
}

// Query rows [r0, r1): dq per query; dk/dv scattered into this task's private accumulators dkb/dvb.
template <typename acc_t>
VOSOPS_INLINE void backward_rows_impl(const Config& c, const Views<acc_t>& x, const BwdIO<acc_t>& io, acc_t* dkb,
                                      acc_t* dvb, int64_t r0, int64_t r1, BwdScratch<acc_t>& sc) {
  const int64_t Q = c.Q(), K = c.topk, HW = c.H * c.W, C = c.C, Cv = c.Cv, P = c.P, NQ = c.N * Q;
  const acc_t scale = static_cast<acc_t>(c.scale);
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const bool topk_list = K && c.normalize == Normalize::Softmax;  // the kept set is exactly the saved list
  const int64_t lanes = topk_list ? 1 : block_lanes(x);  // a top-k list is rescored candidate by candidate
  acc_t* p = sc.p.data();
  acc_t* dp = sc.dp.data();
  acc_t* ds = sc.ds.data();
  int64_t* krow = sc.krow.data();
  std::vector<int64_t>& items = sc.items;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / c.H, i = row % c.H;
    for (int64_t j = 0; j < c.W; ++j) {
      const int64_t qi = row * c.W + j;
      const int64_t lane = j % lanes;
      if (lane == 0 && !topk_list) score_block(c, x, b, i, j, sc.s.data(), sc.pos.data());
      acc_t* s = sc.s.data() + lane * NQ;
      int64_t* pos = sc.pos.data() + lane * NQ;
      const acc_t lse = io.st[qi * 2], thr = io.st[qi * 2 + 1];
      if (lse == kInf) continue;  // no candidate kept: zero gradient (a NaN lse goes on: NaN gradients)
      const acc_t* __restrict qv = x.q + qi * C;
      const acc_t* __restrict gv = io.g + qi * Cv;
      // The kept candidates ("items", as n*Q + t) with recomputed scores and key positions.
      items.clear();
      if (topk_list) {
        for (int64_t e = 0; e < K; ++e) {
          const int64_t full = io.idx[qi * K + e];
          const int64_t n = full / P, t = x.colpos[full % P];
          const int64_t cand = n * Q + t;
          pos[cand] = key_pos(c, x, b, n, t, i, j);
          s[cand] = score(c, x, qv, b, n, i, j, pos[cand]);
          krow[cand] = pos[cand] >= 0 ? (b * c.N + n) * HW + pos[cand] : -1;
          if (s[cand] > -kInf) items.push_back(cand);
        }
      } else {
        // Key rows by frame, so no candidate index is divided (a division per candidate stalled the scatters below)
        for (int64_t n = 0, e = 0; n < c.N; ++n) {
          const int64_t frame = (b * c.N + n) * HW;
          for (int64_t t = 0; t < Q; ++t, ++e) {
            if (s[e] > -kInf && s[e] >= thr) {
              items.push_back(e);
              krow[e] = pos[e] >= 0 ? frame + pos[e] : -1;
            }
          }
        }
      }
      acc_t D = acc_t(0);
      const bool all = !K;  // softmax over every candidate: all the exponentials at once (vectorised)
      if (all) exp_all(s, NQ, lse, p);
      for (int64_t e : items) {
        if (!all) p[e] = std::exp(s[e] - lse);
        const acc_t d = krow[e] >= 0 ? dot_short(gv, x.v + krow[e] * Cv, Cv) : acc_t(0);
        dp[e] = d;
        D += p[e] * d;
      }
      for (int64_t e : items) ds[e] = p[e] * (dp[e] - D);
      if (io.gl && K) {  // gradient flowing into the returned top-k logits
        for (int64_t e = 0; e < K; ++e) {
          const int64_t full = io.idx[qi * K + e];
          const int64_t cand = (full / P) * Q + x.colpos[full % P];
          if (krow[cand] >= 0) ds[cand] += io.gl[qi * K + e];
        }
      }
      if (io.dq) dq_of_query(x.k, krow, ds, items, scale, C, io.dq + qi * C);
      for (int64_t e : items) {
        const int64_t kbase = krow[e];
        if (kbase < 0) continue;  // zero-border candidate: constant logit, zero value
        const acc_t w = scale * ds[e];
        if (dkb) {
          acc_t* __restrict d = dkb + kbase * C;
#pragma omp simd
          for (int64_t cc = 0; cc < C; ++cc) d[cc] += w * qv[cc];
        }
        if (dvb) {
          acc_t* __restrict d = dvb + kbase * Cv;
          const acc_t pe = p[e];
          for (int64_t cv = 0; cv < Cv; ++cv) d[cv] += pe * gv[cv];
        }
      }
    }
  }
}

#ifdef VOSOPS_LA_AVX2
template <typename acc_t>
__attribute__((noinline, target("avx2,fma"))) void backward_rows_avx2(const Config& c, const Views<acc_t>& x,
                                                                        const BwdIO<acc_t>& io, acc_t* dkb, acc_t* dvb,
                                                                        int64_t r0, int64_t r1, BwdScratch<acc_t>& sc) {
  backward_rows_impl(c, x, io, dkb, dvb, r0, r1, sc);
}
#endif

template <typename acc_t>
__attribute__((noinline)) void backward_rows_base(const Config& c, const Views<acc_t>& x, const BwdIO<acc_t>& io,
                                                  acc_t* dkb, acc_t* dvb, int64_t r0, int64_t r1,
                                                  BwdScratch<acc_t>& sc) {
  backward_rows_impl(c, x, io, dkb, dvb, r0, r1, sc);
}

template <typename scalar_t>
void backward_cpu(const Config& c, const Views<at::opmath_type<scalar_t>>& x,
                  const BwdIO<at::opmath_type<scalar_t>>& io, at::opmath_type<scalar_t>* dk,
                  at::opmath_type<scalar_t>* dv, int64_t tasks, bool by_batch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = c.B * c.H, HW = c.H * c.W;
  // by_batch: tasks own whole batches, whose dk/dv regions are disjoint, so they share one accumulator.
  const int64_t dk_size = by_batch ? 0 : c.B * c.N * HW * c.C, dv_size = by_batch ? 0 : c.B * c.N * HW * c.Cv;
  at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
    BwdScratch<acc_t> sc(c.N * c.Q(), block_lanes(x));
    for (int64_t task = tb; task < te; ++task) {
      acc_t* dkb = dk ? dk + task * dk_size : nullptr;
      acc_t* dvb = dv ? dv + task * dv_size : nullptr;
      const int64_t r0 = by_batch ? c.B * task / tasks * c.H : rows * task / tasks;
      const int64_t r1 = by_batch ? c.B * (task + 1) / tasks * c.H : rows * (task + 1) / tasks;
#ifdef VOSOPS_LA_AVX2
      static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
      if (avx2) {
        backward_rows_avx2(c, x, io, dkb, dvb, r0, r1, sc);
        continue;
      }
#endif
      backward_rows_base(c, x, io, dkb, dvb, r0, r1, sc);
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Channels-last copy in accumulation precision: (B, [N,] C, H, W) -> (B, [N,] H, W, C).
at::Tensor to_cl(const at::Tensor& t) {
  const at::ScalarType a = acc_type(t.scalar_type());
  if (t.dim() == 4) return t.permute({0, 2, 3, 1}).to(a).contiguous();
  return t.permute({0, 1, 3, 4, 2}).to(a).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& offsets,
    int64_t radius, int64_t dilation, double scale, int64_t topk, c10::string_view normalize,
    c10::string_view window, c10::string_view border, bool return_topk) {
  (void)return_topk;  // the top-k list is always produced when topk > 0: the backward needs it
  const Config c = make_config(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = new_output({c.B, c.Cv, c.H, c.W}, opts);
  at::Tensor stats = new_output({c.B, c.H, c.W, 2}, opts.dtype(acc_type(q.scalar_type())));
  at::Tensor top_logits = new_output({c.B, c.H, c.W, c.topk}, opts);
  at::Tensor top_index = new_output({c.B, c.H, c.W, c.topk}, opts.dtype(at::kLong));
  // Empty channels (C or Cv = 0) still run: scores are then 0 and the statistics / top-k lists are defined.
  if (c.B * c.H * c.W == 0) return {out, stats, top_logits, top_index};
  // The row path reads padded row-layout copies of q and k (row_kernels.h) instead of channels-last ones.
  const bool rows = use_row_scores(c, k, offsets.has_value());
  const at::Tensor qc = rows ? at::Tensor() : to_cl(q), kc = rows ? at::Tensor() : to_cl(k), vc = to_cl(v);
  const at::Tensor qp = rows ? row_kernels::pad_tail(q) : at::Tensor();
  const at::Tensor kp = rows ? row_kernels::pad_ends(k) : at::Tensor();
  const at::Tensor oc = offsets.has_value() ? rounded_offsets_cpu(*offsets, c) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<acc_t> x = make_views<acc_t>(c, qc, kc, vc, oc, qp, kp);
    forward_cpu<scalar_t>(c, x, out, stats, top_logits, top_index);
  });
  return {out, stats, top_logits, top_index};
}

// Softmax over every candidate on the row path (MAMP training's form): the backward through local_affinity's row
// gathers. Per chunk of whole batches, the gradient of every logit (ds) and every weight (p) is written in the
// affinity layout (b, n, p, i, j); dq and dk are then gathered from ds and dv from p, each gradient element
// written once (local_affinity_rows.h). The per-query backward's scatters of dk and dv into per-task accumulators
// cost it most of its time. A chunk's two buffers stay within kRowBackwardBytes; a call whose one batch would not
// fit takes the per-query backward.
constexpr int64_t kRowBackwardBytes = int64_t(64) << 20;

int64_t row_backward_batches(const Config& c) {
  const int64_t per_batch = 2 * c.N * c.P * c.H * c.W * static_cast<int64_t>(sizeof(float));
  return std::min(c.B, kRowBackwardBytes / std::max<int64_t>(per_batch, 1));
}

// ds and p of batches [b0, b0 + nb) into ds_buf / p_buf (nb, N, P, H, W); p_buf may be null. Only the in-window
// columns are written (the gathers read no other).
void row_softmax_weights(const Config& c, const Views<float>& x, const float* g, const float* st, int64_t b0,
                         int64_t nb, float* ds_buf, float* p_buf) {
  const int64_t N = c.N, Q = c.Q(), NQ = N * Q, H = c.H, W = c.W, HW = H * W, P = c.P, Cv = c.Cv;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, nb * H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> s(kRowLanes * NQ), p(NQ), dp(NQ);
    std::vector<int64_t> pos(kRowLanes * NQ);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t bl = row / H, i = row % H, b = b0 + bl;
      for (int64_t j0 = 0; j0 < W; j0 += kRowLanes) {
        score_rows(c, x.rows, b, i, j0, s.data(), pos.data());
        for (int64_t j = j0; j < std::min(W, j0 + kRowLanes); ++j) {
          const int64_t qi = (b * H + i) * W + j;
          const float* sl = s.data() + (j - j0) * NQ;
          const int64_t* pl = pos.data() + (j - j0) * NQ;
          const float lse = st[qi * 2];
          // (n, t) -> its element of the buffers
          auto at = [&](int64_t n, int64_t t) { return ((bl * N + n) * P + c.cols[t]) * HW + i * W + j; };
          if (lse == kInf) {  // no candidate kept: zero gradient (a NaN lse goes on: NaN gradients)
            for (int64_t n = 0; n < N; ++n)
              for (int64_t t = 0; t < Q; ++t) {
                ds_buf[at(n, t)] = 0.f;
                if (p_buf) p_buf[at(n, t)] = 0.f;
              }
            continue;
          }
          exp_all(sl, NQ, lse, p.data());
          const float* gv = g + qi * Cv;
          float D = 0.f;
          for (int64_t n = 0, e = 0; n < N; ++n) {
            const float* vframe = x.v + (b * N + n) * HW * Cv;
            for (int64_t t = 0; t < Q; ++t, ++e) {
              dp[e] = pl[e] >= 0 ? dot_short(gv, vframe + pl[e] * Cv, Cv) : 0.f;
              D += p[e] * dp[e];
            }
          }
          for (int64_t n = 0, e = 0; n < N; ++n)
            for (int64_t t = 0; t < Q; ++t, ++e) {
              ds_buf[at(n, t)] = p[e] * (dp[e] - D);
              if (p_buf) p_buf[at(n, t)] = p[e];
            }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_softmax_backward(const Config& c, const at::Tensor& grad_out,
                                                                    const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, const at::Tensor& stats,
                                                                    bool need_q, bool need_k, bool need_v) {
  const auto f = q.options().dtype(at::kFloat);
  const int64_t B = c.B, N = c.N, C = c.C, Cv = c.Cv, H = c.H, W = c.W;
  const at::Tensor qp = row_kernels::pad_tail(q), kp = row_kernels::pad_ends(k), vc = to_cl(v), gc = to_cl(grad_out);
  const at::Tensor sc = stats.contiguous();
  const at::Tensor qe = need_k ? row_kernels::pad_ends(q) : at::Tensor();
  const at::Tensor ge = need_v ? row_kernels::pad_ends(grad_out) : at::Tensor();
  at::Tensor dq = need_q ? at::empty({B, C, H, W}, f) : q.new_empty({0});
  at::Tensor dk = need_k ? at::empty({B, N, C, H, W}, f) : k.new_empty({0});
  at::Tensor dv = need_v ? at::empty({B, N, Cv, H, W}, f) : v.new_empty({0});
  const Views<float> x = make_views<float>(c, at::Tensor(), at::Tensor(), vc, at::Tensor(), qp, kp);
  const int64_t chunk = row_backward_batches(c), Wk = kp.size(4);
  at::Tensor ds_buf = at::empty({chunk, N, c.P, H, W}, f);
  at::Tensor p_buf = need_v ? at::empty({chunk, N, c.P, H, W}, f) : at::Tensor();
  local_affinity::Geometry g{chunk, N, H, W, c.radius, c.dilation, c.P, c.Q() != c.P, nullptr};
  const float scale = static_cast<float>(c.scale);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    g.B = std::min(chunk, B - b0);
    float* ds = ds_buf.data_ptr<float>();
    float* p = need_v ? p_buf.data_ptr<float>() : nullptr;
    row_softmax_weights(c, x, gc.const_data_ptr<float>(), sc.const_data_ptr<float>(), b0, g.B, ds, p);
    if (need_q)
      local_affinity::dq_rows(g, ds, kp.const_data_ptr<float>() + b0 * N * C * H * Wk, Wk, C, scale,
                              dq.data_ptr<float>() + b0 * C * H * W);
    if (need_k)
      local_affinity::dk_rows(g, ds, qe.const_data_ptr<float>() + b0 * C * H * Wk, Wk, C, scale,
                              dk.data_ptr<float>() + b0 * N * C * H * W);
    if (need_v)
      local_affinity::dk_rows(g, p, ge.const_data_ptr<float>() + b0 * Cv * H * Wk, Wk, Cv, 1.f,
                              dv.data_ptr<float>() + b0 * N * Cv * H * W);
  }
  const auto st = q.scalar_type();
  return {need_q ? dq.to(st) : dq, need_k ? dk.to(st) : dk, need_v ? dv.to(st) : dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_topk_logits, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& offsets, const at::Tensor& stats,
    const at::Tensor& topk_index, int64_t radius, int64_t dilation, double scale, int64_t topk,
    c10::string_view normalize, c10::string_view window, c10::string_view border, bool need_q, bool need_k,
    bool need_v) {
  const Config c = make_config(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border);
  const bool with_gl =
      check_backward_inputs(c, grad_out, grad_topk_logits, stats, topk_index, acc_type(q.scalar_type()));
  const at::ScalarType a = acc_type(q.scalar_type());
  // Scores recomputed as the forward computed them: on the row path when the forward took it.
  const bool row_path = use_row_scores(c, k, offsets.has_value());
  if (c.topk == 0 && row_path && row_backward_batches(c) > 0 && c.B * c.H * c.W > 0 && (need_q || need_k || need_v))
    return row_softmax_backward(c, grad_out, q, k, v, stats, need_q, need_k, need_v);
  const auto aopts = q.options().dtype(a);
  at::Tensor dq_cl, dk_buf, dv_buf;
  const int64_t rows = c.B * c.H;
  // dk/dv are scatters: with at least as many batches as threads, tasks split by batch and share one accumulator;
  // otherwise each task (a block of query rows) has a private accumulator, summed at the end.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool by_batch = c.B >= threads;
  const int64_t tasks = by_batch ? threads : std::max<int64_t>(1, std::min<int64_t>(threads, rows));
  const int64_t copies = by_batch ? 1 : tasks;
  if (need_q) dq_cl = at::zeros({c.B, c.H, c.W, c.C}, aopts);
  if (need_k) dk_buf = at::zeros({copies, c.B, c.N, c.H, c.W, c.C}, aopts);
  if (need_v) dv_buf = at::zeros({copies, c.B, c.N, c.H, c.W, c.Cv}, aopts);
  if ((need_q || need_k || need_v) && c.B * c.H * c.W > 0) {
    const at::Tensor qc = to_cl(q), kc = to_cl(k), vc = to_cl(v);
    // dq/dk read channels-last; the row path's copies serve the recomputed scores.
    const at::Tensor qp = row_path ? row_kernels::pad_tail(q) : at::Tensor();
    const at::Tensor kp = row_path ? row_kernels::pad_ends(k) : at::Tensor();
    const at::Tensor oc = offsets.has_value() ? rounded_offsets_cpu(*offsets, c) : at::Tensor();
    const at::Tensor gc = to_cl(grad_out);
    const at::Tensor glc = with_gl ? grad_topk_logits->to(a).contiguous() : at::Tensor();
    const at::Tensor sc = stats.contiguous(), ic = topk_index.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Views<acc_t> x = make_views<acc_t>(c, qc, kc, vc, oc, qp, kp);
      const BwdIO<acc_t> io{gc.const_data_ptr<acc_t>(), with_gl ? glc.const_data_ptr<acc_t>() : nullptr,
                            sc.const_data_ptr<acc_t>(), c.topk ? ic.const_data_ptr<int64_t>() : nullptr,
                            need_q ? dq_cl.data_ptr<acc_t>() : nullptr};
      backward_cpu<scalar_t>(c, x, io, need_k ? dk_buf.data_ptr<acc_t>() : nullptr,
                             need_v ? dv_buf.data_ptr<acc_t>() : nullptr, tasks, by_batch);
    });
  }
  const auto st = q.scalar_type();
  at::Tensor gq = need_q ? dq_cl.permute({0, 3, 1, 2}).to(st).contiguous() : q.new_empty({0});
  at::Tensor gk = need_k ? dk_buf.sum(0).permute({0, 1, 4, 2, 3}).to(st).contiguous() : k.new_empty({0});
  at::Tensor gv = need_v ? dv_buf.sum(0).permute({0, 1, 4, 2, 3}).to(st).contiguous() : v.new_empty({0});
  return {gq, gk, gv};
}

}  // namespace
}  // namespace local_attention
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def(
      "local_attention(Tensor q, Tensor k, Tensor v, Tensor? offsets, int radius, int dilation, float scale, "
      "int topk, str normalize, str window, str border, bool return_topk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "local_attention_backward(Tensor grad_out, Tensor? grad_topk_logits, Tensor q, Tensor k, Tensor v, "
      "Tensor? offsets, Tensor stats, Tensor topk_index, int radius, int dilation, float scale, int topk, "
      "str normalize, str window, str border, bool need_q, bool need_k, bool need_v) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("local_attention", &vosops::local_attention::local_attention_cpu);
  m.impl("local_attention_backward", &vosops::local_attention::local_attention_backward_cpu);
}
