// local_affinity / local_aggregate glue shared by the CPU and CUDA implementations: argument checks (each error
// names the argument) and the geometry of a call.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "local_attention/local_affinity_math.h"
#include "local_attention/local_attention.h"

namespace vosops {
namespace local_affinity {

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_geometry(const char* op, int64_t radius, int64_t dilation) {
  TORCH_CHECK_VALUE(radius >= 0, op, ": radius must be >= 0, got ", radius);
  TORCH_CHECK_VALUE(radius <= local_attention::kMaxRadius, op, ": radius must be <= ", local_attention::kMaxRadius,
                    ", got ", radius);
  TORCH_CHECK_VALUE(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(dilation <= local_attention::kMaxDilation, op, ": dilation must be <= ",
                    local_attention::kMaxDilation, ", got ", dilation);
}

inline void check_offsets(const char* op, const std::optional<at::Tensor>& offsets, const at::Tensor& like, int64_t N,
                          int64_t radius, int64_t dilation) {
  if (!offsets.has_value()) return;
  local_attention::check_offset_range(op, like.size(-2), like.size(-1), radius, dilation);
  const at::Tensor& o = *offsets;
  const int64_t B = like.size(0), H = like.size(-2), W = like.size(-1);
  TORCH_CHECK_VALUE(o.dim() == 5 && o.size(0) == B && o.size(1) == N && o.size(2) == 2 && o.size(3) == H &&
                        o.size(4) == W,
                    op, ": offsets must be (B, N, 2, H, W) = (", B, ", ", N, ", 2, ", H, ", ", W, "), got shape ",
                    o.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(o.scalar_type()), op, ": offsets must be floating point, got ", o.scalar_type());
  TORCH_CHECK_VALUE(o.device() == like.device(), op, ": offsets must be on the same device as the features");
}


inline Geometry affinity_geometry(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& offsets,
                      int64_t radius, int64_t dilation, c10::string_view window, c10::string_view border) {
  const char* op = "local_affinity";
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be (B, C, H, W), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 5 && k.size(0) == q.size(0) && k.size(2) == q.size(1) && k.size(3) == q.size(2) &&
                        k.size(4) == q.size(3),
                    op, ": k must be (B, N, C, H, W) matching q ", q.sizes(), ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(k.size(1) >= 1, op, ": k must hold at least one reference frame (N >= 1)");
  check_float(op, "q", q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(), " but q has ",
                   q.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": q and k must be on the same device");
  check_geometry(op, radius, dilation);
  TORCH_CHECK_VALUE(window == "square" || window == "circle", op, ": window must be 'square' or 'circle', got '",
                    std::string(window), "'");
  TORCH_CHECK_VALUE(border == "mask" || border == "zero", op, ": border must be 'mask' or 'zero', got '",
                    std::string(border), "'");
  TORCH_CHECK_VALUE(window == "square" || radius >= 1, op, ": window='circle' needs radius >= 1 (no candidates)");
  check_offsets(op, offsets, q, k.size(1), radius, dilation);
  const int64_t D = 2 * radius + 1;
  return Geometry{q.size(0), k.size(1), q.size(2), q.size(3), radius, dilation, D * D, window == "circle", nullptr};
}

inline Geometry aggregate_geometry(const at::Tensor& weights, const at::Tensor& v, const std::optional<at::Tensor>& offsets,
                       int64_t radius, int64_t dilation) {
  const char* op = "local_aggregate";
  check_geometry(op, radius, dilation);
  const int64_t D = 2 * radius + 1;
  TORCH_CHECK_VALUE(weights.dim() == 5 && weights.size(1) >= 1 && weights.size(2) == D * D, op,
                    ": weights must be (B, N, P, H, W) with N >= 1 and P = (2*radius+1)^2 = ", D * D, ", got shape ",
                    weights.sizes());
  TORCH_CHECK_VALUE(v.dim() == 5 && v.size(0) == weights.size(0) && v.size(1) == weights.size(1) &&
                        v.size(3) == weights.size(3) && v.size(4) == weights.size(4),
                    op, ": v must be (B, N, Cv, H, W) matching weights ", weights.sizes(), ", got shape ", v.sizes());
  check_float(op, "weights", weights);
  TORCH_CHECK_TYPE(v.scalar_type() == weights.scalar_type(), op, ": v has dtype ", v.scalar_type(),
                   " but weights has ", weights.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(v.device() == weights.device(), op, ": weights and v must be on the same device");
  check_offsets(op, offsets, weights, weights.size(1), radius, dilation);
  return Geometry{weights.size(0), weights.size(1), weights.size(3), weights.size(4), radius, dilation, D * D, false,
             nullptr};
}


// Rounded offsets (int32, contiguous, CPU) with the reference's rule, or an undefined tensor.
inline at::Tensor rounded_offsets_cpu(const std::optional<at::Tensor>& offsets, const Geometry& g) {
  if (!offsets.has_value()) return at::Tensor();
  local_attention::Config c;
  c.H = g.H;
  c.W = g.W;
  c.radius = g.radius;
  c.dilation = g.dilation;
  return local_attention::rounded_offsets_cpu(*offsets, c);
}

}  // namespace local_affinity
}  // namespace vosops
