// local_affinity / local_aggregate math shared by the CPU (.cpp) and CUDA (.cu) kernels: torch-free.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace vosops {
namespace local_affinity {

// The candidate geometry of one call (every kernel of both ops, CPU and CUDA).
struct Geometry {
  int64_t B, N, H, W, radius, dilation, P;  // P = (2r+1)^2
  bool circle;                             // skip the columns outside a circle window
  const int32_t* offsets;                  // rounded offsets (B, N, 2, H, W) contiguous (dx, dy), or null
};

// Is window column p = (dy+r)(2r+1) + (dx+r) kept? Square: all; circle: dy^2 + dx^2 < r^2 (strict).
VOSOPS_HD bool in_window(int64_t p, int64_t radius, bool circle) {
  if (!circle) return true;
  const int64_t D = 2 * radius + 1, dy = p / D - radius, dx = p % D - radius;
  return dy * dy + dx * dx < radius * radius;
}

// Flat key position y*W + x of window column p for query (i, j) displaced by the rounded offset (oy, ox), or -1
// when it falls outside the H x W frame.
VOSOPS_HD int64_t candidate_pos(int64_t i, int64_t j, int64_t oy, int64_t ox, int64_t p, int64_t radius,
                                int64_t dilation, int64_t H, int64_t W) {
  const int64_t D = 2 * radius + 1;
  const int64_t y = i + oy + (p / D - radius) * dilation, x = j + ox + (p % D - radius) * dilation;
  return (y >= 0 && y < H && x >= 0 && x < W) ? y * W + x : -1;
}

}  // namespace local_affinity
}  // namespace vosops
