// Host emulation of the global_topk and topk_attention CUDA kernels (csrc/topk/topk_cuda.cu), for tests on
// machines without a GPU. These kernels cooperate within a block (shared-memory running lists, warp ballots and
// shuffles, __syncthreads), so every CUDA thread is a host thread (block_emulation.h). Launch geometry and shared
// memory sizes are the launchers' (the *_smem helpers, kThreads, kQT).
#include "block_emulation.h"

#include "topk/topk_cuda.cu"

using vosops::Shape4;
using vosops::topk::Shape3;

namespace {

template <typename T>
int global_topk(const T* q, const int64_t* qsz, const T* k, const int64_t* ksz, const bool* mask, int64_t topk,
                double scale, T* out_l, int64_t* out_i) {
  using namespace vosops::topk;
  const Shape3 qs = emu::shape<Shape3, 3>(qsz), ks = emu::shape<Shape3, 3>(ksz);
  const auto grid_x = static_cast<unsigned>((qs.size[1] + kQT - 1) / kQT), grid_y = static_cast<unsigned>(qs.size[0]);
  const bool ok = emu::launch(grid_x, grid_y, kThreads, global_topk_smem<T>(topk, qs.size[2]), [&] {
    global_topk_kernel<T>(q, qs, k, ks, mask, topk, scale, out_l, out_i);
  });
  return ok ? 0 : 1;
}

template <typename T>
int attention_forward(const T* q, const int64_t* qsz, const T* k, const int64_t* ksz, const T* v, const int64_t* vsz,
                      int64_t dense, int64_t kk, double scale, T* out, T* lse, int64_t* index) {
  using namespace vosops::topk;
  const Shape4 qs = emu::shape<Shape4, 4>(qsz), ks = emu::shape<Shape4, 4>(ksz), vs = emu::shape<Shape4, 4>(vsz);
  const auto grid_x = static_cast<unsigned>((qs.size[2] + kQT - 1) / kQT);
  const auto grid_y = static_cast<unsigned>(qs.size[0] * qs.size[1]);
  const bool ok = emu::launch(grid_x, grid_y, kThreads, attention_forward_smem<T>(kk, qs.size[3], vs.size[3]), [&] {
    attention_forward_kernel<T>(q, qs, k, ks, v, vs, dense, kk, scale, out, lse, index);
  });
  return ok ? 0 : 1;
}

template <typename T>
int attention_backward(const T* g, const int64_t* gsz, const T* q, const int64_t* qsz, const T* k, const int64_t* ksz,
                       const T* v, const int64_t* vsz, const T* o, const T* lse, const int64_t* index, int64_t dense,
                       int64_t kk, double scale, T* dq, T* dk, T* dv) {
  using namespace vosops::topk;
  const Shape4 gs = emu::shape<Shape4, 4>(gsz), qs = emu::shape<Shape4, 4>(qsz), ks = emu::shape<Shape4, 4>(ksz),
               vs = emu::shape<Shape4, 4>(vsz);
  const auto grid_x = static_cast<unsigned>((qs.size[2] + kQT - 1) / kQT);
  const auto grid_y = static_cast<unsigned>(qs.size[0] * qs.size[1]);
  const bool ok = emu::launch(grid_x, grid_y, kThreads, attention_backward_smem<T>(qs.size[3], vs.size[3]), [&] {
    attention_backward_kernel<T>(g, gs, q, qs, k, ks, v, vs, o, lse, index, dense, kk, scale, dq, dk, dv);
  });
  return ok ? 0 : 1;
}

}  // namespace

// double_ != 0: the tensors are double (the accumulation type too), else float. Tensors: sizes then strides.
// Returns 0, or 1 when the shared memory asked for exceeds the emulation's buffer.
extern "C" int emu_global_topk(int double_, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                               const bool* mask, int64_t topk, double scale, void* out_l, int64_t* out_i) {
  if (double_) {
    return global_topk(static_cast<const double*>(q), qs, static_cast<const double*>(k), ks, mask, topk, scale,
                       static_cast<double*>(out_l), out_i);
  }
  return global_topk(static_cast<const float*>(q), qs, static_cast<const float*>(k), ks, mask, topk, scale,
                     static_cast<float*>(out_l), out_i);
}

extern "C" int emu_attention_forward(int double_, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                     const void* v, const int64_t* vs, int64_t dense, int64_t kk, double scale,
                                     void* out, void* lse, int64_t* index) {
  if (double_) {
    return attention_forward(static_cast<const double*>(q), qs, static_cast<const double*>(k), ks,
                             static_cast<const double*>(v), vs, dense, kk, scale, static_cast<double*>(out),
                             static_cast<double*>(lse), index);
  }
  return attention_forward(static_cast<const float*>(q), qs, static_cast<const float*>(k), ks,
                           static_cast<const float*>(v), vs, dense, kk, scale, static_cast<float*>(out),
                           static_cast<float*>(lse), index);
}

extern "C" int emu_attention_backward(int double_, const void* g, const int64_t* gs, const void* q, const int64_t* qs,
                                      const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                                      const void* o, const void* lse, const int64_t* index, int64_t dense, int64_t kk,
                                      double scale, void* dq, void* dk, void* dv) {
  if (double_) {
    using D = double;
    return attention_backward(static_cast<const D*>(g), gs, static_cast<const D*>(q), qs, static_cast<const D*>(k),
                              ks, static_cast<const D*>(v), vs, static_cast<const D*>(o), static_cast<const D*>(lse),
                              index, dense, kk, scale, static_cast<D*>(dq), static_cast<D*>(dk), static_cast<D*>(dv));
  }
  using F = float;
  return attention_backward(static_cast<const F*>(g), gs, static_cast<const F*>(q), qs, static_cast<const F*>(k), ks,
                            static_cast<const F*>(v), vs, static_cast<const F*>(o), static_cast<const F*>(lse), index,
                            dense, kk, scale, static_cast<F*>(dq), static_cast<F*>(dk), static_cast<F*>(dv));
}
