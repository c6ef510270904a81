// Host emulation of the flow_warp CUDA kernels (csrc/flow_warp/flow_warp_cuda.cu), for tests on machines without a
// GPU: every CUDA thread is a host thread (block_emulation.h), so the backward's atomics into d(x) really contend;
// the geometry is the launchers' (kThreads per block, grid_stride_blocks over their items).
#include <vector>

#include "block_emulation.h"

#include "flow_warp/flow_warp_cuda.cu"

namespace {

using vosops::Shape4;
using vosops::flow_warp::Mode;
using vosops::flow_warp::Padding;

template <typename T>
int forward(const void* x, const int64_t* xsz, const void* flow, const int64_t* fsz, void* out, int mode, int pad) {
  using namespace vosops::flow_warp;
  const Shape4 xs = emu::shape<Shape4, 4>(xsz), fs = emu::shape<Shape4, 4>(fsz);
  const unsigned blocks = vosops::grid_stride_blocks(forward_items(xs), kThreads);
  const T *xp = static_cast<const T*>(x), *fp = static_cast<const T*>(flow);
  T* op = static_cast<T*>(out);
  return emu::launch(blocks, 1, kThreads, 0, [&] {
    if (static_cast<Mode>(mode) == Mode::Bilinear) {
      forward_kernel<T, Mode::Bilinear>(xp, xs, fp, fs, op, static_cast<Padding>(pad));
    } else {
      forward_kernel<T, Mode::Nearest>(xp, xs, fp, fs, op, static_cast<Padding>(pad));
    }
  }) ? 0 : 1;
}

template <typename T>
int backward(const void* g, const int64_t* gsz, const void* x, const int64_t* xsz, const void* flow,
             const int64_t* fsz, void* grad_x, void* grad_flow, int mode, int pad) {
  using namespace vosops::flow_warp;
  using acc_t = typename vosops::AccType<T>::type;
  const Shape4 gs = emu::shape<Shape4, 4>(gsz), xs = emu::shape<Shape4, 4>(xsz);
  const Shape4 fs = emu::shape<Shape4, 4>(fsz);
  const unsigned blocks = vosops::grid_stride_blocks(forward_items(xs), kThreads);
  const T *gp = static_cast<const T*>(g), *xp = static_cast<const T*>(x), *fp = static_cast<const T*>(flow);
  acc_t* gx = static_cast<acc_t*>(grad_x);
  T* gf = static_cast<T*>(grad_flow);
  const bool bilinear = static_cast<Mode>(mode) == Mode::Bilinear;
  std::vector<acc_t> partial(static_cast<size_t>(flow_partial_elements(xs, bilinear && gf != nullptr)));
  const bool ok = emu::launch(blocks, 1, kThreads, 0, [&] {
    if (bilinear) {
      backward_kernel<T, Mode::Bilinear>(gp, gs, xp, xs, fp, fs, gx, gf, partial.data(), static_cast<Padding>(pad));
    } else {
      backward_kernel<T, Mode::Nearest>(gp, gs, xp, xs, fp, fs, gx, nullptr, nullptr, static_cast<Padding>(pad));
    }
  });
  if (!ok) return 1;
  if (partial.empty()) return 0;
  const int64_t plane = xs.size[2] * xs.size[3], pixels = xs.size[0] * plane;
  return emu::launch(vosops::grid_stride_blocks(2 * pixels, kThreads), 1, kThreads, 0, [&] {
    flow_grad_reduce<T>(partial.data(), static_cast<int64_t>(partial.size()) / (2 * pixels), xs.size[0], plane, gf);
  }) ? 0 : 1;
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. Tensors: sizes then strides. mode: 0 bilinear, 1 nearest;
// pad: 0 zeros, 1 border. grad_x: a zeroed contiguous accumulator in the accumulation type (float64 for float64,
// else float32); grad_flow: contiguous, the element type (bilinear only).
extern "C" int emu_flow_warp_forward(int dtype, const void* x, const int64_t* xs, const void* flow, const int64_t* fs,
                                     void* out, int mode, int pad) {
  EMU_DISPATCH(dtype, forward<T>(x, xs, flow, fs, out, mode, pad))
}

extern "C" int emu_flow_warp_backward(int dtype, const void* g, const int64_t* gs, const void* x, const int64_t* xs,
                                      const void* flow, const int64_t* fs, void* grad_x, void* grad_flow, int mode,
                                      int pad) {
  EMU_DISPATCH(dtype, backward<T>(g, gs, x, xs, flow, fs, grad_x, grad_flow, mode, pad))
}
