// Top-k softmax aggregation: op schemas and the CPU kernels (global_topk, topk_aggregate, topk_attention).
//
// The FLOPs of global_topk and topk_attention are query-tile x key-tile products: they go to ATen's matmul (MKL)
// on per-thread buffers; what is fused around them is the running top-k per query, the online softmax and the
// gather of the winners' values. No (M x L) tensor is ever allocated, in forward or backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/native.h"
#include "topk/topk.h"
#include "topk/topk_math.h"

namespace vosops {
namespace topk {
namespace {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kQueryTile = 128;
constexpr int64_t kKeyTile = 512;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dot product with eight independent partial sums: breaks the serial FP dependency chain so the compiler can
// vectorise it (a plain `s += a[c] * b[c]` loop stays scalar without -ffast-math).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int u = 0; u < 8; ++u) p[u] += a[c + u] * b[c + u];
  }
  acc_t s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; c < n; ++c) s += a[c] * b[c];
  return s;
}

// --- per-query candidate selection (CPU) ------------------------------------------------------------------------

template <typename acc_t>
struct Cand {
  acc_t v;
  int64_t i;
};

template <typename acc_t>
inline bool cand_before(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  return ranks_before(a.v, a.i, b.v, b.i);
}

// The best k candidates of one query seen so far, over a buffer of 2k + key-tile + 1 slots (slots(k, tile)). A tile's
// scores above the current threshold are appended in key order; when more than 2k are held they are pruned back
// to k. Tiles arrive in increasing key index, so a later candidate equal to the k-th logit loses the tie and
// `v > thr` is the whole admission test.
template <typename acc_t>
struct TopKBuffer {
  Cand<acc_t>* c;
  acc_t* scratch;  // k + 2k + tile floats shared by the rows of a thread (prune is immediate)
  int64_t k, n;
  acc_t thr;
  bool speculative;

  static int64_t slots(int64_t k, int64_t tile) { return 2 * k + tile + 1; }  // +1: the branch-free append

  void reset(Cand<acc_t>* storage, acc_t* scratch_, int64_t k_) {
    c = storage;
    scratch = scratch_;
    k = k_;
    n = 0;
    thr = -std::numeric_limits<acc_t>::infinity();
    speculative = false;
  }
  // Before the first tile: guess a threshold that about 2k + 16 of the row's `total` keys exceed, from a strided
  // sample of the tile's scores, so most keys are rejected by one compare and the prune sees few candidates.
  // The guess is exact-safe whenever at least k keys end up above it (then every true top-k key was admitted);
  // a row that ends with fewer is redone without a guess (needs_fallback).
  void speculate(const acc_t* row, int64_t lt, acc_t scale, int64_t total, const bool* mask) {
    const double f = static_cast<double>(2 * k + 16) / static_cast<double>(total);
    if (f >= 0.5 || lt < 64) return;
    const int64_t st = std::max<int64_t>(1, lt / 128);
    int64_t ns = 0;
    for (int64_t j = 0; j < lt; j += st) {
      if (mask != nullptr && !mask[j]) continue;
      const acc_t v = scale * row[j];
      scratch[ns++] = v == v ? v : -std::numeric_limits<acc_t>::infinity();  // NaN would break the ordering
    }
    const int64_t rs = static_cast<int64_t>(std::ceil(f * static_cast<double>(ns))) + 1;
    if (ns < 32 || rs > ns) return;
    std::nth_element(scratch, scratch + (rs - 1), scratch + ns, std::greater<acc_t>());
    if (scratch[rs - 1] > -std::numeric_limits<acc_t>::infinity()) {
      thr = scratch[rs - 1];
      speculative = true;
    }
  }
  bool needs_fallback() const { return speculative && n < k; }
  // Branch-free append: every score is written, the count advances only for admitted ones (a data-dependent
  // branch here mispredicts at the 10-20% admission rates of JointFormer's top-k).
  void scan(const acc_t* row, int64_t lt, acc_t scale, int64_t base, const bool* mask) {
    const acc_t t = thr;
    int64_t m = n;
    if (mask == nullptr) {
      for (int64_t j = 0; j < lt; ++j) {
        const acc_t v = scale * row[j];
        c[m] = Cand<acc_t>{v, base + j};
        m += v > t;  // NaN and -inf never pass
      }
    } else {
      for (int64_t j = 0; j < lt; ++j) {
        const acc_t v = scale * row[j];
        c[m] = Cand<acc_t>{v, base + j};
        m += (v > t) & mask[j];
      }
    }
    n = m;
    if (n > 2 * k) prune();
  }
  // Keep the best k: the k-th largest logit t by a float nth_element, then a stable compaction that keeps every
  // logit > t and the lowest-index ones equal to t (the buffer stays in key order).
  void prune() {
    for (int64_t i = 0; i < n; ++i) scratch[i] = c[i].v;
    std::nth_element(scratch, scratch + (k - 1), scratch + n, std::greater<acc_t>());
    const acc_t t = scratch[k - 1];
    int64_t above = 0;
    for (int64_t i = 0; i < n; ++i) above += c[i].v > t;
    int64_t ties = k - above, m = 0;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = c[i].v;
      if (v > t || (v == t && ties-- > 0)) c[m++] = c[i];
    }
    n = k;
    thr = t;
  }
  void finish(bool sorted) {  // the best min(k, n), sorted best-first when asked
    if (n > k) prune();
    if (sorted) std::sort(c, c + n, [](const Cand<acc_t>& a, const Cand<acc_t>& b) { return cand_before(a, b); });
  }
};

// Redo one row exactly (no guessed threshold) from its freshly computed scores `row` (total keys from `base`).
template <typename acc_t>
void exact_row(TopKBuffer<acc_t>& list, const acc_t* row, int64_t total, int64_t tile, acc_t scale, int64_t base,
               const bool* mask) {
  list.reset(list.c, list.scratch, list.k);
  for (int64_t l0 = 0; l0 < total; l0 += tile) {
    list.scan(row + l0, std::min(tile, total - l0), scale, base + l0, mask ? mask + l0 : nullptr);
  }
}

// --- global_topk --------------------------------------------------------------------------------------------------

template <typename scalar_t>
void global_topk_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask, int64_t topk, double scale_d,
                      at::Tensor& out_l, at::Tensor& out_i) {
  using acc_t = acc_of<scalar_t>;
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor qf = q.detach().to(acc).contiguous(), kf = k.detach().to(acc).contiguous();
  const int64_t B = q.size(0), M = q.size(1), L = k.size(1);
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t mtiles = ceil_div(M, kQueryTile), LT = std::min(L, kKeyTile);
  scalar_t* lp = out_l.data_ptr<scalar_t>();
  int64_t* ip = out_i.data_ptr<int64_t>();
  at::parallel_for(0, B * mtiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({kQueryTile * LT}, qf.options());  // this thread's score tile
    const int64_t slots = TopKBuffer<acc_t>::slots(topk, LT);
    std::vector<Cand<acc_t>> store(kQueryTile * slots);
    std::vector<acc_t> scratch(slots);
    std::vector<TopKBuffer<acc_t>> lists(kQueryTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / mtiles, m0 = (task % mtiles) * kQueryTile, mt = std::min(kQueryTile, M - m0);
      for (int64_t r = 0; r < mt; ++r) lists[r].reset(store.data() + r * slots, scratch.data(), topk);
      const at::Tensor qt = qf[b].narrow(0, m0, mt), kb = kf[b];
      for (int64_t l0 = 0; l0 < L; l0 += LT) {
        const int64_t lt = std::min(LT, L - l0);
        at::Tensor s = buf.narrow(0, 0, mt * lt).view({mt, lt});
        at::mm_out(s, qt, kb.narrow(0, l0, lt).t());
        const acc_t* sp = s.const_data_ptr<acc_t>();
        const bool* mrow = mp ? mp + b * L + l0 : nullptr;
        for (int64_t r = 0; r < mt; ++r) {
          if (l0 == 0) lists[r].speculate(sp + r * lt, lt, scale, L, mrow);
          lists[r].scan(sp + r * lt, lt, scale, l0, mrow);
        }
      }
      for (int64_t r = 0; r < mt; ++r) {
        TopKBuffer<acc_t>& list = lists[r];
        if (list.needs_fallback()) {
          const at::Tensor row = at::mv(kb, qt[r]);
          exact_row(list, row.const_data_ptr<acc_t>(), L, LT, scale, int64_t(0), mp ? mp + b * L : nullptr);
        }
        list.finish(true);
        const int64_t o = (b * M + m0 + r) * topk;
        for (int64_t j = 0; j < topk; ++j) {
          const bool have = j < list.n;
          lp[o + j] = static_cast<scalar_t>(have ? list.c[j].v : neg_inf);
          ip[o + j] = have ? list.c[j].i : -1;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> global_topk_cpu(const at::Tensor& q, const at::Tensor& k, int64_t topk,
                                                   double scale, const std::optional<at::Tensor>& key_mask) {
  const at::Tensor mask = check_global_topk_args(q, k, topk, key_mask);
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

template <typename scalar_t>
void attention_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kk, double scale_d,
                            int64_t dense, at::Tensor& out, at::Tensor& lse, at::Tensor& index) {
  using acc_t = acc_of<scalar_t>;
  const auto acc = acc_type(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), L = k.size(2), Dv = v.size(3);
  const int64_t BH = B * H;
  const at::Tensor qf = q.detach().to(acc).contiguous().view({BH, M, D});
  const at::Tensor kf = k.detach().to(acc).contiguous().view({BH, L, D});
  const at::Tensor vf = v.detach().to(acc).contiguous().view({BH, L, Dv});
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t mtiles = ceil_div(M, kQueryTile), LT = std::min(L, kKeyTile);
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lsep = lse.data_ptr<acc_t>();
  int64_t* ixp = kk > 0 ? index.data_ptr<int64_t>() : nullptr;
  // Elementwise tile work (scale, max, exp, sums) goes through ATen ops: they are vectorised (AVX2 exp) inside
  // libtorch, which this extension's portable build flags are not.
  at::parallel_for(0, BH * mtiles, 1, [&](int64_t begin, int64_t end) {
    const auto opts = qf.options();
    at::Tensor sbuf = at::empty({kQueryTile * LT}, opts);
    const int64_t slots = TopKBuffer<acc_t>::slots(kk, LT);
    std::vector<Cand<acc_t>> store(kk > 0 ? kQueryTile * slots : 0);
    std::vector<acc_t> scratch(slots);
    std::vector<TopKBuffer<acc_t>> lists(kQueryTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / mtiles, m0 = (task % mtiles) * kQueryTile, mt = std::min(kQueryTile, M - m0);
      const at::Tensor qt = qf[bh].narrow(0, m0, mt), kb = kf[bh], vb = vf[bh];
      const acc_t* vp = vb.const_data_ptr<acc_t>();
      at::Tensor acc_tile = at::zeros({mt, Dv}, opts);
      at::Tensor mrow = at::full({mt}, neg_inf, opts);  // running max
      at::Tensor lrow = at::zeros({mt}, opts);          // running sum of exp(logit - max)
      // Dense keys: flash-style online softmax, the P tile times the V tile through matmul.
      for (int64_t l0 = 0; l0 < dense; l0 += LT) {
        const int64_t lt = std::min(LT, dense - l0);
        at::Tensor s = sbuf.narrow(0, 0, mt * lt).view({mt, lt});
        at::mm_out(s, qt, kb.narrow(0, l0, lt).t());
        s.mul_(scale);
        const at::Tensor mnew = at::maximum(mrow, s.amax(1));
        const at::Tensor msafe = mnew.masked_fill(mnew == neg_inf, 0);  // nothing finite yet: add nothing
        const at::Tensor alpha = (mrow - msafe).exp_();
        s.sub_(msafe.unsqueeze(1)).exp_();
        lrow.mul_(alpha).add_(s.sum(1));
        acc_tile.mul_(alpha.unsqueeze(1)).addmm_(s, vb.narrow(0, l0, lt));
        mrow = mnew;
      }
      // Sparse keys: a running top-k per query over key tiles, then folded into the same softmax.
      if (kk > 0) {
        for (int64_t r = 0; r < mt; ++r) lists[r].reset(store.data() + r * slots, scratch.data(), kk);
        for (int64_t l0 = dense; l0 < L; l0 += LT) {
          const int64_t lt = std::min(LT, L - l0);
          at::Tensor s = sbuf.narrow(0, 0, mt * lt).view({mt, lt});
          at::mm_out(s, qt, kb.narrow(0, l0, lt).t());
          const acc_t* sp = s.const_data_ptr<acc_t>();
          for (int64_t r = 0; r < mt; ++r) {
            if (l0 == dense) lists[r].speculate(sp + r * lt, lt, scale, L - dense, nullptr);
            lists[r].scan(sp + r * lt, lt, scale, l0, nullptr);
          }
        }
        at::Tensor top = at::empty({mt, kk}, opts);
        acc_t* tp = top.data_ptr<acc_t>();
        for (int64_t r = 0; r < mt; ++r) {
          TopKBuffer<acc_t>& list = lists[r];
          if (list.needs_fallback()) {
            const at::Tensor row = at::mv(kb.narrow(0, dense, L - dense), qt[r]);
            exact_row(list, row.const_data_ptr<acc_t>(), L - dense, LT, scale, dense, static_cast<const bool*>(nullptr));
          }
          list.finish(false);  // the kept set is what matters here, not its order
          int64_t* ix = ixp + (bh * M + m0 + r) * kk;
          for (int64_t j = 0; j < kk; ++j) {
            tp[r * kk + j] = j < list.n ? list.c[j].v : neg_inf;
            ix[j] = j < list.n ? list.c[j].i : -1;
          }
        }
        const at::Tensor mnew = at::maximum(mrow, top.amax(1));
        const at::Tensor msafe = mnew.masked_fill(mnew == neg_inf, 0);
        const at::Tensor alpha = (mrow - msafe).exp_();
        top.sub_(msafe.unsqueeze(1)).exp_();
        lrow.mul_(alpha).add_(top.sum(1));
        acc_tile.mul_(alpha.unsqueeze(1));
        acc_t* ap = acc_tile.data_ptr<acc_t>();
        for (int64_t r = 0; r < mt; ++r) {  // gather the winners' values
          acc_t* a = ap + r * Dv;
          for (int64_t j = 0; j < lists[r].n; ++j) {
            const acc_t p = tp[r * kk + j];
            const acc_t* vr = vp + lists[r].c[j].i * Dv;
            for (int64_t c = 0; c < Dv; ++c) a[c] += p * vr[c];
          }
        }
        mrow = mnew;
      }
      const acc_t *ap = acc_tile.const_data_ptr<acc_t>(), *mp = mrow.const_data_ptr<acc_t>();
      const acc_t* lsp = lrow.const_data_ptr<acc_t>();
      for (int64_t r = 0; r < mt; ++r) {
        const acc_t l = lsp[r];
        const acc_t inv = l > acc_t(0) ? acc_t(1) / l : acc_t(0);  // a query with nothing kept outputs 0
        scalar_t* o = op + (bh * M + m0 + r) * Dv;
        for (int64_t c = 0; c < Dv; ++c) o[c] = static_cast<scalar_t>(ap[r * Dv + c] * inv);
        lsep[bh * M + m0 + r] = l > acc_t(0) ? mp[r] + std::log(l) : neg_inf;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, int64_t topk, double scale,
                                                                  int64_t dense_keys) {
  check_attention_inputs(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), L = k.size(2), Dv = v.size(3);
  check_attention_counts(L, topk, dense_keys);
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

template <typename acc_t>
void attention_backward_impl(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& o, const at::Tensor& lse, const at::Tensor& index, double scale_d,
                             int64_t dense, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  // All tensors here are contiguous (BH, rows, cols) in acc_t. Tasks own one (batch, head): its dk, dv are private.
  const int64_t BH = q.size(0), M = q.size(1), D = q.size(2), L = k.size(1), Dv = v.size(2), kk = index.size(2);
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t LT = std::min(L, kKeyTile);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    at::Tensor pbuf = at::empty({kQueryTile * LT}, q.options());
    at::Tensor dpbuf = at::empty({kQueryTile * LT}, q.options());
    std::vector<acc_t> drow(kQueryTile);
    for (int64_t bh = begin; bh < end; ++bh) {
      const at::Tensor qb = q[bh], kb = k[bh], vb = v[bh], gb = g[bh];
      at::Tensor dqb = dq[bh], dkb = dk[bh], dvb = dv[bh];
      const acc_t *qp = qb.const_data_ptr<acc_t>(), *kp = kb.const_data_ptr<acc_t>(), *vp = vb.const_data_ptr<acc_t>();
      const acc_t *gp = gb.const_data_ptr<acc_t>(), *opp = o[bh].const_data_ptr<acc_t>();
      const acc_t* lp = lse[bh].const_data_ptr<acc_t>();
      const int64_t* ip = kk > 0 ? index[bh].const_data_ptr<int64_t>() : nullptr;
      acc_t *dqp = dqb.data_ptr<acc_t>(), *dkp = dkb.data_ptr<acc_t>(), *dvp = dvb.data_ptr<acc_t>();
      for (int64_t m0 = 0; m0 < M; m0 += kQueryTile) {
        const int64_t mt = std::min(kQueryTile, M - m0);
        const at::Tensor qt = qb.narrow(0, m0, mt), gt = gb.narrow(0, m0, mt);
        at::Tensor dqt = dqb.narrow(0, m0, mt);
        for (int64_t r = 0; r < mt; ++r) {  // D_i = dO_i . O_i = sum_j P_ij dP_ij
          drow[r] = dot(gp + (m0 + r) * Dv, opp + (m0 + r) * Dv, Dv);
        }
        const at::Tensor d_t = at::from_blob(drow.data(), {mt}, q.options()).clone();
        // exp(S - lse) with lse = -inf (a query with nothing kept) must be 0: use +inf there.
        at::Tensor lse_t = lse[bh].narrow(0, m0, mt);
        lse_t = lse_t.masked_fill(lse_t == neg_inf, std::numeric_limits<acc_t>::infinity());
        for (int64_t l0 = 0; l0 < dense; l0 += LT) {
          const int64_t lt = std::min(LT, dense - l0);
          at::Tensor p = pbuf.narrow(0, 0, mt * lt).view({mt, lt});
          at::Tensor dp = dpbuf.narrow(0, 0, mt * lt).view({mt, lt});
          const at::Tensor kt = kb.narrow(0, l0, lt), vt = vb.narrow(0, l0, lt);
          at::mm_out(p, qt, kt.t());
          at::mm_out(dp, gt, vt.t());
          p.mul_(scale).sub_(lse_t.unsqueeze(1)).exp_();          // P = exp(S - lse)
          dp.sub_(d_t.unsqueeze(1)).mul_(p);                       // dS = P (dP - D)
          dvb.narrow(0, l0, lt).addmm_(p.t(), gt);
          dqt.addmm_(dp, kt, 1, scale);
          dkb.narrow(0, l0, lt).addmm_(dp.t(), qt, 1, scale);
        }
        for (int64_t r = 0; r < mt && kk > 0; ++r) {
          const int64_t i = m0 + r;
          const acc_t l = lp[i];
          if (l == neg_inf) continue;
          const acc_t *qi = qp + i * D, *gi = gp + i * Dv;
          acc_t* dqi = dqp + i * D;
          for (int64_t j = 0; j < kk; ++j) {
            const int64_t key = ip[i * kk + j];
            if (key < 0) continue;
            const acc_t *kj = kp + key * D, *vj = vp + key * Dv;
            const acc_t s = dot(qi, kj, D), dpj = dot(gi, vj, Dv);
            const acc_t pr = std::exp(scale * s - l);
            const acc_t ds = pr * (dpj - drow[r]) * scale;
            acc_t *dkj = dkp + key * D, *dvj = dvp + key * Dv;
            for (int64_t c = 0; c < Dv; ++c) dvj[c] += pr * gi[c];
            for (int64_t c = 0; c < D; ++c) {
              dqi[c] += ds * kj[c];
              dkj[c] += ds * qi[c];
            }
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& index, double scale, int64_t dense_keys) {
  check_attention_backward(grad_out, q, k, v, out, lse, index);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), L = k.size(2), Dv = v.size(3);
  const int64_t BH = B * H, kk = index.size(-1);
  // The forward kept every key densely exactly when it saved no sparse indices.
  const int64_t dense = kk == 0 ? L : dense_keys;
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor qf = q.detach().to(acc).contiguous().view({BH, M, D});
  const at::Tensor kf = k.detach().to(acc).contiguous().view({BH, L, D});
  const at::Tensor vf = v.detach().to(acc).contiguous().view({BH, L, Dv});
  const at::Tensor gf = grad_out.detach().to(acc).contiguous().view({BH, M, Dv});
  const at::Tensor of = out.detach().to(acc).contiguous().view({BH, M, Dv});
  const at::Tensor lf = lse.detach().to(acc).contiguous().view({BH, M}), ixf = index.contiguous().view({BH, M, kk});
  at::Tensor dq = at::zeros({BH, M, D}, qf.options()), dk = at::zeros({BH, L, D}, qf.options());
  at::Tensor dv = at::zeros({BH, L, Dv}, qf.options());
  if (BH * M * L > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "topk_attention_backward_cpu", [&] {
      attention_backward_impl<scalar_t>(gf, qf, kf, vf, of, lf, ixf, scale, dense, dq, dk, dv);
    });
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
