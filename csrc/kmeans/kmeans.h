// kmeans glue shared by the CPU and CUDA implementations: argument checks.
#pragma once
#include <ATen/ATen.h>

namespace vosops {
namespace kmeans {

// Points are processed in chunks of this many; partial sums are kept per chunk (not per thread), so the
// reduction order, and so the result, does not depend on the number of threads.
constexpr int64_t kChunk = 1024;

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& centers) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be (B, N, D), got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(centers.dim() == 3 && centers.size(0) == x.size(0) && centers.size(2) == x.size(2) &&
                        centers.size(1) >= 1,
                    op, ": centers must be (B, K, D) with K >= 1 matching x ", x.sizes(), ", got ", centers.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(centers.scalar_type()), op, ": centers must be floating point, got ",
                   centers.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == x.size(0), op, ": lengths must be (B,) = (", x.size(0),
                    ",), got ", lengths.sizes());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, op, ": lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(x.device() == centers.device() && x.device() == lengths.device(), op,
                    ": x, lengths and centers must be on the same device, got ", x.device(), ", ", lengths.device(),
                    " and ", centers.device());
}

}  // namespace kmeans
}  // namespace vosops
