// flow_warp: op schemas and the CPU kernels.
//
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/native.h"
#include "flow_warp/flow_warp.h"

namespace vosops {
namespace flow_warp {
namespace {

template <typename scalar_t, typename acc_t>
inline void sampling_point(const scalar_t* flow, const Shape4& fs, int64_t b, int64_t i, int64_t j, acc_t& px,
                           acc_t& py) {
  const int64_t fo = b * fs.stride[0] + i * fs.stride[2] + j * fs.stride[3];
  px = acc_t(j) + static_cast<acc_t>(flow[fo]);
  py = acc_t(i) + static_cast<acc_t>(flow[fo + fs.stride[1]]);
}

// Pixel-outer, channel-inner: a pixel's taps stay in registers while its channels are gathered, so each output
// costs four loads and a store. Neighbouring pixels reuse the same cache lines of every channel plane.
template <typename scalar_t>
void forward_cpu(const at::Tensor& x, const at::Tensor& flow, at::Tensor& out, Mode mode, Padding pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape4 xs = shape4(x), fs = shape4(flow);
  const int64_t B = xs.size[0], C = xs.size[1], H = xs.size[2], W = xs.size[3], HW = H * W;
  const int64_t sc = xs.stride[1];
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* fp = flow.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, i = row % H;
      const scalar_t* xb = xp + b * xs.stride[0];
      for (int64_t j = 0; j < W; ++j) {
        acc_t px, py;
        sampling_point(fp, fs, b, i, j, px, py);
        scalar_t* o = op + b * C * HW + i * W + j;
        if (mode == Mode::Bilinear) {
          Taps<acc_t> t;
          bilinear_taps(px, py, H, W, xs.stride[2], xs.stride[3], pad, t);
          const acc_t w0 = t.w[0], w1 = t.w[1], w2 = t.w[2], w3 = t.w[3];
          const scalar_t *x0 = xb + t.off[0], *x1 = xb + t.off[1], *x2 = xb + t.off[2], *x3 = xb + t.off[3];
          for (int64_t c = 0; c < C; ++c) {
            const int64_t k = c * sc;
            o[c * HW] = static_cast<scalar_t>(w0 * acc_t(x0[k]) + w1 * acc_t(x1[k]) + w2 * acc_t(x2[k]) +
                                              w3 * acc_t(x3[k]));
          }
        } else {
          int64_t off;
          if (nearest_tap(px, py, H, W, xs.stride[2], xs.stride[3], pad, off)) {
            for (int64_t c = 0; c < C; ++c) o[c * HW] = xb[off + c * sc];
          } else {
            for (int64_t c = 0; c < C; ++c) o[c * HW] = scalar_t(0);
          }
        }
      }
    }
  });
}

// One pass for both gradients. d(x) is a scatter, so work is split by (batch, block of channels): no two tasks
// write the same plane. Each task sums its channels' share of d(flow) into a private partial, reduced at the end.
template <typename scalar_t>
void backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& flow,
                  at::opmath_type<scalar_t>* gx, at::Tensor* gflow, Mode mode, Padding pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape4 xs = shape4(x), fs = shape4(flow), gs = shape4(grad_out);
  const int64_t B = xs.size[0], C = xs.size[1], H = xs.size[2], W = xs.size[3], HW = H * W;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* fp = flow.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const bool want_flow = gflow != nullptr && mode == Mode::Bilinear;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(C, at::get_num_threads()));
  std::vector<acc_t> partial(want_flow ? static_cast<size_t>(nchunks * B * 2 * HW) : 0);
  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, k = task % nchunks;
      const int64_t c0 = C * k / nchunks, c1 = C * (k + 1) / nchunks;
      acc_t* dflow = want_flow ? partial.data() + (k * B + b) * 2 * HW : nullptr;
      const scalar_t* xb = xp + b * xs.stride[0];
      const scalar_t* gb = gp + b * gs.stride[0];
      acc_t* gxb = gx ? gx + b * C * HW : nullptr;
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          acc_t px, py;
          sampling_point(fp, fs, b, i, j, px, py);
          const scalar_t* g = gb + i * gs.stride[2] + j * gs.stride[3];
          if (mode == Mode::Nearest) {
            int64_t off;
            if (gxb && nearest_tap(px, py, H, W, W, int64_t(1), pad, off)) {
              for (int64_t c = c0; c < c1; ++c) gxb[c * HW + off] += static_cast<acc_t>(g[c * gs.stride[1]]);
            }
            continue;
          }
          Taps<acc_t> tx, ta;  // taps into x (its strides) and into the contiguous accumulator
          bilinear_taps(px, py, H, W, xs.stride[2], xs.stride[3], pad, tx);
          bilinear_taps(px, py, H, W, W, int64_t(1), pad, ta);
          acc_t m[4];
          for (int q = 0; q < 4; ++q) m[q] = tx.valid[q] ? acc_t(1) : acc_t(0);
          acc_t dx = acc_t(0), dy = acc_t(0);
          for (int64_t c = c0; c < c1; ++c) {
            const acc_t gv = static_cast<acc_t>(g[c * gs.stride[1]]);
            if (gxb) {
              acc_t* plane = gxb + c * HW;
              for (int q = 0; q < 4; ++q) plane[ta.off[q]] += ta.w[q] * gv;
            }
            if (want_flow) {
              const scalar_t* xc = xb + c * xs.stride[1];
              acc_t v[4];
              for (int q = 0; q < 4; ++q) v[q] = m[q] * static_cast<acc_t>(xc[tx.off[q]]);
              acc_t dpx, dpy;
              bilinear_point_grad(tx, v, dpx, dpy);
              dx += gv * dpx;
              dy += gv * dpy;
            }
          }
          if (want_flow) {
            dflow[i * W + j] = dx;
            dflow[HW + i * W + j] = dy;
          }
        }
      }
    }
  });
  if (want_flow) {
    scalar_t* out = gflow->data_ptr<scalar_t>();
    at::parallel_for(0, B * 2 * HW, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        acc_t sum = acc_t(0);
        for (int64_t k = 0; k < nchunks; ++k) sum += partial[k * B * 2 * HW + e];
        out[e] = static_cast<scalar_t>(sum);
      }
    });
  }
}

at::Tensor flow_warp_cpu(const at::Tensor& x, const at::Tensor& flow, c10::string_view mode_name,
                         c10::string_view padding_name) {
  check_inputs(x, flow);
  const Mode mode = parse_mode(mode_name);
  const Padding pad = parse_padding(padding_name);
  at::Tensor out = new_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_warp_cpu",
                                  [&] { forward_cpu<scalar_t>(x, flow, out, mode, pad); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_warp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& flow, c10::string_view mode_name,
                                                          c10::string_view padding_name, bool need_x_grad,
                                                          bool need_flow_grad) {
  BackwardBuffers b =
      prepare_backward(grad_out, x, flow, mode_name, padding_name, need_x_grad, need_flow_grad);
  if (x.numel() > 0 && (need_x_grad || b.flow_kernel)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_warp_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_cpu<scalar_t>(grad_out, x, flow, need_x_grad ? b.grad_x_acc.data_ptr<acc_t>() : nullptr,
                             b.flow_kernel ? &b.grad_flow : nullptr, b.mode, b.pad);
    });
  }
  return finish_backward(b, x);
}

}  // namespace
}  // namespace flow_warp
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def("flow_warp(Tensor x, Tensor flow, str mode, str padding_mode) -> Tensor");
  m.def(
      "flow_warp_backward(Tensor grad_out, Tensor x, Tensor flow, str mode, str padding_mode, bool need_x_grad, "
      "bool need_flow_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("flow_warp", &vosops::flow_warp::flow_warp_cpu);
  m.impl("flow_warp_backward", &vosops::flow_warp::flow_warp_backward_cpu);
}
