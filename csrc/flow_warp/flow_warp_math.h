// flow_warp's per-pixel sampling math, torch-free: shared by the CPU kernels and the CUDA kernels so both compute
// exactly F.grid_sample(align_corners=True) on the grid (j + dx, i + dy), in pixel units.
#pragma once
#include <math.h>

#include "common/host_device.h"

namespace vosops {
namespace flow_warp {

enum class Mode : int { Bilinear = 0, Nearest = 1 };
enum class Padding : int { Zeros = 0, Border = 1 };

// Floor of a value known to lie in (-2^62, 2^62), by truncation: inlined everywhere, where floorf would be a libm
// call on a baseline x86-64 build.
template <typename acc_t>
VOSOPS_HD int64_t floor_in_range(acc_t v) {
  const int64_t t = static_cast<int64_t>(v);
  return static_cast<acc_t>(t) > v ? t - 1 : t;
}

// Round half to even (the default rounding mode), as grid_sample's nearest mode does with nearbyint.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float rint_(float v) { return rintf(v); }
__device__ __forceinline__ double rint_(double v) { return rint(v); }
#else
template <typename acc_t>
inline acc_t rint_(acc_t v) {
  if (!(v > acc_t(-4e18) && v < acc_t(4e18))) return v;  // NaN, inf and huge values: no integer conversion
  const int64_t f = floor_in_range(v);
  const acc_t d = v - static_cast<acc_t>(f);  // exact: v and its floor share the exponent range
  const int64_t r = d > acc_t(0.5) ? f + 1 : (d < acc_t(0.5) ? f : f + (f & 1));
  return static_cast<acc_t>(r);
}
#endif

// Up to four taps of one output pixel inside a (b, c) plane of x. A tap outside the frame has weight 0 and offset
// 0, so every tap can be read without a branch.
template <typename acc_t>
struct Taps {
  int64_t off[4];
  acc_t w[4];
  // d(sampling x)/d(dx) and d(sampling y)/d(dy): 0 where border padding clamped the coordinate, else 1.
  acc_t gx_mult, gy_mult;
  // Fractional parts, kept for the flow gradient.
  acc_t fx, fy;
  bool valid[4];
};

// Clamp a coordinate into [0, size-1] for border padding; the gradient through a clamped coordinate is 0
// (grid_sample's rule, including at exactly 0 and size-1).
template <typename acc_t>
VOSOPS_HD acc_t clip_coordinate(acc_t p, int64_t size, acc_t& grad_mult) {
  const acc_t hi = static_cast<acc_t>(size - 1);
  if (p <= acc_t(0)) {
    grad_mult = acc_t(0);
    return acc_t(0);
  }
  if (p >= hi) {
    grad_mult = acc_t(0);
    return hi;
  }
  grad_mult = acc_t(1);
  return p;
}

// Bilinear taps for the sampling point (px, py) in pixels. Non-finite or far out-of-frame points give all-zero
// weights (the comparisons below are false for NaN, and no out-of-range value is ever cast to an integer).
template <typename acc_t>
VOSOPS_HD void bilinear_taps(acc_t px, acc_t py, int64_t H, int64_t W, int64_t sh, int64_t sw, Padding pad,
                             Taps<acc_t>& t) {
  t.gx_mult = acc_t(1);
  t.gy_mult = acc_t(1);
  if (pad == Padding::Border) {
    px = clip_coordinate(px, W, t.gx_mult);
    py = clip_coordinate(py, H, t.gy_mult);
  }
  for (int k = 0; k < 4; ++k) {
    t.off[k] = 0;
    t.w[k] = acc_t(0);
    t.valid[k] = false;
  }
  t.fx = acc_t(0);
  t.fy = acc_t(0);
  // px = -1 exactly still has an in-frame tap (x = 0, weight 0) through which the flow gradient passes
  if (!(px >= acc_t(-1) && px < acc_t(W) && py >= acc_t(-1) && py < acc_t(H))) return;
  const int64_t x0 = floor_in_range(px), y0 = floor_in_range(py);
  const acc_t fx = px - static_cast<acc_t>(x0), fy = py - static_cast<acc_t>(y0);
  t.fx = fx;
  t.fy = fy;
  const acc_t wts[4] = {(acc_t(1) - fx) * (acc_t(1) - fy), fx * (acc_t(1) - fy), (acc_t(1) - fx) * fy, fx * fy};
  for (int k = 0; k < 4; ++k) {
    const int64_t xx = x0 + (k & 1), yy = y0 + (k >> 1);
    if (xx >= 0 && xx < W && yy >= 0 && yy < H) {
      t.off[k] = yy * sh + xx * sw;
      t.w[k] = wts[k];
      t.valid[k] = true;
    }
  }
}

// Nearest tap: returns false when the rounded point is outside the frame.
template <typename acc_t>
VOSOPS_HD bool nearest_tap(acc_t px, acc_t py, int64_t H, int64_t W, int64_t sh, int64_t sw, Padding pad,
                           int64_t& off) {
  off = 0;
  if (pad == Padding::Border) {
    acc_t unused;
    px = clip_coordinate(px, W, unused);
    py = clip_coordinate(py, H, unused);
  }
  const acc_t rx = rint_(px), ry = rint_(py);
  if (!(rx >= acc_t(0) && rx <= acc_t(W - 1) && ry >= acc_t(0) && ry <= acc_t(H - 1))) return false;
  off = static_cast<int64_t>(ry) * sh + static_cast<int64_t>(rx) * sw;
  return true;
}

// d(out)/d(px) and d(out)/d(py) of one channel, from the four tap values (0 for invalid taps).
template <typename acc_t>
VOSOPS_HD void bilinear_point_grad(const Taps<acc_t>& t, const acc_t v[4], acc_t& dpx, acc_t& dpy) {
  const acc_t fx = t.fx, fy = t.fy;
  dpx = ((v[1] - v[0]) * (acc_t(1) - fy) + (v[3] - v[2]) * fy) * t.gx_mult;
  dpy = ((v[2] - v[0]) * (acc_t(1) - fx) + (v[3] - v[1]) * fx) * t.gy_mult;
}

}  // namespace flow_warp
}  // namespace vosops
