// flow_warp's per-pixel sampling math, torch-free: shared by the CPU kernels and the CUDA kernels so both compute
// exactly F.grid_sample(align_corners=True) on the grid (j + dx, i + dy), in pixel units.
#pragma once
#include <math.h>

#include "common/host_device.h"

namespace vosops {
namespace flow_warp {

enum class Mode : int { Bilinear = 0, Nearest = 1 };
enum class Padding : int { Zeros = 0, Border = 1 };

VOSOPS_HD float floor_(float v) { return floorf(v); }
VOSOPS_HD double floor_(double v) { return floor(v); }
// Round half to even (the default rounding mode), as grid_sample's nearest mode does with nearbyint.
VOSOPS_HD float rint_(float v) { return rintf(v); }
VOSOPS_HD double rint_(double v) { return rint(v); }

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
  if (!(px > acc_t(-1) && px < acc_t(W) && py > acc_t(-1) && py < acc_t(H))) return;
  const acc_t x0f = floor_(px), y0f = floor_(py);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const acc_t fx = px - x0f, fy = py - y0f;
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
