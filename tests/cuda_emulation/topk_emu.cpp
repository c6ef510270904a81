// Host emulation of the merge_topk and topk_aggregate CUDA kernels, for tests on machines without a GPU: the CUDA
// keywords become host code and one emulated thread (grid and block of 1) walks every grid-stride loop. It checks
// the kernels' logic (ranking, padding, thresholds, softmax, gradients) - not races, occupancy or the glue.
#include "emulation.h"

#include "topk/merge_topk_cuda.cu"
#include "topk/topk_aggregate_cuda.cu"

using vosops::topk::Shape3;

namespace {

// The launchers' sequence of kernels, for T = float (fp32) or double.
template <typename T>
void merge(const T* logits, const int64_t* index, int64_t rows, int64_t N, int64_t topk, T* ol, int64_t* oi,
           int64_t* os) {
  vosops::topk::merge_topk_kernel<T, T>(logits, index, rows * N, N, topk, ol, oi, os);
}

template <typename T>
void aggregate(const T* logits, const int64_t* index, const T* values, const int64_t* vsz, int64_t M, int64_t K,
               int64_t kth, T* ws, T* out) {
  using namespace vosops::topk;
  const Shape3 vs = emu::shape<Shape3, 3>(vsz);
  const int64_t rows = vs.size[0] * M, Cv = vs.size[2];
  agg_weights_kernel<T, T>(logits, index, rows * K, K, vs.size[1], kth, ws);
  agg_forward_kernel<T, T>(ws, index, values, vs, rows * Cv, M, K, Cv, out);
}

template <typename T>
void aggregate_backward(const T* grad, const int64_t* gsz, const T* logits, const int64_t* index, const T* values,
                        const int64_t* vsz, int64_t M, int64_t K, int64_t kth, T* ws, T* gl, T* gv) {
  using namespace vosops::topk;
  const Shape3 vs = emu::shape<Shape3, 3>(vsz), gs = emu::shape<Shape3, 3>(gsz);
  const int64_t rows = vs.size[0] * M, L = vs.size[1], Cv = vs.size[2], n = rows * K;
  T *e = ws, *w = ws + n, *d = ws + 2 * n;
  agg_weights_kernel<T, T>(logits, index, n, K, L, kth, e);
  agg_backward_weights_kernel<T, T>(e, grad, gs, index, values, vs, n, M, K, Cv, gl != nullptr, w, d);
  if (gl != nullptr) agg_grad_logits_kernel<T, T>(w, d, n, K, gl);
  if (gv != nullptr) agg_grad_values_kernel<T, T>(w, grad, gs, index, n * Cv, M, K, L, Cv, gv);
}

}  // namespace

// double_ != 0: the pointers are double, else float. Strided tensors: sizes then strides (6 int64).
extern "C" int emu_merge(int double_, const void* logits, const int64_t* index, int64_t rows, int64_t N, int64_t topk,
                         void* ol, int64_t* oi, int64_t* os) {
  if (double_) {
    merge(static_cast<const double*>(logits), index, rows, N, topk, static_cast<double*>(ol), oi, os);
  } else {
    merge(static_cast<const float*>(logits), index, rows, N, topk, static_cast<float*>(ol), oi, os);
  }
  return 0;
}

extern "C" int emu_aggregate(int double_, const void* logits, const int64_t* index, const void* values,
                             const int64_t* vsz, int64_t M, int64_t K, int64_t kth, void* ws, void* out) {
  if (double_) {
    aggregate(static_cast<const double*>(logits), index, static_cast<const double*>(values), vsz, M, K, kth,
              static_cast<double*>(ws), static_cast<double*>(out));
  } else {
    aggregate(static_cast<const float*>(logits), index, static_cast<const float*>(values), vsz, M, K, kth,
              static_cast<float*>(ws), static_cast<float*>(out));
  }
  return 0;
}

extern "C" int emu_aggregate_backward(int double_, const void* grad, const int64_t* gsz, const void* logits,
                                      const int64_t* index, const void* values, const int64_t* vsz, int64_t M,
                                      int64_t K, int64_t kth, void* ws, void* gl, void* gv) {
  if (double_) {
    aggregate_backward(static_cast<const double*>(grad), gsz, static_cast<const double*>(logits), index,
                       static_cast<const double*>(values), vsz, M, K, kth, static_cast<double*>(ws),
                       static_cast<double*>(gl), static_cast<double*>(gv));
  } else {
    aggregate_backward(static_cast<const float*>(grad), gsz, static_cast<const float*>(logits), index,
                       static_cast<const float*>(values), vsz, M, K, kth, static_cast<float*>(ws),
                       static_cast<float*>(gl), static_cast<float*>(gv));
  }
  return 0;
}
