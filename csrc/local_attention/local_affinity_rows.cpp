// local_affinity's row kernels (see local_affinity_rows.h): AVX2/FMA, chosen at run time.
#include "local_attention/local_affinity_rows.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace vosops {
namespace local_affinity {

using row_kernels::kLanes;
using row_kernels::kPad;

bool use_rows(const Geometry& g, at::ScalarType acc_type, const at::Tensor& frames) {
  // The lane masks compute column indices in int32.
  const bool fits = g.W + 2 * kPad + g.radius * g.dilation < std::numeric_limits<int32_t>::max();
  return row_kernels::enabled() && acc_type == at::kFloat && g.offsets == nullptr && g.W >= kLanes && fits &&
         row_kernels::copy_fits(frames);
}

#ifdef VOSOPS_ROWS_AVX2

namespace {

// In-window columns [lo, hi) of window row a (a circle's rows are contiguous runs of columns).
struct ColumnRange {
  int64_t lo, hi;
};

ColumnRange window_row(const Geometry& g, int64_t a) {
  const int64_t D = 2 * g.radius + 1;
  int64_t lo = 0;
  while (lo < D && !in_window(a * D + lo, g.radius, g.circle)) ++lo;
  int64_t hi = lo;
  while (hi < D && in_window(a * D + hi, g.radius, g.circle)) ++hi;
  return {lo, hi};
}

}  // namespace

namespace {

// One candidate column of a block for the gathers: where its eight gradients are (masked to the lanes whose
// candidate is in frame) and where its eight channel-0 operands are, relative to a (batch, reference) base. A
// block's columns are the same for every batch and reference, so they are listed once per row of blocks.
struct Column {
  int64_t grad_at, src_at;
  int32_t mask[kLanes];  // all ones in the lanes to read (no __m256i member: std::vector need not align it)
};

__attribute__((target("avx2,fma"))) inline Column make_column(int64_t grad_at, int64_t src_at, __m256i mask) {
  Column col{grad_at, src_at, {}};
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(col.mask), mask);
  return col;
}

// The (grad, src) bases the columns are added to: one per reference summed over.
struct Base {
  int64_t grad, src;
};

// acc[cc][l] = sum over the bases and the columns [c0, c1) of grad[base.grad + col.grad_at + l] *
// src[base.src + col.src_at + cc * stride + l], masked lanes 0.
template <int CN>
__attribute__((target("avx2,fma"))) void gather_chunk(const Column* c0, const Column* c1, const Base* b0,
                                                       const Base* b1, const float* grad, const float* src,
                                                       int64_t stride, float* out) {
  __m256 acc[CN];
#pragma GCC unroll 8
  for (int cc = 0; cc < CN; ++cc) acc[cc] = _mm256_setzero_ps();
  for (const Base* base = b0; base != b1; ++base) {
    const float* gb = grad + base->grad;
    const float* sb = src + base->src;
    for (const Column* col = c0; col != c1; ++col) {
      const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col->mask));
      const __m256 w = _mm256_maskload_ps(gb + col->grad_at, mask);
      const float* s = sb + col->src_at;
#pragma GCC unroll 8
      for (int cc = 0; cc < CN; ++cc) acc[cc] = _mm256_fmadd_ps(w, _mm256_loadu_ps(s + cc * stride), acc[cc]);
    }
  }
#pragma GCC unroll 8
  for (int cc = 0; cc < CN; ++cc) _mm256_storeu_ps(out + cc * kLanes, acc[cc]);
}

using ChunkFn = void (*)(const Column*, const Column*, const Base*, const Base*, const float*, const float*,
                         int64_t, float*);
constexpr ChunkFn kChunks[8] = {&gather_chunk<1>, &gather_chunk<2>, &gather_chunk<3>, &gather_chunk<4>,
                                &gather_chunk<5>, &gather_chunk<6>, &gather_chunk<7>, &gather_chunk<8>};

// For every channel block of eight: the gather of one block's columns over the bases, scaled into
// dst[c * dst_stride + l], l < lanes (dst points at channel 0 of the block's first pixel).
__attribute__((target("avx2,fma"))) void gather_channels(const Column* c0, const Column* c1,
                                                          const std::vector<Base>& bases, const float* grad,
                                                          const float* src, int64_t src_stride, int64_t C,
                                                          float scale, float* dst, int64_t dst_stride,
                                                          int64_t lanes) {
  alignas(32) float tile[8 * kLanes];
  for (int64_t ch = 0; ch < C; ch += 8) {
    const int64_t cn = std::min<int64_t>(8, C - ch);
    kChunks[cn - 1](c0, c1, bases.data(), bases.data() + bases.size(), grad, src + ch * src_stride, src_stride,
                    tile);
    for (int64_t cc = 0; cc < cn; ++cc) {
      float* o = dst + (ch + cc) * dst_stride;
      for (int64_t l = 0; l < lanes; ++l) o[l] = scale * tile[cc * kLanes + l];
    }
  }
}

// The columns of one row of blocks, block after block: block x0 / kLanes's are [starts[blk], starts[blk + 1]).
struct RowPlan {
  std::vector<Column> cols;
  std::vector<int64_t> starts;
  int64_t row = -1;  // the row it was built for
};

std::vector<ColumnRange> window_rows(const Geometry& g) {
  std::vector<ColumnRange> rows;
  for (int64_t a = 0; a < 2 * g.radius + 1; ++a) rows.push_back(window_row(g, a));
  return rows;
}

// One (b, n, i) row of scores_rows. (The parallel loops' lambdas call functions like this one: a lambda does not
// take its enclosing function's target attribute, so the vector code may not sit in it.)
__attribute__((target("avx2,fma"))) void score_row(const Geometry& g, const std::vector<ColumnRange>& ranges,
                                                    const float* q, int64_t Wq, const float* k, int64_t Wk,
                                                    int64_t C, float scale, float fill, float* out, int64_t row) {
  const int64_t H = g.H, W = g.W, HW = H * W, D = 2 * g.radius + 1, P = g.P, r = g.radius, d = g.dilation;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  alignas(32) float tile[row_kernels::kGroup * kLanes];
  const int64_t i = row % H, bn = row / H, b = bn / g.N;
  float* ob = out + bn * P * HW + i * W;  // window column p of this row at ob + p * HW
  const float* qb = q + (b * H + i) * C * Wq;
  const float* kf = k + bn * C * H * Wk;
  auto fill_columns = [&](int64_t a, int64_t cx0, int64_t cx1, int64_t j0, int64_t len, float value) {
    for (int64_t cx = cx0; cx < cx1; ++cx) std::fill_n(ob + (a * D + cx) * HW + j0, len, value);
  };
  const __m256 vfill = _mm256_set1_ps(fill), vscale = _mm256_set1_ps(scale);
  for (int64_t a = 0; a < D; ++a) {
    const ColumnRange cr = ranges[a];
    fill_columns(a, 0, cr.lo, 0, W, kNegInf);  // outside a circle window
    fill_columns(a, cr.hi, D, 0, W, kNegInf);
    const int64_t y = i + (a - r) * d;
    if (y < 0 || y >= H) {
      fill_columns(a, cr.lo, cr.hi, 0, W, fill);
      continue;
    }
    const float* krow = kf + y * C * Wk + kPad;
    for (int64_t j0 = 0; j0 < W; j0 += kLanes) {
      const int64_t lanes = std::min(kLanes, W - j0);
      // Columns whose lanes all fall outside the frame are not scored; the others read at most kLanes - 1
      // columns past either edge, inside k's zero border.
      int64_t ta = cr.lo, tb = cr.hi;
      while (ta < tb && j0 + lanes - 1 + (ta - r) * d < 0) ++ta;
      while (tb > ta && j0 + (tb - 1 - r) * d >= W) --tb;
      fill_columns(a, cr.lo, ta, j0, lanes, fill);
      fill_columns(a, tb, cr.hi, j0, lanes, fill);
      const int64_t groups = row_kernels::group_count(tb - ta);
      for (int64_t t = ta, gi = groups; gi > 0; --gi) {
        const int64_t n = row_kernels::next_group(tb - t, gi);
        row_kernels::score_group_fn(n, d)(qb + j0, Wq, krow + j0 + (t - r) * d, Wk, d, C, tile);
        for (int64_t u = 0; u < n; ++u) {
          float* o = ob + (a * D + t + u) * HW + j0;
          const int64_t x0 = j0 + (t + u - r) * d;
          if (lanes == kLanes) {
            const __m256 in = _mm256_castsi256_ps(row_kernels::lane_mask(x0, 0, W, kLanes));
            const __m256 v = _mm256_mul_ps(vscale, _mm256_load_ps(tile + u * kLanes));
            _mm256_storeu_ps(o, _mm256_blendv_ps(vfill, v, in));
          } else {
            for (int64_t l = 0; l < lanes; ++l)
              o[l] = (x0 + l >= 0 && x0 + l < W) ? scale * tile[u * kLanes + l] : fill;
          }
        }
        t += n;
      }
    }
  }
}

// The columns of row R's blocks for the gathers. dq (mirror = false): R is a query row, each block's columns are
// its queries' in-frame candidates, the operand rows are key rows. dk (mirror = true): R is a key row, each
// block's columns are the queries (i, j) = (y - d*dy, x - d*dx) whose window column (dy, dx) is the key, the
// operand rows are those queries' rows. Either way the gradient is read at the query and the mask keeps the
// lanes whose other end lies in the frame.
__attribute__((target("avx2,fma"))) void plan_row(const Geometry& g, const std::vector<ColumnRange>& ranges,
                                                   int64_t Wk, int64_t C, int64_t R, bool mirror, RowPlan& plan) {
  const int64_t H = g.H, W = g.W, HW = H * W, D = 2 * g.radius + 1, r = g.radius;
  const int64_t d = mirror ? -g.dilation : g.dilation;
  plan.cols.clear();
  plan.starts.assign(1, 0);
  for (int64_t c0 = 0; c0 < W; c0 += kLanes) {
    const int64_t lanes = std::min(kLanes, W - c0);
    for (int64_t a = 0; a < D; ++a) {
      const int64_t other_row = R + (a - r) * d;
      if (other_row < 0 || other_row >= H) continue;
      const int64_t query_row = mirror ? other_row : R;
      for (int64_t cx = ranges[a].lo; cx < ranges[a].hi; ++cx) {
        const int64_t other_col = c0 + (cx - r) * d;  // lane l's other end at column other_col + l
        if (other_col + lanes - 1 < 0 || other_col >= W) continue;
        const int64_t query_col = mirror ? other_col : c0;
        // With mirror, grad_at may point before its row's start: the mask keeps those lanes unread.
        plan.cols.push_back(make_column((a * D + cx) * HW + query_row * W + query_col,
                                        other_row * C * Wk + kPad + other_col,
                                        row_kernels::lane_mask(other_col, 0, W, lanes)));
      }
    }
    plan.starts.push_back(static_cast<int64_t>(plan.cols.size()));
  }
  plan.row = R;
}

}  // namespace

void scores_rows(const Geometry& g, const float* q, int64_t Wq, const float* k, int64_t Wk, int64_t C, float scale,
                 float fill, float* out) {
  const std::vector<ColumnRange> ranges = window_rows(g);
  at::parallel_for(0, g.B * g.N * g.H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) score_row(g, ranges, q, Wq, k, Wk, C, scale, fill, out, row);
  });
}

// Tasks run row-major over (row, batch[, reference]) so that consecutive tasks of a thread reuse one row's plan.
void dq_rows(const Geometry& g, const float* grad, const float* k, int64_t Wk, int64_t C, float scale, float* dq) {
  const std::vector<ColumnRange> ranges = window_rows(g);
  const int64_t H = g.H, W = g.W, HW = H * W, P = g.P, N = g.N;
  at::parallel_for(0, H * g.B, 1, [&](int64_t t0, int64_t t1) {
    RowPlan plan;
    std::vector<Base> bases(N);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i = task / g.B, b = task % g.B;
      if (plan.row != i) plan_row(g, ranges, Wk, C, i, false, plan);
      for (int64_t n = 0; n < N; ++n) bases[n] = {(b * N + n) * P * HW, (b * N + n) * C * H * Wk};
      for (int64_t blk = 0, j0 = 0; j0 < W; ++blk, j0 += kLanes)
        gather_channels(plan.cols.data() + plan.starts[blk], plan.cols.data() + plan.starts[blk + 1], bases, grad,
                        k, Wk, C, scale, dq + (b * C * H + i) * W + j0, HW, std::min(kLanes, W - j0));
    }
  });
}

void dk_rows(const Geometry& g, const float* grad, const float* q, int64_t Wk, int64_t C, float scale, float* dk) {
  const std::vector<ColumnRange> ranges = window_rows(g);
  const int64_t H = g.H, W = g.W, HW = H * W, P = g.P, BN = g.B * g.N;
  at::parallel_for(0, H * BN, 1, [&](int64_t t0, int64_t t1) {
    RowPlan plan;
    std::vector<Base> base(1);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t y = task / BN, bn = task % BN;
      if (plan.row != y) plan_row(g, ranges, Wk, C, y, true, plan);
      base[0] = {bn * P * HW, (bn / g.N) * C * H * Wk};
      for (int64_t blk = 0, x0 = 0; x0 < W; ++blk, x0 += kLanes)
        gather_channels(plan.cols.data() + plan.starts[blk], plan.cols.data() + plan.starts[blk + 1], base, grad,
                        q, Wk, C, scale, dk + (bn * C * H + y) * W + x0, HW, std::min(kLanes, W - x0));
    }
  });
}

#else

void scores_rows(const Geometry&, const float*, int64_t, const float*, int64_t, int64_t, float, float, float*) {
  TORCH_CHECK(false, "local_affinity: the row kernels need an x86-64 build (use_rows is false here)");
}
void dq_rows(const Geometry&, const float*, const float*, int64_t, int64_t, float, float*) {
  TORCH_CHECK(false, "local_affinity: the row kernels need an x86-64 build (use_rows is false here)");
}
void dk_rows(const Geometry&, const float*, const float*, int64_t, int64_t, float, float*) {
  TORCH_CHECK(false, "local_affinity: the row kernels need an x86-64 build (use_rows is false here)");
}

#endif

}  // namespace local_affinity
}  // namespace vosops
