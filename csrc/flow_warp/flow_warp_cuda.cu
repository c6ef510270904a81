// flow_warp CUDA kernels (torch-free). Forward: one thread per (output pixel, group of kForwardChannels channels),
// pixels fastest, so for a fixed channel neighbouring threads read neighbouring inputs and write neighbouring
// outputs; a thread computes its pixel's taps once and issues its group's independent loads together (a thread per
// pixel over all channels left a 480p frame with half the threads an H200 can hold, each waiting on one channel at
// a time). Backward: one thread per output pixel.
// Backward: d(flow) is reduced over channels inside the thread; d(x) is scattered with atomics into an fp32
// (fp64 for double) accumulator; d(flow) is summed over channel groups in a fixed order.
#include <cstdint>

#include "common/cuda_types.cuh"
#include "flow_warp/flow_warp_cuda.cuh"

namespace vosops {
namespace flow_warp {
namespace {

constexpr int kThreads = 256;

struct PixelIndex {
  int64_t b, i, j;
};

__device__ __forceinline__ PixelIndex unravel(int64_t idx, int64_t H, int64_t W) {
  PixelIndex p;
  p.j = idx % W;
  const int64_t t = idx / W;
  p.i = t % H;
  p.b = t / H;
  return p;
}

template <typename T, typename acc_t>
__device__ __forceinline__ void sampling_point(const T* flow, const Shape4& fs, const PixelIndex& p, acc_t& px,
                                               acc_t& py) {
  const T* f = flow + p.b * fs.stride[0] + p.i * fs.stride[2] + p.j * fs.stride[3];
  px = static_cast<acc_t>(p.j) + to_acc(f[0]);
  py = static_cast<acc_t>(p.i) + to_acc(f[fs.stride[1]]);
}

constexpr int kForwardChannels = 8;

// Threads of the forward (its grid-stride loop's items): pixels x channel groups.
__host__ __device__ inline int64_t forward_items(const Shape4& xs) {
  return xs.size[0] * xs.size[2] * xs.size[3] * ((xs.size[1] + kForwardChannels - 1) / kForwardChannels);
}

template <typename T, Mode M>
__global__ void forward_kernel(const T* __restrict__ x, Shape4 xs, const T* __restrict__ flow, Shape4 fs,
                               T* __restrict__ out, Padding pad) {
  using acc_t = typename AccType<T>::type;
  const int64_t B = xs.size[0], C = xs.size[1], H = xs.size[2], W = xs.size[3];
  const int64_t plane = H * W, pixels = B * plane, items = forward_items(xs);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < items;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c0 = idx / pixels * kForwardChannels;
    const PixelIndex p = unravel(idx % pixels, H, W);
    acc_t px, py;
    sampling_point(flow, fs, p, px, py);
    const T* xb = x + p.b * xs.stride[0] + c0 * xs.stride[1];
    T* ob = out + (p.b * C + c0) * plane + p.i * W + p.j;
    const int nc = static_cast<int>(C - c0 < kForwardChannels ? C - c0 : kForwardChannels);
    if (M == Mode::Bilinear) {
      Taps<acc_t> t;
      bilinear_taps(px, py, H, W, xs.stride[2], xs.stride[3], pad, t);
#pragma unroll
      for (int c = 0; c < kForwardChannels; ++c) {
        if (c < nc) {
          const T* xc = xb + c * xs.stride[1];
          // out-of-frame taps are skipped, not multiplied by 0: a non-finite x there must not make a NaN
          acc_t v = acc_t(0);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (t.valid[k]) v += t.w[k] * to_acc(xc[t.off[k]]);
          }
          ob[c * plane] = from_acc<T>(v);
        }
      }
    } else {
      int64_t off;
      const bool valid = nearest_tap(px, py, H, W, xs.stride[2], xs.stride[3], pad, off);
#pragma unroll
      for (int c = 0; c < kForwardChannels; ++c) {
        if (c < nc) ob[c * plane] = valid ? xb[c * xs.stride[1] + off] : from_acc<T>(acc_t(0));
      }
    }
  }
}

// One thread per (output pixel, channel group), as the forward. d(x) is scattered with atomics; d(flow) needs a sum
// over all channels: with one group the thread writes it, else each group writes its partial sum to the workspace
// (groups, 2, pixels) and flow_grad_reduce adds the groups in order, so d(flow) stays deterministic.
template <typename T, Mode M>
__global__ void backward_kernel(const T* __restrict__ grad_out, Shape4 gs, const T* __restrict__ x, Shape4 xs,
                                const T* __restrict__ flow, Shape4 fs,
                                typename AccType<T>::type* __restrict__ grad_x, T* __restrict__ grad_flow,
                                typename AccType<T>::type* __restrict__ flow_partial, Padding pad) {
  using acc_t = typename AccType<T>::type;
  const int64_t B = xs.size[0], C = xs.size[1], H = xs.size[2], W = xs.size[3];
  const int64_t plane = H * W, pixels = B * plane, items = forward_items(xs);
  const bool one_group = C <= kForwardChannels;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < items;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t group = idx / pixels, pix = idx % pixels, c0 = group * kForwardChannels;
    const int nc = static_cast<int>(C - c0 < kForwardChannels ? C - c0 : kForwardChannels);
    const PixelIndex p = unravel(pix, H, W);
    acc_t px, py;
    sampling_point(flow, fs, p, px, py);
    const T* gb = grad_out + p.b * gs.stride[0] + c0 * gs.stride[1] + p.i * gs.stride[2] + p.j * gs.stride[3];
    acc_t* gxb = grad_x ? grad_x + (p.b * C + c0) * plane : nullptr;
    if (M == Mode::Bilinear) {
      Taps<acc_t> tx, ta;  // taps into x (its strides) and into the contiguous accumulator
      bilinear_taps(px, py, H, W, xs.stride[2], xs.stride[3], pad, tx);
      bilinear_taps(px, py, H, W, W, int64_t(1), pad, ta);
      const T* xg = x + p.b * xs.stride[0] + c0 * xs.stride[1];
      acc_t dx = acc_t(0), dy = acc_t(0);
#pragma unroll
      for (int c = 0; c < kForwardChannels; ++c) {
        if (c >= nc) continue;
        const acc_t g = to_acc(gb[c * gs.stride[1]]);
        if (gxb) {
          for (int k = 0; k < 4; ++k) {
            if (ta.valid[k]) atomicAdd(gxb + c * plane + ta.off[k], ta.w[k] * g);
          }
        }
        if (grad_flow) {
          const T* xc = xg + c * xs.stride[1];
          acc_t v[4];
          for (int k = 0; k < 4; ++k) v[k] = tx.valid[k] ? to_acc(xc[tx.off[k]]) : acc_t(0);
          acc_t dpx, dpy;
          bilinear_point_grad(tx, v, dpx, dpy);
          dx += g * dpx;
          dy += g * dpy;
        }
      }
      if (grad_flow && one_group) {
        T* gf = grad_flow + p.b * 2 * plane + p.i * W + p.j;
        gf[0] = from_acc<T>(dx);
        gf[plane] = from_acc<T>(dy);
      } else if (grad_flow) {
        flow_partial[(group * 2) * pixels + pix] = dx;
        flow_partial[(group * 2 + 1) * pixels + pix] = dy;
      }
    } else if (gxb) {
      int64_t off;
      if (nearest_tap(px, py, H, W, W, int64_t(1), pad, off)) {
#pragma unroll
        for (int c = 0; c < kForwardChannels; ++c) {
          if (c < nc) atomicAdd(gxb + c * plane + off, to_acc(gb[c * gs.stride[1]]));
        }
      }
    }
  }
}

// grad_flow[b, a, i, j] = sum over groups (in order) of flow_partial[group, a, pixel].
template <typename T>
__global__ void flow_grad_reduce(const typename AccType<T>::type* __restrict__ flow_partial, int64_t groups,
                                 int64_t B, int64_t plane, T* __restrict__ grad_flow) {
  using acc_t = typename AccType<T>::type;
  const int64_t pixels = B * plane;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < 2 * pixels;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t a = idx / pixels, pix = idx % pixels;
    acc_t sum = acc_t(0);
    for (int64_t g = 0; g < groups; ++g) sum += flow_partial[(g * 2 + a) * pixels + pix];
    grad_flow[(pix / plane * 2 + a) * plane + pix % plane] = from_acc<T>(sum);
  }
}

// Workspace bytes of the backward: the d(flow) partials of each channel group (none with one group).
__host__ __device__ inline int64_t flow_partial_elements(const Shape4& xs, bool grad_flow) {
  const int64_t groups = (xs.size[1] + kForwardChannels - 1) / kForwardChannels;
  return grad_flow && groups > 1 ? groups * 2 * xs.size[0] * xs.size[2] * xs.size[3] : 0;
}

#ifndef VOSOPS_CUDA_EMULATION
template <typename T>
cudaError_t launch_forward(const void* x, Shape4 xs, const void* flow, Shape4 fs, void* out, Mode mode, Padding pad,
                           cudaStream_t stream) {
  const int64_t items = forward_items(xs);
  if (items == 0) return cudaSuccess;
  const T* xp = static_cast<const T*>(x);
  const T* fp = static_cast<const T*>(flow);
  T* op = static_cast<T*>(out);
  const unsigned int blocks = grid_stride_blocks(items, kThreads);
  if (mode == Mode::Bilinear) {
    forward_kernel<T, Mode::Bilinear><<<blocks, kThreads, 0, stream>>>(xp, xs, fp, fs, op, pad);
  } else {
    forward_kernel<T, Mode::Nearest><<<blocks, kThreads, 0, stream>>>(xp, xs, fp, fs, op, pad);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* grad_out, Shape4 gs, const void* x, Shape4 xs, const void* flow, Shape4 fs,
                            void* grad_x, void* grad_flow, void* workspace, Mode mode, Padding pad,
                            cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const int64_t items = forward_items(xs);
  if (items == 0 || (!grad_x && !grad_flow)) return cudaSuccess;
  const T* gp = static_cast<const T*>(grad_out);
  const T* xp = static_cast<const T*>(x);
  const T* fp = static_cast<const T*>(flow);
  acc_t* gx = static_cast<acc_t*>(grad_x);
  T* gf = static_cast<T*>(grad_flow);
  acc_t* partial = static_cast<acc_t*>(workspace);
  const unsigned int blocks = grid_stride_blocks(items, kThreads);
  if (mode == Mode::Bilinear) {
    backward_kernel<T, Mode::Bilinear><<<blocks, kThreads, 0, stream>>>(gp, gs, xp, xs, fp, fs, gx, gf, partial, pad);
  } else {
    backward_kernel<T, Mode::Nearest><<<blocks, kThreads, 0, stream>>>(gp, gs, xp, xs, fp, fs, gx, nullptr, nullptr,
                                                                        pad);
  }
  cudaError_t err = cudaGetLastError();
  const int64_t partials = flow_partial_elements(xs, gf != nullptr && mode == Mode::Bilinear);
  if (err != cudaSuccess || partials == 0) return err;
  const int64_t plane = xs.size[2] * xs.size[3];
  flow_grad_reduce<T><<<grid_stride_blocks(2 * xs.size[0] * plane, kThreads), kThreads, 0, stream>>>(
      partial, partials / (2 * xs.size[0] * plane), xs.size[0], plane, gf);
  return cudaGetLastError();
}
#endif  // VOSOPS_CUDA_EMULATION

}  // namespace

size_t backward_workspace_bytes(DType dtype, Shape4 xs, bool grad_flow) {
  const size_t acc = dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(flow_partial_elements(xs, grad_flow)) * acc;
}

#ifndef VOSOPS_CUDA_EMULATION
cudaError_t forward_cuda(DType dtype, const void* x, Shape4 xs, const void* flow, Shape4 fs, void* out, Mode mode,
                         Padding pad, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return launch_forward<float>(x, xs, flow, fs, out, mode, pad, stream);
    case DType::Float64: return launch_forward<double>(x, xs, flow, fs, out, mode, pad, stream);
    case DType::Float16: return launch_forward<__half>(x, xs, flow, fs, out, mode, pad, stream);
    case DType::BFloat16: return launch_forward<__nv_bfloat16>(x, xs, flow, fs, out, mode, pad, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward_cuda(DType dtype, const void* grad_out, Shape4 gs, const void* x, Shape4 xs, const void* flow,
                          Shape4 fs, void* grad_x_acc, void* grad_flow, void* workspace, Mode mode, Padding pad,
                          cudaStream_t stream) {
  VOSOPS_CUDA_DISPATCH(dtype, launch_backward<T>(grad_out, gs, x, xs, flow, fs, grad_x_acc, grad_flow, workspace,
                                                 mode, pad, stream))
}

#endif  // VOSOPS_CUDA_EMULATION

}  // namespace flow_warp
}  // namespace vosops
