// flow_warp: op schemas and the CPU kernels.
//
// Forward parallelises over (batch, output row): a row's taps are computed once into per-thread scratch and then
// reused by every channel, so the channel loop is a pure gather-and-FMA over contiguous output.
// Backward: d(flow) parallelises over rows like the forward; d(x) is a scatter, so it parallelises over (b, c)
// planes (no two threads write one plane) with the taps of a block of rows shared by all channels.
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

template <typename acc_t>
struct RowTaps {
  std::vector<int64_t> off;  // 4 per pixel (1 used for nearest)
  std::vector<acc_t> w;
  explicit RowTaps(int64_t n) : off(4 * n), w(4 * n) {}
};

// Taps of pixels [p0, p1) of batch b (pixel p = i * W + j); writes 4 taps per pixel starting at slot 0.
template <typename scalar_t, typename acc_t>
void compute_taps(const scalar_t* flow, const Shape4& fs, int64_t b, int64_t p0, int64_t p1, int64_t H, int64_t W,
                  int64_t sh, int64_t sw, Mode mode, Padding pad, int64_t* off, acc_t* w) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t i = p / W, j = p % W;
    const int64_t fo = b * fs.stride[0] + i * fs.stride[2] + j * fs.stride[3];
    const acc_t px = acc_t(j) + static_cast<acc_t>(flow[fo]);
    const acc_t py = acc_t(i) + static_cast<acc_t>(flow[fo + fs.stride[1]]);
    int64_t* o = off + 4 * (p - p0);
    acc_t* ww = w + 4 * (p - p0);
    if (mode == Mode::Bilinear) {
      Taps<acc_t> t;
      bilinear_taps(px, py, H, W, sh, sw, pad, t);
      for (int k = 0; k < 4; ++k) {
        o[k] = t.off[k];
        ww[k] = t.w[k];
      }
    } else {
      const bool valid = nearest_tap(px, py, H, W, sh, sw, pad, o[0]);
      ww[0] = valid ? acc_t(1) : acc_t(0);
      for (int k = 1; k < 4; ++k) {
        o[k] = 0;
        ww[k] = acc_t(0);
      }
    }
  }
}

template <typename scalar_t>
void forward_cpu(const at::Tensor& x, const at::Tensor& flow, at::Tensor& out, Mode mode, Padding pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape4 xs = shape4(x), fs = shape4(flow);
  const int64_t B = xs.size[0], C = xs.size[1], H = xs.size[2], W = xs.size[3];
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* fp = flow.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    RowTaps<acc_t> taps(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, i = row % H;
      compute_taps(fp, fs, b, i * W, (i + 1) * W, H, W, xs.stride[2], xs.stride[3], mode, pad, taps.off.data(),
                   taps.w.data());
      const int64_t* off = taps.off.data();
      const acc_t* w = taps.w.data();
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* plane = xp + b * xs.stride[0] + c * xs.stride[1];
        scalar_t* orow = op + ((b * C + c) * H + i) * W;
        if (mode == Mode::Bilinear) {
          for (int64_t j = 0; j < W; ++j) {
            const int64_t* o = off + 4 * j;
            const acc_t* ww = w + 4 * j;
            orow[j] = static_cast<scalar_t>(ww[0] * acc_t(plane[o[0]]) + ww[1] * acc_t(plane[o[1]]) +
                                            ww[2] * acc_t(plane[o[2]]) + ww[3] * acc_t(plane[o[3]]));
          }
        } else {
          for (int64_t j = 0; j < W; ++j) {
            orow[j] = w[4 * j] != acc_t(0) ? plane[off[4 * j]] : scalar_t(0);
          }
        }
      }
    }
  });
}

// d(x): scatter of grad_out through the taps into a contiguous accumulator of type acc_t.
template <typename scalar_t, typename acc_t>
void grad_x_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& flow, acc_t* gx, Mode mode,
                Padding pad) {
  const Shape4 gs = shape4(grad_out), fs = shape4(flow);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* fp = flow.const_data_ptr<scalar_t>();
  // Taps index the contiguous accumulator, so they use its strides (W, 1).
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(H * W, 1 << 15));
  std::vector<int64_t> off(4 * block);
  std::vector<acc_t> w(4 * block);
  const int ntaps = mode == Mode::Bilinear ? 4 : 1;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p0 = 0; p0 < H * W; p0 += block) {
      const int64_t p1 = std::min(H * W, p0 + block);
      at::parallel_for(p0, p1, 2048, [&](int64_t begin, int64_t end) {
        compute_taps(fp, fs, b, begin, end, H, W, W, 1, mode, pad, off.data() + 4 * (begin - p0),
                     w.data() + 4 * (begin - p0));
      });
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t* plane = gx + (b * C + c) * H * W;
          const scalar_t* g = gp + b * gs.stride[0] + c * gs.stride[1];
          for (int64_t p = p0; p < p1; ++p) {
            const acc_t gv = static_cast<acc_t>(g[(p / W) * gs.stride[2] + (p % W) * gs.stride[3]]);
            const int64_t* o = off.data() + 4 * (p - p0);
            const acc_t* ww = w.data() + 4 * (p - p0);
            for (int k = 0; k < ntaps; ++k) plane[o[k]] += ww[k] * gv;
          }
        }
      });
    }
  }
}

// d(flow) for bilinear sampling: per pixel, the sum over channels of grad_out times d(out)/d(point).
template <typename scalar_t>
void grad_flow_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& flow, at::Tensor& gflow,
                   Padding pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape4 xs = shape4(x), fs = shape4(flow), gs = shape4(grad_out);
  const int64_t B = xs.size[0], C = xs.size[1], H = xs.size[2], W = xs.size[3];
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* fp = flow.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  scalar_t* out = gflow.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<Taps<acc_t>> taps(W);
    std::vector<acc_t> dx(W), dy(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, i = row % H;
      for (int64_t j = 0; j < W; ++j) {
        const int64_t fo = b * fs.stride[0] + i * fs.stride[2] + j * fs.stride[3];
        const acc_t px = acc_t(j) + static_cast<acc_t>(fp[fo]);
        const acc_t py = acc_t(i) + static_cast<acc_t>(fp[fo + fs.stride[1]]);
        bilinear_taps(px, py, H, W, xs.stride[2], xs.stride[3], pad, taps[j]);
        dx[j] = acc_t(0);
        dy[j] = acc_t(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* plane = xp + b * xs.stride[0] + c * xs.stride[1];
        const scalar_t* g = gp + b * gs.stride[0] + c * gs.stride[1] + i * gs.stride[2];
        for (int64_t j = 0; j < W; ++j) {
          const Taps<acc_t>& t = taps[j];
          acc_t v[4];
          for (int k = 0; k < 4; ++k) v[k] = t.valid[k] ? static_cast<acc_t>(plane[t.off[k]]) : acc_t(0);
          acc_t dpx, dpy;
          bilinear_point_grad(t, v, dpx, dpy);
          const acc_t gv = static_cast<acc_t>(g[j * gs.stride[3]]);
          dx[j] += gv * dpx;
          dy[j] += gv * dpy;
        }
      }
      for (int64_t j = 0; j < W; ++j) {
        out[((b * 2 + 0) * H + i) * W + j] = static_cast<scalar_t>(dx[j]);
        out[((b * 2 + 1) * H + i) * W + j] = static_cast<scalar_t>(dy[j]);
      }
    }
  });
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
  check_inputs(x, flow);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "flow_warp_backward: grad_out ", grad_out.sizes(),
                    " must match x ", x.sizes());
  const Mode mode = parse_mode(mode_name);
  const Padding pad = parse_padding(padding_name);
  at::Tensor grad_x = x.new_empty({0});
  at::Tensor grad_flow = flow.new_empty({0});
  if (need_x_grad) {
    const bool exact_acc = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
    at::Tensor acc = at::zeros(x.sizes(), x.options().dtype(exact_acc ? x.scalar_type() : at::kFloat));
    if (x.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_warp_grad_x_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        grad_x_cpu<scalar_t, acc_t>(grad_out, x, flow, acc.data_ptr<acc_t>(), mode, pad);
      });
    }
    grad_x = exact_acc ? acc : acc.to(x.scalar_type());
  }
  if (need_flow_grad) {
    if (mode == Mode::Nearest || x.numel() == 0) {
      // Nearest sampling is piecewise constant in the flow: its gradient is zero almost everywhere.
      grad_flow = at::zeros(flow.sizes(), flow.options().memory_format(at::MemoryFormat::Contiguous));
    } else {
      grad_flow = new_output(flow.sizes(), flow.options().memory_format(at::MemoryFormat::Contiguous));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_warp_grad_flow_cpu",
                                      [&] { grad_flow_cpu<scalar_t>(grad_out, x, flow, grad_flow, pad); });
    }
  }
  return {grad_x, grad_flow};
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
