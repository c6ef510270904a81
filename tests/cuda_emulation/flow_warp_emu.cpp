// Host emulation of the flow_warp CUDA kernels (csrc/flow_warp/flow_warp_cuda.cu), for tests on machines without a
// GPU: every CUDA thread is a host thread (block_emulation.h), so the backward's atomics into d(x) really contend;
// the geometry is the launchers' (kThreads per block, grid_stride_blocks).
#include "block_emulation.h"

#include "flow_warp/flow_warp_cuda.cu"

namespace {

using vosops::Shape4;
using vosops::flow_warp::Mode;
using vosops::flow_warp::Padding;

template <typename T>
int forward(const T* x, const int64_t* xsz, const T* flow, const int64_t* fsz, T* out, int mode, int pad) {
  using namespace vosops::flow_warp;
  const Shape4 xs = emu::shape<Shape4, 4>(xsz), fs = emu::shape<Shape4, 4>(fsz);
  const unsigned blocks = vosops::grid_stride_blocks(xs.size[0] * xs.size[2] * xs.size[3], kThreads);
  return emu::launch(blocks, 1, kThreads, 0, [&] {
    if (static_cast<Mode>(mode) == Mode::Bilinear) {
      forward_kernel<T, Mode::Bilinear>(x, xs, flow, fs, out, static_cast<Padding>(pad));
    } else {
      forward_kernel<T, Mode::Nearest>(x, xs, flow, fs, out, static_cast<Padding>(pad));
    }
  }) ? 0 : 1;
}

template <typename T>
int backward(const T* g, const int64_t* gsz, const T* x, const int64_t* xsz, const T* flow, const int64_t* fsz,
             T* grad_x, T* grad_flow, int mode, int pad) {
  using namespace vosops::flow_warp;
  const Shape4 gs = emu::shape<Shape4, 4>(gsz), xs = emu::shape<Shape4, 4>(xsz);
  const Shape4 fs = emu::shape<Shape4, 4>(fsz);
  const unsigned blocks = vosops::grid_stride_blocks(xs.size[0] * xs.size[2] * xs.size[3], kThreads);
  return emu::launch(blocks, 1, kThreads, 0, [&] {
    if (static_cast<Mode>(mode) == Mode::Bilinear) {
      backward_kernel<T, Mode::Bilinear>(g, gs, x, xs, flow, fs, grad_x, grad_flow, static_cast<Padding>(pad));
    } else {
      backward_kernel<T, Mode::Nearest>(g, gs, x, xs, flow, fs, grad_x, nullptr, static_cast<Padding>(pad));
    }
  }) ? 0 : 1;
}

}  // namespace

// double_ != 0: double tensors, else float. Tensors: sizes then strides. mode: 0 bilinear, 1 nearest; pad: 0 zeros,
// 1 border. grad_x: a zeroed contiguous accumulator; grad_flow: contiguous (bilinear only).
extern "C" int emu_flow_warp_forward(int double_, const void* x, const int64_t* xs, const void* flow,
                                     const int64_t* fs, void* out, int mode, int pad) {
  if (double_) {
    return forward(static_cast<const double*>(x), xs, static_cast<const double*>(flow), fs, static_cast<double*>(out),
                   mode, pad);
  }
  return forward(static_cast<const float*>(x), xs, static_cast<const float*>(flow), fs, static_cast<float*>(out), mode,
                 pad);
}

extern "C" int emu_flow_warp_backward(int double_, const void* g, const int64_t* gs, const void* x, const int64_t* xs,
                                      const void* flow, const int64_t* fs, void* grad_x, void* grad_flow, int mode,
                                      int pad) {
  if (double_) {
    using D = double;
    return backward(static_cast<const D*>(g), gs, static_cast<const D*>(x), xs, static_cast<const D*>(flow), fs,
                    static_cast<D*>(grad_x), static_cast<D*>(grad_flow), mode, pad);
  }
  using F = float;
  return backward(static_cast<const F*>(g), gs, static_cast<const F*>(x), xs, static_cast<const F*>(flow), fs,
                  static_cast<F*>(grad_x), static_cast<F*>(grad_flow), mode, pad);
}
