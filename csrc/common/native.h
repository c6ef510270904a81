// Glue-side helpers (need ATen): argument checks, output allocation, dtype mapping.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "common/host_device.h"

namespace vosops {

// When set (tests only), every output allocated through new_output is filled with NaN / a sentinel, so an
// element a kernel forgets to write fails the comparison instead of passing on stale memory.
bool poison_outputs();
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// A logit scale must be finite: NaN or inf would turn every score into NaN / +-inf, which the selections treat as
// "no key", silently returning empty rows. (The Python API checks the same; this guards direct torch.ops calls.)
inline void check_scale(const char* op, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

inline Shape4 shape4(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "vosops internal: expected a 4-d tensor");
  Shape4 s;
  for (int i = 0; i < 4; ++i) {
    s.size[i] = t.size(i);
    s.stride[i] = t.stride(i);
  }
  return s;
}

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "vosops: unsupported dtype ", t, " (expected float32, float64, float16 or bfloat16)");
  }
}

}  // namespace vosops
