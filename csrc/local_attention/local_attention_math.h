// local_attention math shared by the CPU (.cpp) and CUDA (.cu) kernels: torch-free.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace vosops {
namespace local_attention {

enum class Normalize : int { Softmax = 0, Threshold = 1 };

// Bounds of the window geometry (vosops/ops/local_attention.py checks the same): every backend enumerates the
// (2r+1)^2 window columns, and offset_limit below must stay in int32 (check_offset_range in the glue).
constexpr int64_t kMaxRadius = 1023;
constexpr int64_t kMaxDilation = 1023;

// Offsets beyond +-L put every candidate out of frame; clamping there keeps them in int32.
VOSOPS_HD int64_t offset_limit(int64_t H, int64_t W, int64_t radius, int64_t dilation) {
  return H + W + dilation * radius + 1;
}

// Round half away from zero, exactly (floor(|o|) plus a compare, no `o + 0.5` rounding error); non-finite and
// huge offsets clamp to +-L (NaN to +L), which is outside every frame. Matches reference.round_offsets.
VOSOPS_HD int32_t round_offset(double o, int64_t L) {
  const double Ld = static_cast<double>(L);
  if (o != o) o = Ld;
  if (o > Ld) o = Ld;
  if (o < -Ld) o = -Ld;
  const double a = o < 0 ? -o : o;
  double f = floor(a);
  if (a - f >= 0.5) f += 1.0;
  return static_cast<int32_t>(o < 0 ? -f : f);
}

// "a ranks before b" in a top-k list: larger logit first, ties to the lower candidate index (a stable descending
// sort). A NaN ranks before every number, as in torch.sort (a NaN feature makes the query's output NaN, as the
// reference's does, instead of a finite result from a list the NaN left out of order).
template <typename T>
VOSOPS_HD bool ranks_before(T sa, int64_t ia, T sb, int64_t ib) {
  const bool a_nan = sa != sa, b_nan = sb != sb;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return sa > sb || (sa == sb && ia < ib);
}

// ranks_before for scores known not to be NaN (the selection's hot path, after one check of the row).
template <typename T>
VOSOPS_HD bool ranks_before_numbers(T sa, int64_t ia, T sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

}  // namespace local_attention
}  // namespace vosops
