// Host emulation of the local_affinity CUDA kernels (scores, gather, scatter) for tests on machines without a GPU:
// the CUDA keywords and intrinsics become host code and one emulated thread walks every grid-stride loop.
// It checks the kernels' logic (indexing, windows, borders, offsets) - not races, occupancy or the glue.
#include "emulation.h"

#include "local_attention/local_affinity_cuda.cu"

using vosops::local_affinity::Geometry;

// sizes: B, N, H, W, radius, dilation, circle. off: rounded int32 (B, N, 2, H, W) or null.
static Geometry geometry(const int64_t* s, const int32_t* off) {
  const int64_t D = 2 * s[4] + 1;
  return Geometry{s[0], s[1], s[2], s[3], s[4], s[5], D * D, s[6] != 0, off};
}

extern "C" void emu_scores(const int64_t* sizes, const int32_t* off, const float* a, const float* x, int64_t C,
                           float scale, float fill, float* out) {
  vosops::local_affinity::scores_kernel(geometry(sizes, off), a, x, C, scale, fill, out);
}

extern "C" void emu_gather(const int64_t* sizes, const int32_t* off, const float* w, const float* x, int64_t C,
                           float scale, float* out) {
  vosops::local_affinity::gather_kernel(geometry(sizes, off), w, x, C, scale, out);
}

extern "C" void emu_scatter(const int64_t* sizes, const int32_t* off, const float* w, const float* a, int64_t C,
                            float scale, float* out) {
  vosops::local_affinity::scatter_kernel(geometry(sizes, off), w, a, C, scale, out);
}
