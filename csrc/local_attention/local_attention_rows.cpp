// local_attention's row scores (see local_attention_rows.h): AVX2/FMA kernels, chosen at run time.
#include "local_attention/local_attention_rows.h"

#include "common/avx2_exp.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace vosops {
namespace local_attention {

bool use_row_scores(const Config& c, const at::Tensor& k, bool has_offsets) {
  const bool float_acc = k.scalar_type() != at::kDouble;
  // Eight queries' scores and positions must stay in cache: with a window far larger than the frame (INO's r = 40
  // on small frames) most candidates are out-of-frame fills, and eight rows of them ran 1.8x slower than one.
  const int64_t scratch = kRowLanes * c.N * c.Q() * static_cast<int64_t>(sizeof(float) + sizeof(int64_t));
  return row_kernels::enabled() && float_acc && !has_offsets && c.W >= kRowLanes && scratch <= kRowScratchBytes &&
         c.C <= row_kernels::kMaxScoreChannels && !row_kernels::read_in_place(k) && row_kernels::copy_fits(k);
}

RowViews make_row_views(const at::Tensor& qp, const at::Tensor& kp, const std::vector<int64_t>& dy,
                        const std::vector<int64_t>& dx) {
  RowViews r;
  r.q = qp.const_data_ptr<float>();
  r.k = kp.const_data_ptr<float>();
  r.Wq = qp.size(3);
  r.Wk = kp.size(4);
  r.dx = dx.data();
  const int64_t Q = static_cast<int64_t>(dy.size());
  for (int64_t t = 0; t < Q; ++t) {
    if (r.rows.empty() || r.rows.back().dy != dy[t]) r.rows.push_back({dy[t], t, t});
    r.rows.back().t1 = t + 1;
  }
  return r;
}

#ifdef VOSOPS_ROWS_AVX2

__attribute__((target("avx2,fma"))) void score_rows(const Config& c, const RowViews& r, int64_t b, int64_t i,
                                                     int64_t j0, float* s, int64_t* pos) {
  const int64_t N = c.N, H = c.H, W = c.W, C = c.C, Q = c.Q(), NQ = N * Q;
  const int64_t lanes = std::min(kRowLanes, W - j0);
  const float scale = static_cast<float>(c.scale);
  const float fill = c.zero_border ? 0.f : -std::numeric_limits<float>::infinity();
  const int64_t q_stride = r.Wq, k_stride = r.Wk;  // channel to channel
  const float* qb = r.q + (b * H + i) * C * r.Wq + j0;
  alignas(32) float tile[row_kernels::kGroup * kRowLanes];
  auto put_fill = [&](int64_t e) {
    for (int64_t l = 0; l < lanes; ++l) {
      s[l * NQ + e] = fill;
      pos[l * NQ + e] = -1;
    }
  };
  for (int64_t n = 0; n < N; ++n) {
    const float* kf = r.k + (b * N + n) * C * H * r.Wk;
    for (const WindowRow& row : r.rows) {
      const int64_t y = i + row.dy, e0 = n * Q;
      if (y < 0 || y >= H) {
        for (int64_t t = row.t0; t < row.t1; ++t) put_fill(e0 + t);
        continue;
      }
      // Columns whose lanes all fall outside the frame are not scored; the others read at most kRowLanes - 1
      // columns past either edge, inside the zero border.
      int64_t ta = row.t0, tb = row.t1;
      while (ta < tb && j0 + lanes - 1 + r.dx[ta] < 0) put_fill(e0 + ta++);
      while (tb > ta && j0 + r.dx[tb - 1] >= W) put_fill(e0 + --tb);
      const float* krow = kf + y * C * r.Wk + kRowPad + j0;
      row_kernels::for_each_group(ta, tb - ta, [&](int64_t t, int64_t g) {
        row_kernels::score_group_fn(g, c.dilation)(qb, q_stride, krow + r.dx[t], k_stride, c.dilation, C, tile);
        for (int64_t u = 0; u < g; ++u) {
          const int64_t e = e0 + t + u, x0 = j0 + r.dx[t + u];
          for (int64_t l = 0; l < lanes; ++l) {
            const int64_t x = x0 + l;
            const bool in = x >= 0 && x < W;
            s[l * NQ + e] = in ? scale * tile[u * kRowLanes + l] : fill;
            pos[l * NQ + e] = in ? y * W + x : -1;
          }
        }
      });
    }
  }
}

__attribute__((target("avx2,fma"))) void exp_shifted_avx2(const float* s, int64_t n, float shift, float* w) {
  const __m256 sh = _mm256_set1_ps(shift);
  int64_t e = 0;
  for (; e + kRowLanes <= n; e += kRowLanes)
    _mm256_storeu_ps(w + e, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + e), sh)));
  if (e < n) {  // the tail through a zero-padded vector
    alignas(32) float in[kRowLanes] = {}, out[kRowLanes];
    std::copy(s + e, s + n, in);
    _mm256_store_ps(out, exp256(_mm256_sub_ps(_mm256_load_ps(in), sh)));
    std::copy(out, out + (n - e), w + e);
  }
}

// std::fma rounds once, as the vector FMA does: the same chain in the same order gives the same float.
__attribute__((target("avx2,fma"))) float score_row_chain(const Config& c, const RowViews& r, int64_t b, int64_t n,
                                                          int64_t i, int64_t j, int64_t y, int64_t x) {
  const int64_t C = c.C, q_stride = r.Wq, k_stride = r.Wk;
  const float* qp = r.q + (b * c.H + i) * C * r.Wq + j;
  const float* kp = r.k + ((b * c.N + n) * c.H + y) * C * r.Wk + kRowPad + x;
  float acc = 0.f;
  for (int64_t ch = 0; ch < C; ++ch) acc = std::fma(qp[ch * q_stride], kp[ch * k_stride], acc);
  return static_cast<float>(c.scale) * acc;
}

#endif

void exp_shifted(const float* s, int64_t n, float shift, float* w) {
#ifdef VOSOPS_ROWS_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return exp_shifted_avx2(s, n, shift, w);
#endif
  for (int64_t e = 0; e < n; ++e) w[e] = std::exp(s[e] - shift);
}

#ifndef VOSOPS_ROWS_AVX2

void score_rows(const Config&, const RowViews&, int64_t, int64_t, int64_t, float*, int64_t*) {
  TORCH_CHECK(false, "local_attention: the row scores need an x86-64 build (use_row_scores is false here)");
}

float score_row_chain(const Config&, const RowViews&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "local_attention: the row scores need an x86-64 build (use_row_scores is false here)");
}

#endif

}  // namespace local_attention
}  // namespace vosops
