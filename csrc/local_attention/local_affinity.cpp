// local_affinity / local_aggregate: op schemas and the CPU kernels (forward and backward).
//
// Three row kernels in the tensors' own (B, [N,] C, H, W) layout cover both ops and their gradients:
//   scores  out[b, n, p, i, j] = scale * <a[b, :, i, j], x[b, n, :, pos]>      affinity; aggregate's d/dweights
//   gather  out[b, c, i, j]    = scale * sum_{n,p} w[b, n, p, i, j] x[b, n, c, pos]   aggregate; affinity's d/dq
//   scatter out[b, n, c, pos] += scale * w[b, n, p, i, j] a[b, c, i, j]         affinity's d/dk; aggregate's d/dv
// where pos is the candidate's key position; out-of-frame candidates and (for the affinity) columns outside a
// circle window are skipped (their logits are constants, their values zero). A row of W queries shares one
// candidate column at a time, so the inner loops run over j with contiguous query-side reads and writes.
// The scatter is split into tasks that own disjoint (b, n, channel-block) planes: no atomics, deterministic.
// Both ops without offsets take the register-blocked row kernels of local_affinity_rows.h instead.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "common/native.h"
#include "local_attention/local_affinity_math.h"
#include "local_attention/local_affinity.h"
#include "local_attention/local_affinity_rows.h"

namespace vosops {
namespace local_affinity {
namespace {

// A run of queries j0 .. j0+len-1 of one row whose candidates are in frame at consecutive key positions
// pos0 .. pos0+len-1. Without offsets a row is one run, with smooth flows a few: the inner loops then run over runs,
// contiguous on both sides, so they vectorise. Per-pixel flows that vary break rows into many short runs; those rows
// take a per-query loop over the key positions instead (Row::runs empty, Row::pos holds them, -1 out of frame).
struct Run {
  int64_t j0, len, pos0;
};

struct Row {
  std::vector<Run> runs;
  std::vector<int64_t> pos;
  bool by_runs;
  explicit Row(int64_t W) : pos(W) { runs.reserve(W); }
};

// The candidates of window column p for the W queries of row i (reference n of batch b).
inline void row_candidates(const Geometry& g, int64_t b, int64_t n, int64_t i, int64_t p, Row& row) {
  const int32_t* ox = g.offsets ? g.offsets + ((b * g.N + n) * 2 * g.H + i) * g.W : nullptr;
  const int64_t HW = g.H * g.W;
  std::vector<Run>& runs = row.runs;
  runs.clear();
  for (int64_t j = 0; j < g.W; ++j) {
    const int64_t pos = candidate_pos(i, j, ox ? ox[HW + j] : 0, ox ? ox[j] : 0, p, g.radius, g.dilation, g.H, g.W);
    row.pos[j] = pos;
    if (pos < 0) continue;
    if (!runs.empty() && runs.back().j0 + runs.back().len == j && runs.back().pos0 + runs.back().len == pos) {
      ++runs.back().len;
    } else {
      runs.push_back({j, 1, pos});
    }
  }
  row.by_runs = static_cast<int64_t>(runs.size()) * 8 <= g.W + 8;  // runs of ~8+ queries on average
}

#define VOSOPS_AFF_INLINE inline __attribute__((always_inline))

// acc[t] += a[t] * b[t]: the one inner loop of every kernel.
template <typename acc_t>
VOSOPS_AFF_INLINE void fma_run(acc_t* __restrict acc, const acc_t* __restrict a, const acc_t* __restrict b, int64_t len) {
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) acc[t] += a[t] * b[t];
}

// acc[j] += a[j] * x[pos] over the row's in-frame queries (gather on x's side).
template <typename acc_t>
VOSOPS_AFF_INLINE void fma_row(const Row& row, acc_t* __restrict acc, const acc_t* __restrict a, const acc_t* __restrict x) {
  if (row.by_runs) {
    for (const Run& r : row.runs) fma_run(acc + r.j0, a + r.j0, x + r.pos0, r.len);
    return;
  }
  const int64_t W = static_cast<int64_t>(row.pos.size());
  for (int64_t j = 0; j < W; ++j)
    if (row.pos[j] >= 0) acc[j] += a[j] * x[row.pos[j]];
}

// The channel loops of one (row, window column): everything hot. Compiled twice below, for AVX2+FMA and the
// baseline, and picked at run time (the extension is built without -mavx2).
//   accumulate: acc[c*sacc + j] += a[c*sa + j] * x[c*sx + pos(j)]      (scores: sacc = 0; gather: sa = 0)
//   scatter:    o[c*so + pos(j)] += ws[j] * a[c*sa + j]
template <typename acc_t>
VOSOPS_AFF_INLINE void accumulate_impl(const Row& rw, acc_t* acc, int64_t sacc, const acc_t* a, int64_t sa,
                                       const acc_t* x, int64_t sx, int64_t C) {
  for (int64_t c = 0; c < C; ++c) fma_row(rw, acc + c * sacc, a + c * sa, x + c * sx);
}

template <typename acc_t>
VOSOPS_AFF_INLINE void scatter_impl(const Row& rw, acc_t* o, int64_t so, const acc_t* ws, const acc_t* a, int64_t sa,
                                    int64_t C) {
  const int64_t W = static_cast<int64_t>(rw.pos.size());
  for (int64_t c = 0; c < C; ++c, o += so, a += sa) {
    if (rw.by_runs) {
      for (const Run& r : rw.runs) fma_run(o + r.pos0, ws + r.j0, a + r.j0, r.len);
    } else {
      for (int64_t j = 0; j < W; ++j)
        if (rw.pos[j] >= 0) o[rw.pos[j]] += ws[j] * a[j];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename acc_t>
__attribute__((noinline, target("avx2,fma"))) void accumulate_avx2(const Row& rw, acc_t* acc, int64_t sacc,
                                                                     const acc_t* a, int64_t sa, const acc_t* x,
                                                                     int64_t sx, int64_t C) {
  accumulate_impl(rw, acc, sacc, a, sa, x, sx, C);
}
template <typename acc_t>
__attribute__((noinline, target("avx2,fma"))) void scatter_avx2(const Row& rw, acc_t* o, int64_t so, const acc_t* ws,
                                                                  const acc_t* a, int64_t sa, int64_t C) {
  scatter_impl(rw, o, so, ws, a, sa, C);
}
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
inline bool has_avx2() { return false; }
#endif

template <typename acc_t>
__attribute__((noinline)) void accumulate_base(const Row& rw, acc_t* acc, int64_t sacc, const acc_t* a, int64_t sa,
                                               const acc_t* x, int64_t sx, int64_t C) {
  accumulate_impl(rw, acc, sacc, a, sa, x, sx, C);
}
template <typename acc_t>
__attribute__((noinline)) void scatter_base(const Row& rw, acc_t* o, int64_t so, const acc_t* ws, const acc_t* a,
                                            int64_t sa, int64_t C) {
  scatter_impl(rw, o, so, ws, a, sa, C);
}

template <typename acc_t>
inline void accumulate(const Row& rw, acc_t* acc, int64_t sacc, const acc_t* a, int64_t sa, const acc_t* x,
                       int64_t sx, int64_t C) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return accumulate_avx2(rw, acc, sacc, a, sa, x, sx, C);
#endif
  accumulate_base(rw, acc, sacc, a, sa, x, sx, C);
}

template <typename acc_t>
inline void scatter_channels(const Row& rw, acc_t* o, int64_t so, const acc_t* ws, const acc_t* a, int64_t sa,
                             int64_t C) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return scatter_avx2(rw, o, so, ws, a, sa, C);
#endif
  scatter_base(rw, o, so, ws, a, sa, C);
}

// Rows broken into short runs by per-pixel flows: one contiguous dot product over channels per in-frame query,
// from channels-last copies (acl: the row's (W, C) queries, xcl: the (H*W, C) keys of one reference).
template <typename acc_t>
VOSOPS_AFF_INLINE void dots_impl(const Row& rw, acc_t* acc, const acc_t* acl, const acc_t* xcl, int64_t C) {
  const int64_t W = static_cast<int64_t>(rw.pos.size());
  for (int64_t j = 0; j < W; ++j) {
    if (rw.pos[j] < 0) continue;
    const acc_t* __restrict qa = acl + j * C;
    const acc_t* __restrict kx = xcl + rw.pos[j] * C;
    acc_t sum = acc_t(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += qa[c] * kx[c];
    acc[j] = sum;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename acc_t>
__attribute__((noinline, target("avx2,fma"))) void dots_avx2(const Row& rw, acc_t* acc, const acc_t* acl,
                                                               const acc_t* xcl, int64_t C) {
  dots_impl(rw, acc, acl, xcl, C);
}
#endif

template <typename acc_t>
__attribute__((noinline)) void dots_base(const Row& rw, acc_t* acc, const acc_t* acl, const acc_t* xcl, int64_t C) {
  dots_impl(rw, acc, acl, xcl, C);
}

template <typename acc_t>
inline void dots(const Row& rw, acc_t* acc, const acc_t* acl, const acc_t* xcl, int64_t C) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return dots_avx2(rw, acc, acl, xcl, C);
#endif
  dots_base(rw, acc, acl, xcl, C);
}

// scores: a (B, C, H, W), x (B, N, C, H, W) -> out (B, N, P, H, W); out-of-frame -> fill, outside the window -> -inf.
// From this many channels a contiguous dot product per query beats the runs' loop over channels (1.4x measured at
// C = 64 without offsets; the runs stay for the narrow value side, Cv = 3-7, where the dot would be too short).
constexpr int64_t kDotMinChannels = 16;

// acl / xcl: channels-last copies of a (B, H, W, C) and x (B, N, H, W, C) for rows of short runs, or null;
// a / x may be null when acl / xcl are given and C >= kDotMinChannels (never read then).
template <typename acc_t>
void scores(const Geometry& g, const acc_t* a, const acc_t* x, const acc_t* acl, const acc_t* xcl, int64_t C,
            acc_t scale, acc_t fill, acc_t* out) {
  const int64_t HW = g.H * g.W, W = g.W;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, g.B * g.N * g.H, 1, [&](int64_t r0, int64_t r1) {
    Row rw(W);
    std::vector<acc_t> acc(W);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t i = row % g.H, bn = row / g.H, b = bn / g.N, n = bn % g.N;
      for (int64_t p = 0; p < g.P; ++p) {
        acc_t* o = out + (bn * g.P + p) * HW + i * W;
        if (!in_window(p, g.radius, g.circle)) {
          std::fill(o, o + W, -kInf);
          continue;
        }
        row_candidates(g, b, n, i, p, rw);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (acl == nullptr || (rw.by_runs && C < kDotMinChannels)) {
          accumulate(rw, acc.data(), 0, a + b * C * HW + i * W, HW, x + bn * C * HW, HW, C);
        } else {
          dots(rw, acc.data(), acl + (b * HW + i * W) * C, xcl + bn * HW * C, C);
        }
        for (int64_t j = 0; j < W; ++j) o[j] = rw.pos[j] >= 0 ? scale * acc[j] : fill;
      }
    }
  });
}

// gather: w (B, N, P, H, W), x (B, N, C, H, W) -> out (B, C, H, W).
template <typename acc_t>
void gather(const Geometry& g, const acc_t* w, const acc_t* x, int64_t C, acc_t scale, acc_t* out) {
  const int64_t HW = g.H * g.W, W = g.W;
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t r0, int64_t r1) {
    Row rw(W);
    std::vector<acc_t> acc(C * W);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / g.H, i = row % g.H;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t bn = b * g.N + n;
        for (int64_t p = 0; p < g.P; ++p) {
          if (!in_window(p, g.radius, g.circle)) continue;
          row_candidates(g, b, n, i, p, rw);
          const acc_t* wr = w + (bn * g.P + p) * HW + i * W;
          accumulate(rw, acc.data(), W, wr, 0, x + bn * C * HW, HW, C);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        acc_t* o = out + (b * C + c) * HW + i * W;
        for (int64_t j = 0; j < W; ++j) o[j] = scale * acc[c * W + j];
      }
    }
  });
}

// scatter: w (B, N, P, H, W), a (B, C, H, W) -> out (B, N, C, H, W) += (zero-filled by the caller).
template <typename acc_t>
void scatter(const Geometry& g, const acc_t* w, const acc_t* a, int64_t C, acc_t scale, acc_t* out) {
  const int64_t HW = g.H * g.W, W = g.W;
  // Tasks own (b, n, channel block) planes of out; enough blocks to feed every thread when B*N is small.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(C, (2 * threads + g.B * g.N - 1) / (g.B * g.N)));
  at::parallel_for(0, g.B * g.N * blocks, 1, [&](int64_t t0, int64_t t1) {
    Row rw(W);
    std::vector<acc_t> ws(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bn = task / blocks, blk = task % blocks, b = bn / g.N, n = bn % g.N;
      const int64_t c0 = C * blk / blocks, c1 = C * (blk + 1) / blocks;
      for (int64_t i = 0; i < g.H; ++i) {
        for (int64_t p = 0; p < g.P; ++p) {
          if (!in_window(p, g.radius, g.circle)) continue;
          row_candidates(g, b, n, i, p, rw);
          const acc_t* wr = w + (bn * g.P + p) * HW + i * W;
          for (int64_t j = 0; j < W; ++j) ws[j] = scale * wr[j];
          scatter_channels(rw, out + (bn * C + c0) * HW, HW, ws.data(), a + (b * C + c0) * HW + i * W, HW, c1 - c0);
        }
      }
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor to_acc(const at::Tensor& t) { return t.to(acc_type(t.scalar_type())).contiguous(); }

at::Tensor local_affinity_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& offsets,
                              int64_t radius, int64_t dilation, c10::string_view window, double scale,
                              c10::string_view border) {
  check_scale("local_affinity", scale);
  Geometry g = affinity_geometry(q, k, offsets, radius, dilation, window, border);
  const at::ScalarType a = acc_type(q.scalar_type());
  at::Tensor out = new_output({g.B, g.N, g.P, g.H, g.W}, q.options().dtype(a));
  if (out.numel() > 0) {
    const at::Tensor off = rounded_offsets_cpu(offsets, g);
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    // A wide channels-last float k (ViT tokens viewed as images) is read in place by the dot products below; the
    // row kernels would copy it to their row layout.
    const bool in_place = q.size(1) >= kDotMinChannels && row_kernels::read_in_place(k);
    if (use_rows(g, a, k) && !in_place) {  // no offsets: eight queries of a row at a time (local_affinity_rows.h)
      const at::Tensor qp = row_kernels::pad_tail(q), kp = row_kernels::pad_ends(k);
      scores_rows(g, qp.const_data_ptr<float>(), qp.size(3), kp.const_data_ptr<float>(), kp.size(4), q.size(1),
                  static_cast<float>(scale),
                  border == "zero" ? 0.f : -std::numeric_limits<float>::infinity(), out.data_ptr<float>());
      return out.to(q.scalar_type());
    }
    // Channels-last views for per-query dot products (rows broken by flows; every row when C is wide), taken
    // from the inputs directly: channels-last inputs (ViT tokens viewed as images) are then read in place. The
    // (B, C, H, W) layout only serves the runs' loop over channels, which `scores` takes for narrow C alone.
    const bool cl = off.defined() || q.size(1) >= kDotMinChannels, nchw = q.size(1) < kDotMinChannels;
    const at::Tensor qa = nchw ? to_acc(q) : at::Tensor(), ka = nchw ? to_acc(k) : at::Tensor();
    const at::Tensor qcl = cl ? q.to(a).permute({0, 2, 3, 1}).contiguous() : at::Tensor();
    const at::Tensor kcl = cl ? k.to(a).permute({0, 1, 3, 4, 2}).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(a, "local_affinity_cpu", [&] {
      const scalar_t fill = border == "zero" ? scalar_t(0) : -std::numeric_limits<scalar_t>::infinity();
      scores<scalar_t>(g, nchw ? qa.const_data_ptr<scalar_t>() : nullptr,
                       nchw ? ka.const_data_ptr<scalar_t>() : nullptr,
                       qcl.defined() ? qcl.const_data_ptr<scalar_t>() : nullptr,
                       kcl.defined() ? kcl.const_data_ptr<scalar_t>() : nullptr, q.size(1),
                       static_cast<scalar_t>(scale), fill, out.data_ptr<scalar_t>());
    });
  }
  return out.to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> local_affinity_backward_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                               const at::Tensor& k,
                                                               const std::optional<at::Tensor>& offsets,
                                                               int64_t radius, int64_t dilation,
                                                               c10::string_view window, double scale, bool need_q,
                                                               bool need_k) {
  check_scale("local_affinity_backward", scale);
  // Either border: out-of-frame logits are constants (-inf or 0) and pass no gradient.
  Geometry g = affinity_geometry(q, k, offsets, radius, dilation, window, "mask");
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({g.B, g.N, g.P, g.H, g.W}),
                    "local_affinity_backward: grad must be (B, N, P, H, W), got ", grad.sizes());
  const at::ScalarType a = acc_type(q.scalar_type());
  at::Tensor gq = need_q ? at::empty(q.sizes(), q.options().dtype(a)) : q.new_empty({0});
  at::Tensor gk = need_k ? at::zeros(k.sizes(), k.options().dtype(a)) : k.new_empty({0});
  if ((need_q || need_k) && grad.numel() > 0) {
    const at::Tensor off = rounded_offsets_cpu(offsets, g), ga = grad.to(a).contiguous();
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    if (use_rows(g, a, k)) {  // no offsets: gathers over eight pixels of a row at a time (local_affinity_rows.h)
      const float s = static_cast<float>(scale);
      if (need_q) {
        const at::Tensor kp = row_kernels::pad_ends(k);
        dq_rows(g, ga.const_data_ptr<float>(), kp.const_data_ptr<float>(), kp.size(4), q.size(1), s,
                gq.data_ptr<float>());
      }
      if (need_k) {
        const at::Tensor qp = row_kernels::pad_ends(q);
        dk_rows(g, ga.const_data_ptr<float>(), qp.const_data_ptr<float>(), qp.size(3), q.size(1), s,
                gk.data_ptr<float>());
      }
      return {gq.to(q.scalar_type()), gk.to(k.scalar_type())};
    }
    AT_DISPATCH_FLOATING_TYPES(a, "local_affinity_backward_cpu", [&] {
      const scalar_t s = static_cast<scalar_t>(scale);
      if (need_q) gather<scalar_t>(g, ga.const_data_ptr<scalar_t>(), to_acc(k).const_data_ptr<scalar_t>(), q.size(1),
                                   s, gq.data_ptr<scalar_t>());
      if (need_k) scatter<scalar_t>(g, ga.const_data_ptr<scalar_t>(), to_acc(q).const_data_ptr<scalar_t>(),
                                    q.size(1), s, gk.data_ptr<scalar_t>());
    });
  }
  return {gq.to(q.scalar_type()), gk.to(k.scalar_type())};
}

at::Tensor local_aggregate_cpu(const at::Tensor& weights, const at::Tensor& v, const std::optional<at::Tensor>& offsets,
                               int64_t radius, int64_t dilation) {
  Geometry g = aggregate_geometry(weights, v, offsets, radius, dilation);
  const at::ScalarType a = acc_type(v.scalar_type());
  const int64_t Cv = v.size(2);
  at::Tensor out = new_output({g.B, Cv, g.H, g.W}, v.options().dtype(a));
  if (out.numel() > 0) {
    const at::Tensor off = rounded_offsets_cpu(offsets, g), wa = to_acc(weights);
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    if (use_rows(g, a, v)) {  // no offsets: the weights of eight queries at once against padded value rows
      const at::Tensor vp = row_kernels::pad_ends(v);
      dq_rows(g, wa.const_data_ptr<float>(), vp.const_data_ptr<float>(), vp.size(4), Cv, 1.f, out.data_ptr<float>());
      return out.to(v.scalar_type());
    }
    const at::Tensor va = to_acc(v);
    AT_DISPATCH_FLOATING_TYPES(a, "local_aggregate_cpu", [&] {
      gather<scalar_t>(g, wa.const_data_ptr<scalar_t>(), va.const_data_ptr<scalar_t>(), Cv, scalar_t(1),
                       out.data_ptr<scalar_t>());
    });
  }
  return out.to(v.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> local_aggregate_backward_cpu(const at::Tensor& grad_out, const at::Tensor& weights,
                                                                const at::Tensor& v,
                                                                const std::optional<at::Tensor>& offsets,
                                                                int64_t radius, int64_t dilation, bool need_weights,
                                                                bool need_v) {
  Geometry g = aggregate_geometry(weights, v, offsets, radius, dilation);
  const int64_t Cv = v.size(2);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef({g.B, Cv, g.H, g.W}),
                    "local_aggregate_backward: grad_out must be (B, Cv, H, W), got ", grad_out.sizes());
  const at::ScalarType a = acc_type(v.scalar_type());
  at::Tensor gw = need_weights ? at::empty(weights.sizes(), weights.options().dtype(a)) : weights.new_empty({0});
  at::Tensor gv = need_v ? at::zeros(v.sizes(), v.options().dtype(a)) : v.new_empty({0});
  if ((need_weights || need_v) && weights.numel() > 0) {  // Cv = 0 still runs: d/dweights is then all 0
    const at::Tensor off = rounded_offsets_cpu(offsets, g);
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    if (use_rows(g, a, v)) {  // no offsets: d/dweights as row scores, dv gathered (local_affinity_rows.h)
      if (need_weights) {
        const at::Tensor gp = row_kernels::pad_tail(grad_out), vp = row_kernels::pad_ends(v);
        scores_rows(g, gp.const_data_ptr<float>(), gp.size(3), vp.const_data_ptr<float>(), vp.size(4), Cv, 1.f, 0.f,
                    gw.data_ptr<float>());
      }
      if (need_v) {
        const at::Tensor wa = to_acc(weights), ge = row_kernels::pad_ends(grad_out);
        dk_rows(g, wa.const_data_ptr<float>(), ge.const_data_ptr<float>(), ge.size(3), Cv, 1.f, gv.data_ptr<float>());
      }
      return {gw.to(weights.scalar_type()), gv.to(v.scalar_type())};
    }
    const at::Tensor ga = to_acc(grad_out), va = to_acc(v);
    AT_DISPATCH_FLOATING_TYPES(a, "local_aggregate_backward_cpu", [&] {
      // d/dweights: an unscaled affinity of grad_out against v, 0 out of frame (every column of the window).
      if (need_weights) scores<scalar_t>(g, ga.const_data_ptr<scalar_t>(), va.const_data_ptr<scalar_t>(), nullptr,
                                         nullptr, Cv,
                                         scalar_t(1), scalar_t(0), gw.data_ptr<scalar_t>());
      if (need_v) scatter<scalar_t>(g, to_acc(weights).const_data_ptr<scalar_t>(), ga.const_data_ptr<scalar_t>(), Cv,
                                    scalar_t(1), gv.data_ptr<scalar_t>());
    });
  }
  return {gw.to(weights.scalar_type()), gv.to(v.scalar_type())};
}

}  // namespace
}  // namespace local_affinity
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def(
      "local_affinity(Tensor q, Tensor k, Tensor? offsets, int radius, int dilation, str window, float scale, "
      "str border) -> Tensor");
  m.def(
      "local_affinity_backward(Tensor grad, Tensor q, Tensor k, Tensor? offsets, int radius, int dilation, "
      "str window, float scale, bool need_q, bool need_k) -> (Tensor, Tensor)");
  m.def("local_aggregate(Tensor weights, Tensor v, Tensor? offsets, int radius, int dilation) -> Tensor");
  m.def(
      "local_aggregate_backward(Tensor grad_out, Tensor weights, Tensor v, Tensor? offsets, int radius, "
      "int dilation, bool need_weights, bool need_v) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("local_affinity", &vosops::local_affinity::local_affinity_cpu);
  m.impl("local_affinity_backward", &vosops::local_affinity::local_affinity_backward_cpu);
  m.impl("local_aggregate", &vosops::local_affinity::local_aggregate_cpu);
  m.impl("local_aggregate_backward", &vosops::local_affinity::local_aggregate_backward_cpu);
}
