// local_affinity's and local_aggregate's CPU kernels for calls without offsets, eight pixels of a row at a time
// (row_kernels.h). local_aggregate's output is dq's gather (values for keys), its d/dweights the scores (grad_out
// against the values), its dv dk's gather.
//
//   scores  out[b, n, p, i, j] = scale * <q[b, :, i, j], k[b, n, :, y, x]>        eight queries' column p at once
//   dq      dq[b, c, i, j]     = scale * sum_{n,p} g[b, n, p, i, j] k[b, n, c, y, x]   eight queries, 8 channels
//   dk      dk[b, n, c, y, x]  = scale * sum_p g[b, n, p, i, j] q[b, c, i, j]          eight keys, 8 channels
// with (y, x) = (i + d*dy, j + d*dx) for window column p = (dy, dx). dk is gathered over the queries whose window
// holds the key (i, j) = (y - d*dy, x - d*dx), so every gradient element is written once: no scatter, no atomics.
// Out-of-frame candidates take no gradient; out-of-window columns (circles) are -inf and take none either.
#pragma once
#include <ATen/ATen.h>

#include "local_attention/local_affinity_math.h"
#include "local_attention/row_kernels.h"

namespace vosops {
namespace local_affinity {

// Float accumulation, no offsets, rows of at least one block, row_kernels::enabled(), and a padded copy of the
// reference frames' operand (k or v) within row_kernels::kMaxCopyBytes.
bool use_rows(const Geometry& g, at::ScalarType acc_type, const at::Tensor& frames);

// q: (B, H, C, Wq) from row_kernels::pad_tail; k: (B, N, H, C, Wk) from pad_ends; out (B, N, P, H, W).
void scores_rows(const Geometry& g, const float* q, int64_t Wq, const float* k, int64_t Wk, int64_t C, float scale,
                 float fill, float* out);

// grad: (B, N, P, H, W) contiguous; k: (B, N, H, C, Wk) from pad_ends; dq (B, C, H, W), every element written.
void dq_rows(const Geometry& g, const float* grad, const float* k, int64_t Wk, int64_t C, float scale, float* dq);

// grad: (B, N, P, H, W) contiguous; q: (B, H, C, Wk) from pad_ends; dk (B, N, C, H, W), every element written.
void dk_rows(const Geometry& g, const float* grad, const float* q, int64_t Wk, int64_t C, float scale, float* dk);

}  // namespace local_affinity
}  // namespace vosops
