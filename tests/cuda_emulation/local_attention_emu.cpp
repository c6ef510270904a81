// Host emulation of the local_attention CUDA kernels, for tests on machines without a GPU: the CUDA keywords and
// intrinsics become host code, and both kernels run with the launchers' geometry, a host thread per CUDA thread
// (block_emulation.h: their teams of lanes shuffle). It checks the kernels' logic (indexing, selection, softmax,
// backward) - not occupancy or glue.
#include "block_emulation.h"

#include "local_attention/local_attention_cuda.cu"

using vosops::local_attention::CudaProblem;
using vosops::local_attention::Normalize;

static CudaProblem problem(const int64_t* sizes, float scale, int64_t topk, int normalize, int zero_border,
                           const float* q, const float* k, const float* v, const int32_t* off, const int32_t* cols) {
  CudaProblem p;
  p.B = sizes[0];
  p.N = sizes[1];
  p.C = sizes[2];
  p.Cv = sizes[3];
  p.H = sizes[4];
  p.W = sizes[5];
  p.radius = sizes[6];
  p.dilation = sizes[7];
  p.P = sizes[8];
  p.Q = sizes[9];
  p.scale = scale;
  p.topk = topk;
  p.normalize = normalize ? Normalize::Threshold : Normalize::Softmax;
  p.zero_border = zero_border != 0;
  p.q = q;
  p.k = k;
  p.v = v;
  p.offsets = off;
  p.cols = cols;
  return p;
}

// sizes: B, N, C, Cv, H, W, radius, dilation, P, Q. Layouts as in local_attention_cuda.cuh.
extern "C" int emu_forward(const int64_t* sizes, float scale, int64_t topk, int normalize, int zero_border,
                           const float* q, const float* k, const float* v, const int32_t* off, const int32_t* cols,
                           float* out, float* stats, float* top_logits, int64_t* top_index) {
  using namespace vosops::local_attention;
  const CudaProblem p = problem(sizes, scale, topk, normalize, zero_border, q, k, v, off, cols);
  if (topk > kCudaMaxTopk) return 1;
  const unsigned grid = team_blocks(p.B * p.H * p.W);
  const bool ok = emu::launch(grid, 1, kThreads, 0, [&] {
    if (topk == 0) {
      forward_kernel<0>(p, out, stats, top_logits, top_index);
    } else if (topk <= 8) {
      forward_kernel<8>(p, out, stats, top_logits, top_index);
    } else if (topk <= 16) {
      forward_kernel<16>(p, out, stats, top_logits, top_index);
    } else if (topk <= 64) {
      forward_kernel<64>(p, out, stats, top_logits, top_index);
    } else {
      forward_kernel<kCudaMaxTopk>(p, out, stats, top_logits, top_index);
    }
  });
  return ok ? 0 : 1;
}

extern "C" int emu_backward(const int64_t* sizes, float scale, int64_t topk, int normalize, int zero_border,
                            const float* q, const float* k, const float* v, const int32_t* off, const int32_t* cols,
                            const float* grad_out, const float* grad_logits, const float* stats,
                            const int64_t* top_index, float* dq, float* dk, float* dv) {
  using namespace vosops::local_attention;
  const CudaProblem p = problem(sizes, scale, topk, normalize, zero_border, q, k, v, off, cols);
  const bool ok = emu::launch(team_blocks(p.B * p.H * p.W), 1, kThreads, 0, [&] {
    backward_kernel(p, grad_out, grad_logits, stats, top_index, dq, dk, dv);
  });
  return ok ? 0 : 1;
}
