// merge_topk argument checks shared by the CPU and CUDA glue.
#pragma once
#include <ATen/ATen.h>

#include "topk/topk.h"

namespace vosops {
namespace topk {

// logits (B, M, N) floating, index (B, M, N) int64 on the same device (the concatenated candidate lists).
inline void check_merge_args(const at::Tensor& logits, const at::Tensor& index, int64_t topk) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "merge_topk: logits must be (B, M, N), got shape ", logits.sizes());
  check_float(logits, "merge_topk", "logits");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "merge_topk: index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.sizes() == logits.sizes(), "merge_topk: index must have the shape of the logits ",
                    logits.sizes(), ", got ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == logits.device(), "merge_topk: index is on ", index.device(),
                    " but logits on ", logits.device());
  const int64_t N = logits.size(2);
  TORCH_CHECK_VALUE(topk >= 1 && topk <= N, "merge_topk: topk must be in [1, N] = [1, ", N,
                    "] (N the total number of candidates), got ", topk);
}

}  // namespace topk
}  // namespace vosops
