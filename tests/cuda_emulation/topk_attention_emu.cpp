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
using Acc = typename vosops::AccType<T>::type;

template <typename T>
int global_topk(const void* q, const int64_t* qsz, const void* k, const int64_t* ksz, const bool* mask, int64_t topk,
                double scale, void* out_l, int64_t* out_i) {
  using namespace vosops::topk;
  const Shape3 qs = emu::shape<Shape3, 3>(qsz), ks = emu::shape<Shape3, 3>(ksz);
  const auto grid_x = static_cast<unsigned>((qs.size[1] + kQT - 1) / kQT), grid_y = static_cast<unsigned>(qs.size[0]);
  const bool ok = emu::launch(grid_x, grid_y, kThreads, global_topk_smem<Acc<T>>(topk, qs.size[2]), [&] {
    global_topk_kernel<T>(static_cast<const T*>(q), qs, static_cast<const T*>(k), ks, mask, topk, scale,
                          static_cast<T*>(out_l), out_i);
  });
  return ok ? 0 : 1;
}

template <typename T>
int attention_forward(const void* q, const int64_t* qsz, const void* k, const int64_t* ksz, const void* v,
                      const int64_t* vsz, int64_t dense, int64_t kk, double scale, void* out, void* lse,
                      int64_t* index) {
  using namespace vosops::topk;
  const Shape4 qs = emu::shape<Shape4, 4>(qsz), ks = emu::shape<Shape4, 4>(ksz), vs = emu::shape<Shape4, 4>(vsz);
  const auto grid_x = static_cast<unsigned>((qs.size[2] + kQT - 1) / kQT);
  const auto grid_y = static_cast<unsigned>(qs.size[0] * qs.size[1]);
  const size_t smem = attention_forward_smem<Acc<T>>(kk, qs.size[3], vs.size[3]);
  const bool ok = emu::launch(grid_x, grid_y, kThreads, smem, [&] {
    attention_forward_kernel<T>(static_cast<const T*>(q), qs, static_cast<const T*>(k), ks, static_cast<const T*>(v),
                                vs, dense, kk, scale, static_cast<T*>(out), static_cast<Acc<T>*>(lse), index);
  });
  return ok ? 0 : 1;
}

template <typename T>
int attention_backward(const void* g, const int64_t* gsz, const void* q, const int64_t* qsz, const void* k,
                       const int64_t* ksz, const void* v, const int64_t* vsz, const void* o, const void* lse,
                       const int64_t* index, int64_t dense, int64_t kk, double scale, void* dq, void* dk, void* dv) {
  using namespace vosops::topk;
  const Shape4 gs = emu::shape<Shape4, 4>(gsz), qs = emu::shape<Shape4, 4>(qsz), ks = emu::shape<Shape4, 4>(ksz),
               vs = emu::shape<Shape4, 4>(vsz);
  const auto grid_x = static_cast<unsigned>((qs.size[2] + kQT - 1) / kQT);
  const auto grid_y = static_cast<unsigned>(qs.size[0] * qs.size[1]);
  const bool ok = emu::launch(grid_x, grid_y, kThreads, attention_backward_smem<Acc<T>>(qs.size[3], vs.size[3]), [&] {
    attention_backward_kernel<T>(static_cast<const T*>(g), gs, static_cast<const T*>(q), qs, static_cast<const T*>(k),
                                 ks, static_cast<const T*>(v), vs, static_cast<const T*>(o),
                                 static_cast<const Acc<T>*>(lse), index, dense, kk, scale, static_cast<Acc<T>*>(dq),
                                 static_cast<Acc<T>*>(dk), static_cast<Acc<T>*>(dv));
  });
  return ok ? 0 : 1;
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. lse, dq, dk, dv are in the accumulation type (float64 for
// float64, else float32). Tensors: sizes then strides. Returns 0; 1 when the shared memory asked for exceeds the
// emulation's buffer; 2 for an unknown dtype.
extern "C" int emu_global_topk(int dtype, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                               const bool* mask, int64_t topk, double scale, void* out_l, int64_t* out_i) {
  EMU_DISPATCH(dtype, global_topk<T>(q, qs, k, ks, mask, topk, scale, out_l, out_i))
}

extern "C" int emu_attention_forward(int dtype, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                     const void* v, const int64_t* vs, int64_t dense, int64_t kk, double scale,
                                     void* out, void* lse, int64_t* index) {
  EMU_DISPATCH(dtype, attention_forward<T>(q, qs, k, ks, v, vs, dense, kk, scale, out, lse, index))
}

extern "C" int emu_attention_backward(int dtype, const void* g, const int64_t* gs, const void* q, const int64_t* qs,
                                      const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                                      const void* o, const void* lse, const int64_t* index, int64_t dense, int64_t kk,
                                      double scale, void* dq, void* dk, void* dv) {
  EMU_DISPATCH(dtype, attention_backward<T>(g, gs, q, qs, k, ks, v, vs, o, lse, index, dense, kk, scale, dq, dk, dv))
}
