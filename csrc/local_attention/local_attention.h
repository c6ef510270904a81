// local_attention glue shared by the CPU and CUDA implementations: argument checks, parsing, the window table.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <vector>

#include "common/native.h"
#include "local_attention/local_attention_math.h"

namespace vosops {
namespace local_attention {

// Rounded offsets are int32 (clamped to +-offset_limit): with offsets, H + W + dilation * radius must fit.
inline void check_offset_range(const char* op, int64_t H, int64_t W, int64_t radius, int64_t dilation) {
  TORCH_CHECK_VALUE(offset_limit(H, W, radius, dilation) <= std::numeric_limits<int32_t>::max(), op,
                    ": with offsets, H + W + dilation * radius must be below 2^31 - 1 (offsets are rounded to int32),"
                    " got H = ", H, ", W = ", W);
}

struct Config {
  int64_t B, N, C, Cv, H, W;
  int64_t radius, dilation, D, P;  // D = 2r+1, P = D*D
  double scale;
  int64_t topk;  // 0: softmax over every candidate
  Normalize normalize;
  bool zero_border;
  std::vector<int32_t> cols;  // in-window columns p = (dy+r)*D + (dx+r), ascending
  int64_t Q() const { return static_cast<int64_t>(cols.size()); }
};

inline Config make_config(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& offsets, int64_t radius, int64_t dilation, double scale,
                          int64_t topk, c10::string_view normalize, c10::string_view window,
                          c10::string_view border) {
  TORCH_CHECK_VALUE(q.dim() == 4, "local_attention: q must be (B, C, H, W), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 5 && k.size(0) == q.size(0) && k.size(2) == q.size(1) && k.size(3) == q.size(2) &&
                        k.size(4) == q.size(3),
                    "local_attention: k must be (B, N, C, H, W) matching q ", q.sizes(), ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(k.size(1) >= 1, "local_attention: k must hold at least one reference frame (N >= 1)");
  TORCH_CHECK_VALUE(v.dim() == 5 && v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(3) == k.size(3) &&
                        v.size(4) == k.size(4),
                    "local_attention: v must be (B, N, Cv, H, W) matching k ", k.sizes(), ", got shape ", v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "local_attention: q must be floating point, got ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "local_attention: q, k and v must have the same dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
                    "local_attention: q, k and v must be on the same device");
  if (offsets.has_value()) {
    const at::Tensor& o = *offsets;
    TORCH_CHECK_VALUE(o.dim() == 5 && o.size(0) == k.size(0) && o.size(1) == k.size(1) && o.size(2) == 2 &&
                          o.size(3) == k.size(3) && o.size(4) == k.size(4),
                      "local_attention: offsets must be (B, N, 2, H, W) matching k ", k.sizes(), ", got shape ",
                      o.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(o.scalar_type()), "local_attention: offsets must be floating point, got ",
                     o.scalar_type());
    TORCH_CHECK_VALUE(o.device() == q.device(), "local_attention: offsets must be on the same device as q");
  }
  TORCH_CHECK_VALUE(radius >= 0, "local_attention: radius must be >= 0, got ", radius);
  TORCH_CHECK_VALUE(radius <= kMaxRadius, "local_attention: radius must be <= ", kMaxRadius, ", got ", radius);
  TORCH_CHECK_VALUE(dilation >= 1, "local_attention: dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(dilation <= kMaxDilation, "local_attention: dilation must be <= ", kMaxDilation, ", got ",
                    dilation);
  if (offsets.has_value()) check_offset_range("local_attention", q.size(2), q.size(3), radius, dilation);
  Config c;
  c.B = q.size(0);
  c.C = q.size(1);
  c.H = q.size(2);
  c.W = q.size(3);
  c.N = k.size(1);
  c.Cv = v.size(2);
  c.radius = radius;
  c.dilation = dilation;
  c.D = 2 * radius + 1;
  c.P = c.D * c.D;
  check_scale("local_attention", scale);
  c.scale = scale;
  c.topk = topk;
  if (normalize == "softmax") {
    c.normalize = Normalize::Softmax;
  } else if (normalize == "threshold") {
    c.normalize = Normalize::Threshold;
  } else {
    TORCH_CHECK_VALUE(false, "local_attention: normalize must be 'softmax' or 'threshold', got '",
                      std::string(normalize), "'");
  }
  TORCH_CHECK_VALUE(window == "square" || window == "circle",
                    "local_attention: window must be 'square' or 'circle', got '", std::string(window), "'");
  TORCH_CHECK_VALUE(border == "mask" || border == "zero", "local_attention: border must be 'mask' or 'zero', got '",
                    std::string(border), "'");
  c.zero_border = border == "zero";
  const bool circle = window == "circle";
  for (int64_t dy = -radius; dy <= radius; ++dy)
    for (int64_t dx = -radius; dx <= radius; ++dx)
      if (!circle || dy * dy + dx * dx < radius * radius)
        c.cols.push_back(static_cast<int32_t>((dy + radius) * c.D + (dx + radius)));
  const int64_t count = c.N * c.Q();
  TORCH_CHECK_VALUE(count > 0, "local_attention: the window has no candidates (circle needs radius >= 1)");
  TORCH_CHECK_VALUE(topk >= 0 && topk <= count, "local_attention: topk must be in [1, ", count,
                    "] (the number of candidates), or 0 for all; got ", topk);
  TORCH_CHECK_VALUE(c.normalize == Normalize::Softmax || topk >= 1,
                    "local_attention: normalize='threshold' needs topk >= 1");
  return c;
}

// Rounded offsets (B, N, 2, H, W) int32 contiguous on the CPU: the one place rounding happens for the CPU kernel.
inline at::Tensor rounded_offsets_cpu(const at::Tensor& offsets, const Config& c) {
  at::Tensor o = offsets.to(at::kDouble).contiguous();
  at::Tensor r = at::empty(o.sizes(), o.options().dtype(at::kInt));
  const double* op = o.const_data_ptr<double>();
  int32_t* rp = r.data_ptr<int32_t>();
  const int64_t L = offset_limit(c.H, c.W, c.radius, c.dilation);
  for (int64_t e = 0, n = o.numel(); e < n; ++e) rp[e] = round_offset(op[e], L);
  return r;
}

// A saved top-k index is n*P + p with n < N and p an in-window column; the CPU kernel looks candidates up by it,
// so a bad one raises here. On a GPU the check would synchronise with the host: the CUDA kernel skips bad entries.
inline void check_topk_index_range(const Config& c, const at::Tensor& topk_index) {
  if (c.topk == 0 || topk_index.numel() == 0 || !topk_index.is_cpu()) return;
  at::Tensor in_window = at::zeros({c.P}, topk_index.options().dtype(at::kBool));
  for (const int32_t col : c.cols) in_window[col] = true;
  const at::Tensor bad = (topk_index < 0)
                             .logical_or_(topk_index >= c.N * c.P)
                             .logical_or_(in_window.index({topk_index.remainder(c.P)}).logical_not_());
  if (bad.any().item<bool>()) {
    TORCH_CHECK_VALUE(false, "local_attention_backward: topk_index must hold the forward's candidate indices n*P + p ",
                      "(n < N = ", c.N, ", p an in-window column of P = ", c.P, "), found ",
                      topk_index.masked_select(bad)[0].item<int64_t>());
  }
}

// The backward's saved tensors must be the forward's; returns whether a gradient of the returned top-k logits flows.
inline bool check_backward_inputs(const Config& c, const at::Tensor& grad_out,
                                  const std::optional<at::Tensor>& grad_topk_logits, const at::Tensor& stats,
                                  const at::Tensor& topk_index, at::ScalarType stats_dtype) {
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef({c.B, c.Cv, c.H, c.W}),
                    "local_attention_backward: grad_out must be (B, Cv, H, W), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({c.B, c.H, c.W, 2}) && stats.scalar_type() == stats_dtype,
                    "local_attention_backward: stats must be the forward's (B, H, W, 2) ", stats_dtype,
                    " statistics");
  TORCH_CHECK_VALUE(topk_index.sizes() == at::IntArrayRef({c.B, c.H, c.W, c.topk}) &&
                        topk_index.scalar_type() == at::kLong,
                    "local_attention_backward: topk_index must be the forward's (B, H, W, topk) int64 indices");
  check_topk_index_range(c, topk_index);
  const bool with_gl = grad_topk_logits.has_value() && grad_topk_logits->defined() && c.topk > 0;
  if (with_gl) {
    TORCH_CHECK_VALUE(grad_topk_logits->sizes() == topk_index.sizes(),
                      "local_attention_backward: grad_topk_logits must be (B, H, W, topk)");
  }
  return with_gl;
}

}  // namespace local_attention
}  // namespace vosops
