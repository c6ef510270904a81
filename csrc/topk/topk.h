// topk glue shared by the CPU and CUDA implementations: argument checks and the dense/sparse split.
#pragma once
#include <ATen/ATen.h>

#include <utility>

namespace vosops {
namespace topk {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_like(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na, const char* nb) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", na, " and ", nb, " must have the same dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", na, " and ", nb, " must be on the same device, got ",
                    a.device(), " and ", b.device());
}

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4, "topk_attention: q must be (B, H, M, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    "topk_attention: k must be (B, H, L, D) with q's B, H and D, got ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
                    "topk_attention: v must be (B, H, L, Dv) with k's B, H and L, got ", v.sizes());
  check_float(q, "topk_attention", "q");
  check_like(q, k, "topk_attention", "q", "k");
  check_like(q, v, "topk_attention", "q", "v");
}

// Dense keys [0, dense) and how many sparse keys each query keeps; topk >= L - dense_keys keeps all keys densely.
inline std::pair<int64_t, int64_t> split_keys(int64_t L, int64_t topk, int64_t dense_keys) {
  if (topk >= L - dense_keys) return {L, 0};
  return {dense_keys, topk};
}

}  // namespace topk
}  // namespace vosops
