// local_attention's CPU scores for calls without offsets, eight query pixels of a row at a time (row_kernels.h).
//
// Each score is a chain of fused multiply-adds over the channels in its own vector lane; the backward's
// recomputation of a single kept score (score_row_chain) runs the same chain, so it is bit-identical to the
// forward's. The per-query path does one contiguous dot product per candidate in channels-last, then a
// horizontal sum.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "local_attention/local_attention.h"
#include "local_attention/row_kernels.h"

namespace vosops {
namespace local_attention {

constexpr int64_t kRowLanes = row_kernels::kLanes;
constexpr int64_t kRowPad = row_kernels::kPad;

// In-window columns [t0, t1) of one window row: they share the row offset dy (times dilation) and their column
// offsets increase with t (the candidate order is raster order over the window).
struct WindowRow {
  int64_t dy, t0, t1;
};

// Padded row-layout float copies of q and k and the window's rows. Lanes past W read q's zero tail and keys
// up to kRowPad - 1 columns outside the frame read the key rows' zero borders, so no load needs a bounds check.
struct RowViews {
  const float* q = nullptr;  // (B, H, C, Wq), zero in columns [W, Wq) (row_kernels::pad_tail)
  const float* k = nullptr;  // (B, N, H, C, Wk), key column x at kRowPad + x, zero elsewhere (pad_ends)
  int64_t Wq = 0, Wk = 0;
  const int64_t* dx = nullptr;  // column offset of each in-window column, times dilation
  std::vector<WindowRow> rows;
  bool on() const { return q != nullptr; }
};

constexpr int64_t kRowScratchBytes = 2 << 20;  // a block's scores and key positions, per thread

// Whether a call takes the row path: row_kernels::enabled(), float accumulation (fp32/fp16/bf16 inputs), no
// offsets, rows of at least one full block, a block's scratch within kRowScratchBytes (N * Q <= 21845
// candidates), at most row_kernels::kMaxScoreChannels channels, a k that the per-query path does not read in
// place (row_kernels::read_in_place), and a padded copy of k within row_kernels::kMaxCopyBytes.
bool use_row_scores(const Config& c, const at::Tensor& k, bool has_offsets);

// qp / kp: row_kernels::pad_tail(q) and pad_ends(k), kept alive by the caller while the views are used.
// dy / dx: per in-window column, times dilation (Views' tables; dx must outlive the views).
RowViews make_row_views(const at::Tensor& qp, const at::Tensor& kp, const std::vector<int64_t>& dy,
                        const std::vector<int64_t>& dx);

// Scores and key positions (flat y*W + x, -1 out of frame) of every candidate of queries (b, i, j0 + l),
// l < min(kRowLanes, W - j0): lane l's candidate e goes to s[l * N*Q + e] and pos[l * N*Q + e]. Out-of-frame
// candidates get 0 (border "zero") or -inf (border "mask").
void score_rows(const Config& c, const RowViews& r, int64_t b, int64_t i, int64_t j0, float* s, int64_t* pos);

// One in-frame candidate's score, computed as score_rows computes it: the key at column x of row y of frame n.
float score_row_chain(const Config& c, const RowViews& r, int64_t b, int64_t n, int64_t i, int64_t j, int64_t y,
                      int64_t x);

// w[e] = exp(s[e] - shift), e < n: eight at a time with AVX2 (within 2 ulp of std::exp; arguments below -87.33,
// -inf included, give 0), else std::exp. For the softmax over every candidate, whose exponentials dominate.
void exp_shifted(const float* s, int64_t n, float shift, float* w);

}  // namespace local_attention
}  // namespace vosops
