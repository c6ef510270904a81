// topk glue shared by the CPU and CUDA implementations: argument checks and the dense/sparse split.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/native.h"

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

inline void check_attention_counts(int64_t L, int64_t topk, int64_t dense_keys, double scale) {
  check_scale("topk_attention", scale);
  TORCH_CHECK_VALUE(topk >= 1 && topk <= L, "topk_attention: topk must be in [1, L] = [1, ", L, "], got ", topk);
  TORCH_CHECK_VALUE(dense_keys >= 0 && dense_keys <= L, "topk_attention: dense_keys must be in [0, L] = [0, ", L,
                    "], got ", dense_keys);
}

// The backward's saved tensors must be the forward's: out (B, H, M, Dv) like grad_out, lse (B·H·M), index (.., M, k).
inline void check_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& index) {
  check_attention_inputs(q, k, v);
  const int64_t M = q.size(2);
  const std::vector<int64_t> rows{q.size(0), q.size(1), M, v.size(3)};
  TORCH_CHECK_VALUE(grad_out.sizes() == rows && out.sizes() == rows, "topk_attention_backward: grad_out and out must be ",
                    "(B, H, M, Dv) = ", at::IntArrayRef(rows), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), M}),
                    "topk_attention_backward: lse must be the forward's (B, H, M) = ", q.sizes().slice(0, 3),
                    ", got ", lse.sizes());
  TORCH_CHECK_VALUE(index.dim() == 4 && index.size(0) == q.size(0) && index.size(1) == q.size(1) &&
                        index.size(2) == M && index.size(3) <= k.size(2),
                    "topk_attention_backward: index must be the forward's (B, H, M, kept) with B, H, M = ",
                    q.sizes().slice(0, 3), " and kept <= L, got ", index.sizes());
}

// Dense keys [0, dense) and how many sparse keys each query keeps; topk >= L - dense_keys keeps all keys densely.
inline std::pair<int64_t, int64_t> split_keys(int64_t L, int64_t topk, int64_t dense_keys) {
  if (topk >= L - dense_keys) return {L, 0};
  return {dense_keys, topk};
}

// global_topk's argument checks (both devices); returns key_mask made contiguous, or an undefined tensor.
inline at::Tensor check_global_topk_args(const at::Tensor& q, const at::Tensor& k, int64_t topk, double scale,
                                         const std::optional<at::Tensor>& key_mask) {
  check_scale("global_topk", scale);
  TORCH_CHECK_VALUE(q.dim() == 3, "global_topk: q must be (B, M, C), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
                    "global_topk: k must be (B, L, C) with q's B and C, got ", k.sizes(), " for q ", q.sizes());
  check_float(q, "global_topk", "q");
  check_like(q, k, "global_topk", "q", "k");
  const int64_t B = q.size(0), L = k.size(1);
  TORCH_CHECK_VALUE(topk >= 1 && topk <= L, "global_topk: topk must be in [1, L] = [1, ", L, "], got ", topk);
  at::Tensor mask;
  if (key_mask.has_value()) {
    mask = key_mask->contiguous();
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "global_topk: key_mask must be bool, got ", mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == L && mask.device() == q.device(),
                      "global_topk: key_mask must be (B, L) = (", B, ", ", L, ") on q's device, got ", mask.sizes());
  }
  return mask;
}

// --- topk_aggregate (shared by the CPU and CUDA glue) ----------------------------------------------------------------

enum class Normalize { Softmax, Threshold };

inline Normalize parse_normalize(c10::string_view name) {
  if (name == "softmax") return Normalize::Softmax;
  if (name == "threshold") return Normalize::Threshold;
  TORCH_CHECK_VALUE(false, "topk_aggregate: normalize must be 'softmax' or 'threshold', got '", std::string(name),
                    "'");
}

inline void check_aggregate_inputs(const at::Tensor& logits, const at::Tensor& index, const at::Tensor& values) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "topk_aggregate: logits must be (B, M, K), got shape ", logits.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "topk_aggregate: index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.sizes() == logits.sizes(), "topk_aggregate: index must have the shape of the logits ",
                    logits.sizes(), ", got ", index.sizes());
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == logits.size(0),
                    "topk_aggregate: values must be (B, L, Cv) with the logits' B, got ", values.sizes());
  check_float(logits, "topk_aggregate", "logits");
  check_like(logits, values, "topk_aggregate", "logits", "values");
  TORCH_CHECK_VALUE(index.device() == logits.device(), "topk_aggregate: index must be on the logits' device");
  const int64_t L = values.size(1);
  if (index.numel() == 0) return;
  // On a GPU a check here would synchronise with the host every call; vosops.topk_aggregate checks there unless
  // told not to (check_index=False), and the CUDA kernels drop out-of-range candidates, never reading them.
  if (!index.is_cpu()) return;
  const at::Tensor bad = (index < -1).logical_or_(index >= L);
  if (bad.any().item<bool>()) {
    TORCH_CHECK_VALUE(false, "topk_aggregate: index must be in [-1, L) = [-1, ", L,
                      ") (-1 marks an empty slot), found ", index.masked_select(bad)[0].item<int64_t>());
  }
}

inline void check_aggregate_grad(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& values) {
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == logits.size(0) && grad.size(1) == logits.size(1) &&
                        grad.size(2) == values.size(2),
                    "topk_aggregate_backward: grad_out must be (B, M, Cv), got ", grad.sizes());
}

}  // namespace topk
}  // namespace vosops
