// Top-k softmax aggregation: op schemas and the CPU kernels (global_topk, topk_aggregate, topk_attention).
//
// The FLOPs of global_topk and topk_attention are query-tile x key products: they go to ATen's matmul (MKL) on
// per-thread buffers; what is fused around them (topk/topk_cpu_kernels.h) is the per-query top-k selection, the
// softmax and the gather of the winners' values. No (M x L) tensor is ever allocated, in forward or backward: the
// largest buffer is a per-thread (query tile x L) score tile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "common/native.h"
#include "topk/topk.h"
#include "topk/topk_cpu_kernels.h"
#include "topk/topk_math.h"

namespace vosops {
namespace topk {
namespace {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per query tile: about `target` rows, with the task count (outer x tiles) a multiple of the thread count
// while tasks are few, so the last round does not leave a thread idle.
inline int64_t query_tile(int64_t M, int64_t outer, int64_t target) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  int64_t tiles = ceil_div(M, target);
  if (outer * tiles < 16 * nt) {
    while ((outer * tiles) % nt != 0 && tiles < M) ++tiles;
  }
  return ceil_div(M, tiles);
}

// --- global_topk --------------------------------------------------------------------------------------------------

constexpr int64_t kGlobalQueryTile = 256;
constexpr int64_t kGlobalKeyTile = 512;  // a 256 x 512 fp32 score tile (512 KB) stays in a core's L2

// Per task (batch, query tile): score tiles q_t k_tile^T by matmul into a per-thread buffer, and per query a running
// top-k whose k-th value is the admission threshold for the next tiles (key tiles arrive in increasing key index,
// so a later key equal to the k-th value loses the tie and `>` is the whole test).
template <typename scalar_t>
void global_topk_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask, int64_t topk, double scale_d,
                      at::Tensor& out_l, at::Tensor& out_i) {
  using acc_t = acc_of<scalar_t>;
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor qf = q.detach().to(acc).contiguous(), kf = k.detach().to(acc).contiguous();
  const int64_t B = q.size(0), M = q.size(1), L = k.size(1);
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t QT = query_tile(M, B, kGlobalQueryTile), mtiles = ceil_div(M, QT), LT = std::min(L, kGlobalKeyTile);
  scalar_t* lp = out_l.data_ptr<scalar_t>();
  int64_t* ip = out_i.data_ptr<int64_t>();
  at::parallel_for(0, B * mtiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({QT * LT}, qf.options());  // this thread's score tile
    // Running lists: k per query; the merge area holds a list plus one tile's admitted keys.
    std::vector<acc_t> run_v(QT * topk), run_t(QT), mv(topk + LT + 8), tmp(topk + LT + 8);
    std::vector<int64_t> run_i(QT * topk), mi(topk + LT + 8);
    std::vector<int64_t> run_n(QT);
    std::vector<int32_t> ci(LT + 8);
    std::vector<int64_t> order(topk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / mtiles, m0 = (task % mtiles) * QT, mt = std::min(QT, M - m0);
      std::fill(run_n.begin(), run_n.end(), 0);
      std::fill(run_t.begin(), run_t.end(), cpu::kNegInf<acc_t>);
      const at::Tensor qt = qf[b].narrow(0, m0, mt), kb = kf[b];
      for (int64_t l0 = 0; l0 < L; l0 += LT) {
        const int64_t lt = std::min(LT, L - l0);
        at::Tensor s = buf.narrow(0, 0, mt * lt).view({mt, lt});
        at::mm_out(s, qt, kb.narrow(0, l0, lt).t());
        acc_t* sp = s.data_ptr<acc_t>();
        if (mp != nullptr) {  // a masked key scores NaN, which no comparison admits
          const bool* mrow = mp + b * L + l0;
          for (int64_t j = 0; j < lt; ++j) {
            if (!mrow[j]) {
              for (int64_t r = 0; r < mt; ++r) sp[r * lt + j] = nan;
            }
          }
        }
        for (int64_t r = 0; r < mt; ++r) {
          const acc_t* row = sp + r * lt;
          int64_t n = run_n[r];
          acc_t thr = run_t[r];
          acc_t hi = std::numeric_limits<acc_t>::infinity();
          if (n == 0) thr = cpu::find_threshold(row, lt, scale, topk, &hi);  // first tile of this row
          const int64_t c = cpu::collect_above(row, lt, scale, thr, mv.data() + n, ci.data());
          if (c == 0) continue;
          acc_t* rv = run_v.data() + r * topk;
          int64_t* ri = run_i.data() + r * topk;
          std::copy(rv, rv + n, mv.data());  // the list's keys are lower than the tile's: they go first
          std::copy(ri, ri + n, mi.data());
          for (int64_t j = 0; j < c; ++j) mi[n + j] = l0 + ci[j];
          n = cpu::keep_best(mv.data(), mi.data(), n + c, topk, tmp.data(), &run_t[r], hi);
          std::copy(mv.data(), mv.data() + n, rv);
          std::copy(mi.data(), mi.data() + n, ri);
          run_n[r] = n;
        }
      }
      for (int64_t r = 0; r < mt; ++r) {
        const int64_t n = run_n[r];
        const acc_t* rv = run_v.data() + r * topk;
        const int64_t* ri = run_i.data() + r * topk;
        std::iota(order.begin(), order.begin() + n, int64_t(0));
        std::sort(order.begin(), order.begin() + n,
                  [&](int64_t a, int64_t c) { return ranks_before(rv[a], ri[a], rv[c], ri[c]); });
        const int64_t o = (b * M + m0 + r) * topk;
        for (int64_t j = 0; j < topk; ++j) {
          const bool have = j < n;
          lp[o + j] = static_cast<scalar_t>(have ? rv[order[j]] : cpu::kNegInf<acc_t>);
          ip[o + j] = have ? ri[order[j]] : -1;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> global_topk_cpu(const at::Tensor& q, const at::Tensor& k, int64_t topk,
                                                   double scale, const std::optional<at::Tensor>& key_mask) {
  const at::Tensor mask = check_global_topk_args(q, k, topk, scale, key_mask);
  const int64_t B = q.size(0), M = q.size(1);
  at::Tensor out_l = new_output({B, M, topk}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor out_i = new_output({B, M, topk}, q.options().dtype(at::kLong));
  if (out_l.numel() == 0) return {out_l, out_i};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_topk_cpu",
                                  [&] { global_topk_impl<scalar_t>(q, k, mask, topk, scale, out_l, out_i); });
  return {out_l, out_i};
}

// --- topk_aggregate -----------------------------------------------------------------------------------------------

// Softmax weights of one candidate row into w (0 for dropped candidates); false when nothing is kept.
template <typename scalar_t, typename acc_t>
bool row_weights(const scalar_t* lg, const int64_t* ix, int64_t K, Normalize norm, int64_t kth, acc_t* w,
                 std::vector<acc_t>& scratch) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t mx = neg_inf;
  scratch.clear();
  for (int64_t j = 0; j < K; ++j) {
    const acc_t l = static_cast<acc_t>(lg[j]);
    const bool valid = ix[j] >= 0 && l > neg_inf;  // NaN fails the comparison: invalid
    w[j] = valid ? l : neg_inf;
    if (valid) {
      mx = std::max(mx, l);
      scratch.push_back(l);
    }
  }
  if (scratch.empty()) {
    std::fill(w, w + K, acc_t(0));
    return false;
  }
  acc_t cut = neg_inf;
  const int64_t kk = std::min(kth, K);
  if (norm == Normalize::Threshold && static_cast<int64_t>(scratch.size()) >= kk) {
    std::nth_element(scratch.begin(), scratch.begin() + (kk - 1), scratch.end(), std::greater<acc_t>());
    cut = scratch[kk - 1];  // keep every logit >= the kk-th largest: ties survive
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < K; ++j) {
    const acc_t l = w[j];
    w[j] = (l > neg_inf && l >= cut) ? std::exp(l - mx) : acc_t(0);
    sum += w[j];
  }
  for (int64_t j = 0; j < K; ++j) w[j] /= sum;
  return true;
}

template <typename scalar_t>
void aggregate_forward_impl(const at::Tensor& logits, const at::Tensor& index, const at::Tensor& values,
                            Normalize norm, int64_t kth, at::Tensor& out) {
  using acc_t = acc_of<scalar_t>;
  const int64_t B = logits.size(0), M = logits.size(1), K = logits.size(2), L = values.size(1), Cv = values.size(2);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const scalar_t* vp = values.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * M, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K * Cv)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(K), scratch, acc(Cv);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / M;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (row_weights(lp + row * K, ip + row * K, K, norm, kth, w.data(), scratch)) {
        for (int64_t j = 0; j < K; ++j) {
          if (w[j] == acc_t(0)) continue;
          const scalar_t* v = vp + (b * L + ip[row * K + j]) * Cv;
          for (int64_t c = 0; c < Cv; ++c) acc[c] += w[j] * static_cast<acc_t>(v[c]);
        }
      }
      for (int64_t c = 0; c < Cv; ++c) op[row * Cv + c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

at::Tensor topk_aggregate_cpu(const at::Tensor& logits_in, const at::Tensor& index_in, const at::Tensor& values_in,
                              c10::string_view normalize, int64_t k) {
  check_aggregate_inputs(logits_in, index_in, values_in);
  const Normalize norm = parse_normalize(normalize);
  TORCH_CHECK_VALUE(norm == Normalize::Softmax || k >= 1, "topk_aggregate: k must be >= 1 with 'threshold', got ", k);
  const at::Tensor logits = logits_in.detach().contiguous(), index = index_in.contiguous();
  const at::Tensor values = values_in.detach().contiguous();
  at::Tensor out = new_output({logits.size(0), logits.size(1), values.size(2)}, values.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_aggregate_cpu",
                                  [&] { aggregate_forward_impl<scalar_t>(logits, index, values, norm, k, out); });
  return out;
}

template <typename scalar_t>
void aggregate_backward_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& index,
                             const at::Tensor& values, Normalize norm, int64_t kth, at::Tensor* glogits,
                             at::Tensor* gvalues_acc) {
  using acc_t = acc_of<scalar_t>;
  const int64_t B = logits.size(0), M = logits.size(1), K = logits.size(2), L = values.size(1), Cv = values.size(2);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const scalar_t* vp = values.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  if (glogits) {
    // d logit_j = w_j (g . v_j - sum_i w_i g . v_i): per row, no races.
    scalar_t* dl = glogits->data_ptr<scalar_t>();
    at::parallel_for(0, B * M, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K * Cv)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> w(K), scratch, gdot(K);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / M;
        const bool any = row_weights(lp + row * K, ip + row * K, K, norm, kth, w.data(), scratch);
        acc_t total = 0;
        for (int64_t j = 0; j < K; ++j) {
          gdot[j] = 0;
          if (!any || w[j] == acc_t(0)) continue;
          const scalar_t* v = vp + (b * L + ip[row * K + j]) * Cv;
          const scalar_t* g = gp + row * Cv;
          acc_t d = 0;
          for (int64_t c = 0; c < Cv; ++c) d += static_cast<acc_t>(g[c]) * static_cast<acc_t>(v[c]);
          gdot[j] = d;
          total += w[j] * d;
        }
        for (int64_t j = 0; j < K; ++j) dl[row * K + j] = static_cast<scalar_t>(w[j] * (gdot[j] - total));
      }
    });
  }
  if (gvalues_acc) {
    // d values is a scatter: tasks own (batch, block of channels), so no two write the same element.
    acc_t* dv = gvalues_acc->data_ptr<acc_t>();
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(Cv, at::get_num_threads()));
    at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> w(K), scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nchunks, ch = task % nchunks;
        const int64_t c0 = Cv * ch / nchunks, c1 = Cv * (ch + 1) / nchunks;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = b * M + m;
          if (!row_weights(lp + row * K, ip + row * K, K, norm, kth, w.data(), scratch)) continue;
          const scalar_t* g = gp + row * Cv;
          for (int64_t j = 0; j < K; ++j) {
            if (w[j] == acc_t(0)) continue;
            acc_t* d = dv + (b * L + ip[row * K + j]) * Cv;
            for (int64_t c = c0; c < c1; ++c) d[c] += w[j] * static_cast<acc_t>(g[c]);
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> topk_aggregate_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                                               const at::Tensor& index_in, const at::Tensor& values_in,
                                                               c10::string_view normalize, int64_t k,
                                                               bool need_logits, bool need_values) {
  check_aggregate_inputs(logits_in, index_in, values_in);
  const Normalize norm = parse_normalize(normalize);
  const at::Tensor logits = logits_in.detach().contiguous(), index = index_in.contiguous();
  const at::Tensor values = values_in.detach().contiguous();
  const at::Tensor grad = grad_in.detach().to(values.scalar_type()).contiguous();
  check_aggregate_grad(grad, logits, values);
  at::Tensor gl = need_logits ? new_output(logits.sizes(), logits.options()) : logits.new_empty({0});
  at::Tensor gv_acc;
  if (need_values) gv_acc = at::zeros(values.sizes(), values.options().dtype(acc_type(values.scalar_type())));
  if (logits.numel() > 0 && values.numel() > 0 && (need_logits || need_values)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_aggregate_backward_cpu", [&] {
      aggregate_backward_impl<scalar_t>(grad, logits, index, values, norm, k, need_logits ? &gl : nullptr,
                                        need_values ? &gv_acc : nullptr);
    });
  } else if (need_logits) {
    gl.zero_();
  }
  at::Tensor gv = need_values ? gv_acc.to(values.scalar_type()) : values.new_empty({0});
  return {gl, gv};
}

// --- topk_attention -----------------------------------------------------------------------------------------------

constexpr int64_t kAttentionQueryTile = 64;
constexpr int64_t kTileElements = int64_t(1) << 20;  // cap on a per-thread (query tile x L) buffer: 4 MB in fp32

// Rows per (query tile x all keys) score buffer: kAttentionQueryTile, fewer for very long key sequences.
inline int64_t attention_rows(int64_t M, int64_t BH, int64_t L) {
  const int64_t target = std::clamp<int64_t>(kTileElements / std::max<int64_t>(L, 1), 8, kAttentionQueryTile);
  return query_tile(M, BH, target);
}

// Per task (batch·head, query tile): S = q_t K^T for all L keys by one matmul into a per-thread buffer; per query the
// dense keys' max, the top-k of the sparse keys (selected on the row, saved as `index`), one max-subtracted
// softmax over both, the sparse values gathered; the dense part of the output is P_dense V_dense by matmul.
template <typename scalar_t>
void attention_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kk, double scale_d,
                            int64_t dense, at::Tensor& out, at::Tensor& lse, at::Tensor& index) {
  using acc_t = acc_of<scalar_t>;
  const auto acc = acc_type(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), L = k.size(2), Dv = v.size(3);
  const int64_t BH = B * H, n_sparse = L - dense;
  const at::Tensor qf = q.detach().to(acc).contiguous().view({BH, M, D});
  const at::Tensor kf = k.detach().to(acc).contiguous().view({BH, L, D});
  const at::Tensor vf = v.detach().to(acc).contiguous().view({BH, L, Dv});
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t QT = attention_rows(M, BH, L), mtiles = ceil_div(M, QT);
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lsep = lse.data_ptr<acc_t>();
  int64_t* ixp = kk > 0 ? index.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, BH * mtiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor sbuf = at::empty({QT * L}, qf.options()), obuf = at::empty({QT * Dv}, qf.options());
    std::vector<acc_t> vals(n_sparse + 8), tmp(n_sparse + 8), row_max(QT), row_sum(QT);
    std::vector<int32_t> ci(n_sparse + 8);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / mtiles, m0 = (task % mtiles) * QT, mt = std::min(QT, M - m0);
      const at::Tensor kb = kf[bh], vb = vf[bh];
      at::Tensor s = sbuf.narrow(0, 0, mt * L).view({mt, L}), o = obuf.narrow(0, 0, mt * Dv).view({mt, Dv});
      at::mm_out(s, qf[bh].narrow(0, m0, mt), kb.t());
      acc_t* sp = s.data_ptr<acc_t>();
      acc_t* opt = o.data_ptr<acc_t>();
      const acc_t* vp = vb.const_data_ptr<acc_t>();
      std::fill(opt, opt + mt * Dv, acc_t(0));
      for (int64_t r = 0; r < mt; ++r) {
        acc_t* row = sp + r * L;
        acc_t m = cpu::scaled_max(row, dense, scale);
        int64_t c = 0;
        if (kk > 0) {
          c = cpu::select_row(row + dense, n_sparse, scale, kk, vals.data(), ci.data(), tmp.data());
          for (int64_t j = 0; j < c; ++j) m = std::max(m, vals[j]);
        }
        if (m == cpu::kNegInf<acc_t>) m = 0;  // nothing finite: every weight is exp(-inf) = 0
        acc_t l = cpu::exp_shift_sum(row, dense, scale, m);  // dense probabilities, in place for the matmul below
        if (kk > 0) {
          l += cpu::exp_shift_sum(vals.data(), c, acc_t(1), m);
          cpu::gather_rows(opt + r * Dv, vp, Dv, dense, ci.data(), vals.data(), c);
          int64_t* ix = ixp + (bh * M + m0 + r) * kk;
          for (int64_t j = 0; j < kk; ++j) ix[j] = j < c ? dense + ci[j] : -1;
        }
        row_max[r] = m;
        row_sum[r] = l;
      }
      if (dense > 0) o.addmm_(s.narrow(1, 0, dense), vb.narrow(0, 0, dense));
      for (int64_t r = 0; r < mt; ++r) {
        const acc_t l = row_sum[r];
        const acc_t inv = l > acc_t(0) ? acc_t(1) / l : acc_t(0);  // a query with nothing kept outputs 0
        scalar_t* orow = op + (bh * M + m0 + r) * Dv;
        for (int64_t c = 0; c < Dv; ++c) orow[c] = static_cast<scalar_t>(opt[r * Dv + c] * inv);
        lsep[bh * M + m0 + r] = l > acc_t(0) ? row_max[r] + std::log(l) : cpu::kNegInf<acc_t>;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, int64_t topk, double scale,
                                                                  int64_t dense_keys) {
  check_attention_inputs(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), L = k.size(2), Dv = v.size(3);
  check_attention_counts(L, topk, dense_keys, scale);
  // The selection keeps row-local key numbers in int32, the backward query numbers.
  TORCH_CHECK_VALUE(L < std::numeric_limits<int32_t>::max() && M < std::numeric_limits<int32_t>::max(),
                    "topk_attention: the cpu backend takes fewer than 2^31 - 1 queries and keys per sequence, got M = ",
                    M, ", L = ", L);
  const auto [dense, kk] = split_keys(L, topk, dense_keys);
  at::Tensor out = new_output({B, H, M, Dv}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = new_output({B, H, M}, q.options().dtype(acc_type(q.scalar_type())));
  at::Tensor index = new_output({B, H, M, kk}, q.options().dtype(at::kLong));
  if (out.numel() == 0 || L == 0) return {out, lse, index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "topk_attention_cpu", [&] {
    attention_forward_impl<scalar_t>(q, k, v, kk, scale, dense, out, lse, index);
  });
  return {out, lse, index};
}

// Rows per backward query tile: up to 512, so that a head of a few hundred queries is one tile (dK, dV then come from
// one product each instead of a sum over tiles; measured 5% faster than 128-row tiles at M = 405, L2 = 1 MB).
constexpr int64_t kBackwardQueryTile = 512;

// Tasks own one (batch, head), so its dk, dv are private. Per query tile the dense part is five matmuls (S and dP
// recomputed, then dV, dQ, dK) around an elementwise pass; the sparse part regroups the saved indices by key and
// walks each key's queries.
template <typename acc_t>
void attention_backward_impl(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& o, const at::Tensor& lse, const at::Tensor& index, double scale_d,
                             int64_t dense, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  // All tensors here are contiguous (BH, rows, cols) in acc_t.
  const int64_t BH = q.size(0), M = q.size(1), D = q.size(2), L = k.size(1), Dv = v.size(2), kk = index.size(2);
  const int64_t n_sparse = L - dense;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t target = std::clamp<int64_t>(kTileElements / std::max<int64_t>(dense, 1), 8, kBackwardQueryTile);
  const int64_t QT = ceil_div(M, ceil_div(M, target));  // equal tiles
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    at::Tensor pbuf = at::empty({QT * dense}, q.options()), dpbuf = at::empty({QT * dense}, q.options());
    std::vector<acc_t> drow(M), work(2 * std::max(M, cpu::kSparseBlock));
    std::vector<int64_t> start(kk > 0 ? n_sparse + 1 : 0);
    std::vector<int32_t> rows(M * kk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const at::Tensor qb = q[bh], kb = k[bh], vb = v[bh], gb = g[bh];
      at::Tensor dqb = dq[bh], dkb = dk[bh], dvb = dv[bh];
      const acc_t *qp = qb.const_data_ptr<acc_t>(), *kp = kb.const_data_ptr<acc_t>(), *vp = vb.const_data_ptr<acc_t>();
      const acc_t *gp = gb.const_data_ptr<acc_t>(), *opp = o[bh].const_data_ptr<acc_t>();
      const acc_t* lp = lse[bh].const_data_ptr<acc_t>();
      acc_t *dqp = dqb.data_ptr<acc_t>(), *dkp = dkb.data_ptr<acc_t>(), *dvp = dvb.data_ptr<acc_t>();
      for (int64_t i = 0; i < M; ++i) drow[i] = cpu::dot(gp + i * Dv, opp + i * Dv, Dv);  // dO_i . O_i
      for (int64_t m0 = 0; m0 < M && dense > 0; m0 += QT) {
        const int64_t mt = std::min(QT, M - m0);
        const at::Tensor qt = qb.narrow(0, m0, mt), gt = gb.narrow(0, m0, mt);
        const at::Tensor kd = kb.narrow(0, 0, dense), vd = vb.narrow(0, 0, dense);
        at::Tensor p = pbuf.narrow(0, 0, mt * dense).view({mt, dense});
        at::Tensor dp = dpbuf.narrow(0, 0, mt * dense).view({mt, dense});
        at::mm_out(p, qt, kd.t());
        at::mm_out(dp, gt, vd.t());
        acc_t *pp = p.data_ptr<acc_t>(), *dpp = dp.data_ptr<acc_t>();
        for (int64_t r = 0; r < mt; ++r) {
          const acc_t l = lp[m0 + r];
          if (l == cpu::kNegInf<acc_t>) {  // nothing was kept: no gradient
            std::fill(pp + r * dense, pp + (r + 1) * dense, acc_t(0));
            std::fill(dpp + r * dense, dpp + (r + 1) * dense, acc_t(0));
          } else {
            cpu::dense_grad_row(pp + r * dense, dpp + r * dense, dense, scale, l, drow[m0 + r]);
          }
        }
        // The first tile writes dk, dv (no zero-filled outputs: filling them cost more than the products here).
        at::Tensor dvd = dvb.narrow(0, 0, dense), dkd = dkb.narrow(0, 0, dense), dqt = dqb.narrow(0, m0, mt);
        if (m0 == 0) {
          at::mm_out(dvd, p.t(), gt);
          at::mm_out(dkd, dp.t(), qt);
        } else {
          dvd.addmm_(p.t(), gt);
          dkd.addmm_(dp.t(), qt);
        }
        at::mm_out(dqt, dp, kd);
      }
      if (dense == 0) std::fill(dqp, dqp + M * D, acc_t(0));
      if (kk == 0) continue;  // then dense == L
      // Group the kept (query, key) pairs by key: a counting sort of the saved indices.
      const int64_t* ip = index[bh].const_data_ptr<int64_t>();
      std::fill(start.begin(), start.end(), 0);
      for (int64_t i = 0; i < M; ++i) {
        if (lp[i] == cpu::kNegInf<acc_t>) continue;
        for (int64_t j = 0; j < kk; ++j) {
          const int64_t key = ip[i * kk + j];
          if (key < 0) continue;  // an empty slot
          TORCH_CHECK_VALUE(key >= dense && key < L, "topk_attention_backward: index holds key ", key,
                            " outside the sparse keys [", dense, ", ", L, ")");
          ++start[key - dense + 1];
        }
      }
      for (int64_t key = 0; key < n_sparse; ++key) start[key + 1] += start[key];
      for (int64_t i = 0; i < M; ++i) {  // queries in increasing order within each key
        if (lp[i] == cpu::kNegInf<acc_t>) continue;
        for (int64_t j = 0; j < kk; ++j) {
          const int64_t key = ip[i * kk + j];
          if (key >= 0) rows[start[key - dense]++] = static_cast<int32_t>(i);
        }
      }
      int64_t first = 0;  // start[key] now holds the end of key's run
      for (int64_t key = 0; key < n_sparse; ++key) {
        const int64_t last = start[key], n = last - first, kr = dense + key;
        // The key's rows are zeroed here rather than in a pass of their own: they are in cache when accumulated.
        std::fill(dkp + kr * D, dkp + (kr + 1) * D, acc_t(0));
        std::fill(dvp + kr * Dv, dvp + (kr + 1) * Dv, acc_t(0));
        if (n > 0) {
          // A key is kept by at most M queries, unless a directly passed index repeats it within a row.
          if (static_cast<int64_t>(work.size()) < 2 * n) work.resize(2 * n);
          cpu::sparse_grad_key(kp + kr * D, vp + kr * Dv, dkp + kr * D, dvp + kr * Dv, rows.data() + first, n, qp,
                               gp, dqp, lp, drow.data(), D, Dv, scale, work.data());
        }
        first = last;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& index, double scale, int64_t dense_keys) {
  check_attention_backward(grad_out, q, k, v, out, lse, index);
  check_scale("topk_attention_backward", scale);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), L = k.size(2), Dv = v.size(3);
  const int64_t BH = B * H, kk = index.size(-1);
  TORCH_CHECK_VALUE(M < std::numeric_limits<int32_t>::max(), "topk_attention_backward: the cpu backend takes fewer "
                    "than 2^31 - 1 queries per sequence, got M = ", M);  // key-major lists hold query numbers in int32
  // The forward kept every key densely exactly when it saved no sparse indices.
  const int64_t dense = kk == 0 ? L : dense_keys;
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor qf = q.detach().to(acc).contiguous().view({BH, M, D});
  const at::Tensor kf = k.detach().to(acc).contiguous().view({BH, L, D});
  const at::Tensor vf = v.detach().to(acc).contiguous().view({BH, L, Dv});
  const at::Tensor gf = grad_out.detach().to(acc).contiguous().view({BH, M, Dv});
  const at::Tensor of = out.detach().to(acc).contiguous().view({BH, M, Dv});
  const at::Tensor lf = lse.detach().to(acc).contiguous().view({BH, M}), ixf = index.contiguous().view({BH, M, kk});
  // Every element is written by the kernel (poisoned in tests to prove it).
  at::Tensor dq = new_output({BH, M, D}, qf.options()), dk = new_output({BH, L, D}, qf.options());
  at::Tensor dv = new_output({BH, L, Dv}, qf.options());
  if (M > 0 && L > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "topk_attention_backward_cpu", [&] {
      attention_backward_impl<scalar_t>(gf, qf, kf, vf, of, lf, ixf, scale, dense, dq, dk, dv);
    });
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  return {dq.view(q.sizes()).to(q.scalar_type()), dk.view(k.sizes()).to(k.scalar_type()),
          dv.view(v.sizes()).to(v.scalar_type())};
}


}  // namespace
}  // namespace topk
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def("global_topk(Tensor q, Tensor k, int topk, float scale, Tensor? key_mask) -> (Tensor, Tensor)");
  m.def("topk_aggregate(Tensor logits, Tensor index, Tensor values, str normalize, int k) -> Tensor");
  m.def(
      "topk_aggregate_backward(Tensor grad_out, Tensor logits, Tensor index, Tensor values, str normalize, int k, "
      "bool need_logits_grad, bool need_values_grad) -> (Tensor, Tensor)");
  m.def("topk_attention(Tensor q, Tensor k, Tensor v, int topk, float scale, int dense_keys) -> (Tensor, Tensor, Tensor)");
  m.def(
      "topk_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor index, "
      "float scale, int dense_keys) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("global_topk", &vosops::topk::global_topk_cpu);
  m.impl("topk_aggregate", &vosops::topk::topk_aggregate_cpu);
  m.impl("topk_aggregate_backward", &vosops::topk::topk_aggregate_backward_cpu);
  m.impl("topk_attention", &vosops::topk::topk_attention_cpu);
  m.impl("topk_attention_backward", &vosops::topk::topk_attention_backward_cpu);
}
