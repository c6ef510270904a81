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
  // cluster indices are 32-bit in the kernels (label lanes, per-cluster lists)
  TORCH_CHECK_VALUE(centers.size(1) <= INT32_MAX, op, ": centers has K = ", centers.size(1),
                    " centres; at most 2^31 - 1 are supported");
  TORCH_CHECK_TYPE(at::isFloatingType(centers.scalar_type()), op, ": centers must be floating point, got ",
                   centers.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == x.size(0), op, ": lengths must be (B,) = (", x.size(0),
                    ",), got ", lengths.sizes());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, op, ": lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(x.device() == centers.device() && x.device() == lengths.device(), op,
                    ": x, lengths and centers must be on the same device, got ", x.device(), ", ", lengths.device(),
                    " and ", centers.device());
}

// kmeans_update's arguments: x (B, N, D); lengths, n_iter (B,) int64; labels (B, N) int64; mindist (B, N), sums
// (B, K, D), centers (B, K, D), tol (B,) floating; counts (B, K) int64; active, labels_equal (B,) bool; one device.
inline void check_update_inputs(const char* op, const at::Tensor& x, const at::Tensor& lengths,
                                const at::Tensor& labels, const at::Tensor& mindist, const at::Tensor& sums,
                                const at::Tensor& counts, const at::Tensor& centers, const at::Tensor& active,
                                const at::Tensor& n_iter, const at::Tensor& labels_equal, const at::Tensor& tol) {
  check_inputs(op, x, lengths, centers);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers.size(1);
  auto expect = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape, bool floating,
                    at::ScalarType type) {
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
    if (floating) {
      TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
                       t.scalar_type());
    } else {
      TORCH_CHECK_TYPE(t.scalar_type() == type, op, ": ", name, " must be ", type, ", got ", t.scalar_type());
    }
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t.device());
  };
  expect("labels", labels, {B, N}, false, at::kLong);
  expect("mindist", mindist, {B, N}, true, at::kFloat);
  expect("sums", sums, {B, K, D}, true, at::kFloat);
  expect("counts", counts, {B, K}, false, at::kLong);
  expect("active", active, {B}, false, at::kBool);
  expect("n_iter", n_iter, {B}, false, at::kLong);
  expect("labels_equal", labels_equal, {B}, false, at::kBool);
  expect("tol", tol, {B}, true, at::kFloat);
}

}  // namespace kmeans
}  // namespace vosops
