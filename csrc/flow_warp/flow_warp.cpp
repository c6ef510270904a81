// flow_warp: op schemas and the CPU kernels.
//
// Both directions work on tiles of kTile consecutive output pixels of one batch: a tile's taps (four offsets into a
// channel plane and four weights) are computed once and shared by every channel, and the channel loop then walks the
// tile, so every plane is touched in one run per tile. (Pixel-outer, channel-inner order touched C planes, C pages
// apart, per pixel and ran 2-3x slower.)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/native.h"
#include "flow_warp/flow_warp.h"

namespace vosops {
namespace flow_warp {
namespace {

// 512 pixels (a few rows): long enough runs per channel plane, short enough that a tile's taps (48 B a pixel in
// fp32) stay in L1 next to the rows being read. Measured best of 128 .. 1024 at the benchmark sizes.
constexpr int64_t kTile = 512;

// Runs fn(task) for every task in [0, ntasks), each thread over one contiguous share: neighbouring tiles reuse the
// same rows of x from that core's cache. (Handing tasks out dynamically, one at a time or by stealing from the
// ends of contiguous shares, measured slower on the shared 2-core machine.)
template <typename F>
void parallel_tasks(int64_t ntasks, int64_t min_tasks_per_thread, const F& fn) {
  at::parallel_for(0, ntasks, std::max<int64_t>(1, min_tasks_per_thread), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) fn(task);
  });
}

template <typename acc_t>
struct TileTaps {
  int64_t off[4][kTile];  // into one (b, c) plane of x; an out-of-frame tap has offset 0 and weight 0
  acc_t w[4][kTile];
  // Pixels with an out-of-frame tap (frame edges, flows leaving the frame): the gather multiplies their taps'
  // weights by x like every pixel's, so a non-finite x[offset 0] would make NaN there; fix_edge_pixels redoes
  // them with the out-of-frame taps skipped (bit q of valid: tap q is in the frame).
  uint8_t valid[kTile];
  int32_t edge[kTile];
  int64_t n_edge = 0;
};

template <typename scalar_t, typename acc_t>
inline void sampling_point(const scalar_t* flow_b, const Shape4& fs, int64_t i, int64_t j, acc_t& px, acc_t& py) {
  const int64_t fo = i * fs.stride[2] + j * fs.stride[3];
  px = acc_t(j) + static_cast<acc_t>(flow_b[fo]);
  py = acc_t(i) + static_cast<acc_t>(flow_b[fo + fs.stride[1]]);
}

// One pixel's bilinear taps exactly as bilinear_taps computes them, with selects instead of branches (which
// matters when few channels share a tile's taps). v[q]: tap q is in the frame.
template <typename acc_t>
struct PixelTaps {
  int64_t x0, y0;
  acc_t fx, fy, gx_mult, gy_mult;
  bool v[4];
};

template <typename acc_t>
inline void pixel_taps(acc_t px, acc_t py, int64_t H, int64_t W, Padding pad, PixelTaps<acc_t>& t) {
  t.gx_mult = acc_t(1);
  t.gy_mult = acc_t(1);
  if (pad == Padding::Border) {  // clip_coordinate; NaN passes through and fails `inside` below
    const acc_t Wm1 = acc_t(W - 1), Hm1 = acc_t(H - 1);
    t.gx_mult = px <= acc_t(0) || px >= Wm1 ? acc_t(0) : acc_t(1);
    t.gy_mult = py <= acc_t(0) || py >= Hm1 ? acc_t(0) : acc_t(1);
    px = px <= acc_t(0) ? acc_t(0) : (px >= Wm1 ? Wm1 : px);
    py = py <= acc_t(0) ? acc_t(0) : (py >= Hm1 ? Hm1 : py);
  }
  const bool inside = px >= acc_t(-1) && px < acc_t(W) && py >= acc_t(-1) && py < acc_t(H);
  px = inside ? px : acc_t(0);  // keeps the integer conversion below in range
  py = inside ? py : acc_t(0);
  t.x0 = floor_in_range(px);
  t.y0 = floor_in_range(py);
  t.fx = px - static_cast<acc_t>(t.x0);
  t.fy = py - static_cast<acc_t>(t.y0);
  const bool vx0 = inside && t.x0 >= 0, vx1 = inside && t.x0 + 1 < W, vy0 = t.y0 >= 0, vy1 = t.y0 + 1 < H;
  t.v[0] = vx0 && vy0;
  t.v[1] = vx1 && vy0;
  t.v[2] = vx0 && vy1;
  t.v[3] = vx1 && vy1;
}

// Taps of the n pixels p0 .. p0+n-1 (flattened over H*W) of one batch.
template <typename scalar_t, typename acc_t>
void tile_bilinear_taps(const scalar_t* flow_b, const Shape4& fs, int64_t p0, int64_t n, int64_t H, int64_t W,
                        int64_t sh, int64_t sw, Padding pad, TileTaps<acc_t>& t) {
  int64_t i = p0 / W, j = p0 % W;
  for (int64_t p = 0; p < n; ++p) {
    acc_t px, py;
    sampling_point(flow_b, fs, i, j, px, py);
    PixelTaps<acc_t> pt;
    pixel_taps(px, py, H, W, pad, pt);
    const acc_t fx = pt.fx, fy = pt.fy;
    const int64_t r0 = pt.y0 * sh, r1 = r0 + sh, c0 = pt.x0 * sw, c1 = c0 + sw;
    t.w[0][p] = pt.v[0] ? (acc_t(1) - fx) * (acc_t(1) - fy) : acc_t(0);
    t.w[1][p] = pt.v[1] ? fx * (acc_t(1) - fy) : acc_t(0);
    t.w[2][p] = pt.v[2] ? (acc_t(1) - fx) * fy : acc_t(0);
    t.w[3][p] = pt.v[3] ? fx * fy : acc_t(0);
    t.off[0][p] = pt.v[0] ? r0 + c0 : 0;
    t.off[1][p] = pt.v[1] ? r0 + c1 : 0;
    t.off[2][p] = pt.v[2] ? r1 + c0 : 0;
    t.off[3][p] = pt.v[3] ? r1 + c1 : 0;
    t.valid[p] = static_cast<uint8_t>(pt.v[0] | (pt.v[1] << 1) | (pt.v[2] << 2) | (pt.v[3] << 3));
    if (t.valid[p] != 15) t.edge[t.n_edge++] = static_cast<int32_t>(p);
    if (++j == W) j = 0, ++i;
  }
}

// The tile's edge pixels whose gathered value is not finite, again with only their in-frame taps (grid_sample's
// rule: an out-of-frame tap adds nothing, even next to an inf or NaN in x). With finite x an out-of-frame tap adds
// 0 * finite = 0 exactly, so a finite gathered value is already right and only a check is paid.
template <typename scalar_t, typename acc_t>
void fix_edge_pixels(const scalar_t* xb, int64_t sc, scalar_t* ob, int64_t HW, int64_t C, const TileTaps<acc_t>& t) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xc = xb + c * sc;
    scalar_t* oc = ob + c * HW;
    for (int64_t e = 0; e < t.n_edge; ++e) {
      const int64_t p = t.edge[e];
      if (std::isfinite(static_cast<acc_t>(oc[p]))) continue;
      acc_t v = acc_t(0);
      for (int q = 0; q < 4; ++q) {
        if (t.valid[p] >> q & 1) v += t.w[q][p] * acc_t(xc[t.off[q][p]]);
      }
      oc[p] = static_cast<scalar_t>(v);
    }
  }
}

// out[c][p] = sum_q w[q][p] * x[c][off[q][p]] for every channel, four channels at a time so each tile entry is
// loaded once per four channels. The next group's rows are prefetched: 64 interleaved plane streams are more than
// the hardware prefetcher follows.
template <typename scalar_t, typename acc_t>
void gather_bilinear(const scalar_t* xb, int64_t sc, scalar_t* ob, int64_t HW, int64_t C, int64_t n,
                     const TileTaps<acc_t>& t) {
  const int64_t *__restrict o0 = t.off[0], *__restrict o1 = t.off[1], *__restrict o2 = t.off[2],
                               *__restrict o3 = t.off[3];
  const acc_t *__restrict w0 = t.w[0], *__restrict w1 = t.w[1], *__restrict w2 = t.w[2], *__restrict w3 = t.w[3];
  auto tap = [](const scalar_t* __restrict xc, acc_t a0, acc_t a1, acc_t a2, acc_t a3, int64_t q0, int64_t q1,
                int64_t q2, int64_t q3) {
    return static_cast<scalar_t>(a0 * acc_t(xc[q0]) + a1 * acc_t(xc[q1]) + a2 * acc_t(xc[q2]) + a3 * acc_t(xc[q3]));
  };
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const scalar_t *xa = xb + c * sc, *xb1 = xa + sc, *xb2 = xb1 + sc, *xb3 = xb2 + sc;
    // the first plane of the next group (or this one again on the last group: harmless, already cached)
    const scalar_t* next = c + 8 <= C ? xa + 4 * sc : xa;
    scalar_t *__restrict oa = ob + c * HW, *__restrict ob1 = oa + HW, *__restrict ob2 = ob1 + HW,
                         *__restrict ob3 = ob2 + HW;
    for (int64_t p = 0; p < n; ++p) {
      const acc_t a0 = w0[p], a1 = w1[p], a2 = w2[p], a3 = w3[p];
      const int64_t q0 = o0[p], q1 = o1[p], q2 = o2[p], q3 = o3[p];
      __builtin_prefetch(next + q0);
      __builtin_prefetch(next + q3);
      oa[p] = tap(xa, a0, a1, a2, a3, q0, q1, q2, q3);
      ob1[p] = tap(xb1, a0, a1, a2, a3, q0, q1, q2, q3);
      ob2[p] = tap(xb2, a0, a1, a2, a3, q0, q1, q2, q3);
      ob3[p] = tap(xb3, a0, a1, a2, a3, q0, q1, q2, q3);
    }
  }
  for (; c < C; ++c) {
    const scalar_t* xa = xb + c * sc;
    scalar_t* __restrict oa = ob + c * HW;
    for (int64_t p = 0; p < n; ++p) oa[p] = tap(xa, w0[p], w1[p], w2[p], w3[p], o0[p], o1[p], o2[p], o3[p]);
  }
}

template <typename scalar_t>
void forward_cpu(const at::Tensor& x, const at::Tensor& flow, at::Tensor& out, Mode mode, Padding pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape4 xs = shape4(x), fs = shape4(flow);
  const int64_t B = xs.size[0], C = xs.size[1], H = xs.size[2], W = xs.size[3], HW = H * W;
  const int64_t sc = xs.stride[1], sh = xs.stride[2], sw = xs.stride[3];
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* fp = flow.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ntiles = (HW + kTile - 1) / kTile;
  // a task is one tile of one batch, all channels; a thread is worth starting for >= ~64k outputs
  const int64_t min_tasks = std::max<int64_t>(1, 65536 / (C * kTile));
  if (mode == Mode::Bilinear) {
    parallel_tasks(B * ntiles, min_tasks, [&](int64_t task) {
      const int64_t b = task / ntiles, p0 = (task % ntiles) * kTile, n = std::min(kTile, HW - p0);
      TileTaps<acc_t> t;
      tile_bilinear_taps(fp + b * fs.stride[0], fs, p0, n, H, W, sh, sw, pad, t);
      gather_bilinear(xp + b * xs.stride[0], sc, op + b * C * HW + p0, HW, C, n, t);
      if (t.n_edge) fix_edge_pixels(xp + b * xs.stride[0], sc, op + b * C * HW + p0, HW, C, t);
    });
    return;
  }
  parallel_tasks(B * ntiles, min_tasks, [&](int64_t task) {
    const int64_t b = task / ntiles, p0 = (task % ntiles) * kTile, n = std::min(kTile, HW - p0);
    int64_t off[kTile];
    bool valid[kTile];
    const scalar_t* flow_b = fp + b * fs.stride[0];
    int64_t i = p0 / W, j = p0 % W;
    for (int64_t p = 0; p < n; ++p) {
      acc_t px, py;
      sampling_point(flow_b, fs, i, j, px, py);
      valid[p] = nearest_tap(px, py, H, W, sh, sw, pad, off[p]);
      if (++j == W) j = 0, ++i;
    }
    const scalar_t* xb = xp + b * xs.stride[0];
    scalar_t* ob = op + b * C * HW + p0;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xc = xb + c * sc;
      scalar_t* __restrict oc = ob + c * HW;
      // a select, not a multiply by 0/1: an out-of-frame pixel is exactly 0 even next to non-finite x
      for (int64_t p = 0; p < n; ++p) oc[p] = valid[p] ? xc[off[p]] : scalar_t(0);
    }
  });
}

// Backward of one tile for channels [c0, c1) of one batch; x, grad_out and the d(x) accumulator are contiguous, so
// one set of offsets addresses all three. d(x) is a scatter of w * g into the four taps; d(flow) needs, per tap q,
// S_q = sum_c g_c * x_c[tap q], combined once per tile into d(px), d(py) by the (linear) bilinear_point_grad.
template <typename scalar_t, typename acc_t, bool kX, bool kFlow>
void backward_tile(const scalar_t* xb, const scalar_t* gb, acc_t* gxb, int64_t HW, int64_t c0, int64_t c1,
                   int64_t n, const TileTaps<acc_t>& t, acc_t (&S)[4][kTile]) {
  const int64_t *__restrict o0 = t.off[0], *__restrict o1 = t.off[1], *__restrict o2 = t.off[2],
                               *__restrict o3 = t.off[3];
  const acc_t *__restrict w0 = t.w[0], *__restrict w1 = t.w[1], *__restrict w2 = t.w[2], *__restrict w3 = t.w[3];
  if (kFlow) {
    for (int q = 0; q < 4; ++q) std::fill(S[q], S[q] + n, acc_t(0));
  }
  acc_t *__restrict S0 = S[0], *__restrict S1 = S[1], *__restrict S2 = S[2], *__restrict S3 = S[3];
  // K channels at a time: each tile entry and S_q is loaded and stored once per K channels
  auto block = [&](auto k_const, int64_t c) {
    constexpr int64_t K = decltype(k_const)::value;
    const scalar_t* xa = xb + c * HW;
    const scalar_t* ga = gb + c * HW;
    acc_t* gxa = kX ? gxb + c * HW : nullptr;
    // the next block's first plane (this block's again on the last one), as in gather_bilinear
    const int64_t ahead = c + 2 * K <= c1 ? K * HW : 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t q0 = o0[p], q1 = o1[p], q2 = o2[p], q3 = o3[p];
      if (K > 1 && kFlow) {
        __builtin_prefetch(xa + ahead + q0);
        __builtin_prefetch(xa + ahead + q3);
      }
      if (K > 1 && kX) {
        __builtin_prefetch(gxa + ahead + q0, 1);
        __builtin_prefetch(gxa + ahead + q3, 1);
      }
      acc_t s0 = acc_t(0), s1 = acc_t(0), s2 = acc_t(0), s3 = acc_t(0);
      const acc_t a0 = kX ? w0[p] : acc_t(0), a1 = kX ? w1[p] : acc_t(0), a2 = kX ? w2[p] : acc_t(0),
                  a3 = kX ? w3[p] : acc_t(0);
#pragma GCC unroll 4
      for (int64_t k = 0; k < K; ++k) {
        const acc_t g = static_cast<acc_t>(ga[k * HW + p]);
        if (kFlow) {
          const scalar_t* xk = xa + k * HW;
          s0 += g * acc_t(xk[q0]);
          s1 += g * acc_t(xk[q1]);
          s2 += g * acc_t(xk[q2]);
          s3 += g * acc_t(xk[q3]);
        }
        if (kX) {
          acc_t* gxk = gxa + k * HW;
          gxk[q0] += a0 * g;
          gxk[q1] += a1 * g;
          gxk[q2] += a2 * g;
          gxk[q3] += a3 * g;
        }
      }
      if (kFlow) {
        S0[p] += s0;
        S1[p] += s1;
        S2[p] += s2;
        S3[p] += s3;
      }
    }
  };
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) block(std::integral_constant<int64_t, 4>{}, c);
  for (; c < c1; ++c) block(std::integral_constant<int64_t, 1>{}, c);
}

// d(px), d(py) of the tile's pixels from the sums S_q (invalid taps read offset 0 and are masked out here).
template <typename scalar_t, typename acc_t>
void tile_flow_grad(const scalar_t* flow_b, const Shape4& fs, int64_t p0, int64_t n, int64_t H, int64_t W,
                    Padding pad, const acc_t (&S)[4][kTile], acc_t* dx, acc_t* dy) {
  int64_t i = p0 / W, j = p0 % W;
  for (int64_t p = 0; p < n; ++p) {
    acc_t px, py;
    sampling_point(flow_b, fs, i, j, px, py);
    PixelTaps<acc_t> pt;
    pixel_taps(px, py, H, W, pad, pt);
    Taps<acc_t> tp;  // the fields bilinear_point_grad reads
    tp.fx = pt.fx;
    tp.fy = pt.fy;
    tp.gx_mult = pt.gx_mult;
    tp.gy_mult = pt.gy_mult;
    acc_t v[4];
    for (int q = 0; q < 4; ++q) v[q] = pt.v[q] ? S[q][p] : acc_t(0);
    bilinear_point_grad(tp, v, dx[p], dy[p]);
    if (++j == W) j = 0, ++i;
  }
}

// Channel blocks per batch for the scatter: about four tasks per thread, so the static split is balanced for any B.
inline int64_t channel_chunks(int64_t B, int64_t C) {
  const int64_t want = (4 * at::get_num_threads() + B - 1) / B;
  return std::max<int64_t>(1, std::min<int64_t>(C, want));
}

template <typename scalar_t, bool kX, bool kFlow>
void backward_bilinear(const scalar_t* xp, const scalar_t* gp, const scalar_t* fp, const Shape4& fs, int64_t B,
                       int64_t C, int64_t H, int64_t W, at::opmath_type<scalar_t>* gx, scalar_t* gflow,
                       Padding pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, ntiles = (HW + kTile - 1) / kTile;
  if (!kX) {
    // d(flow) alone is per pixel: tasks are (batch, tile), each summing over every channel.
    parallel_tasks(B * ntiles, std::max<int64_t>(1, 65536 / (C * kTile)), [&](int64_t task) {
      const int64_t b = task / ntiles, p0 = (task % ntiles) * kTile, n = std::min(kTile, HW - p0);
      TileTaps<acc_t> t;
      acc_t S[4][kTile], dx[kTile], dy[kTile];
      const scalar_t* flow_b = fp + b * fs.stride[0];
      tile_bilinear_taps(flow_b, fs, p0, n, H, W, W, int64_t(1), pad, t);
      backward_tile<scalar_t, acc_t, false, true>(xp + b * C * HW, gp + b * C * HW + p0, nullptr, HW, 0, C, n, t, S);
      tile_flow_grad(flow_b, fs, p0, n, H, W, pad, S, dx, dy);
      scalar_t* gf = gflow + b * 2 * HW + p0;
      for (int64_t p = 0; p < n; ++p) {
        gf[p] = static_cast<scalar_t>(dx[p]);
        gf[HW + p] = static_cast<scalar_t>(dy[p]);
      }
    });
    return;
  }
  // d(x) is a scatter, so tasks are (batch, block of channels): no two tasks write the same plane. Each task zeroes
  // its own planes first and keeps its block's share of d(flow), summed over the blocks at the end.
  const int64_t nchunks = channel_chunks(B, C);
  // an ATen allocation (not a std::vector), so memory profilers and the benchmarks' peak count it
  const at::Tensor partial_mem = at::empty({kFlow ? nchunks * B * 2 * HW : 0},
                                           at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* partial = partial_mem.data_ptr<acc_t>();
  parallel_tasks(B * nchunks, 1, [&](int64_t task) {
    const int64_t b = task / nchunks, k = task % nchunks;
    const int64_t c0 = C * k / nchunks, c1 = C * (k + 1) / nchunks;
    TileTaps<acc_t> t;
    acc_t S[4][kTile];
    const scalar_t* flow_b = fp + b * fs.stride[0];
    acc_t* gxb = gx + b * C * HW;
    std::fill(gxb + c0 * HW, gxb + c1 * HW, acc_t(0));
    acc_t* dflow = kFlow ? partial + (k * B + b) * 2 * HW : nullptr;
    for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
      const int64_t n = std::min(kTile, HW - p0);
      tile_bilinear_taps(flow_b, fs, p0, n, H, W, W, int64_t(1), pad, t);
      backward_tile<scalar_t, acc_t, true, kFlow>(xp + b * C * HW, gp + b * C * HW + p0, gxb, HW, c0, c1, n, t, S);
      if (kFlow) tile_flow_grad(flow_b, fs, p0, n, H, W, pad, S, dflow + p0, dflow + HW + p0);
    }
  });
  if (kFlow) {
    // a cheap pass (nchunks adds an element): threads only for large frames, not a second wake-up per call
    at::parallel_for(0, B * 2 * HW, int64_t(1) << 20, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        acc_t sum = acc_t(0);
        for (int64_t k = 0; k < nchunks; ++k) sum += partial[k * B * 2 * HW + e];
        gflow[e] = static_cast<scalar_t>(sum);
      }
    });
  }
}

// Nearest: d(x) only (the output is piecewise constant in the flow), a scatter of g into one tap per pixel.
template <typename scalar_t>
void backward_nearest(const scalar_t* gp, const scalar_t* fp, const Shape4& fs, int64_t B, int64_t C, int64_t H,
                      int64_t W, at::opmath_type<scalar_t>* gx, Padding pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  const int64_t nchunks = channel_chunks(B, C);
  parallel_tasks(B * nchunks, 1, [&](int64_t task) {
    const int64_t b = task / nchunks, k = task % nchunks;
    const int64_t c0 = C * k / nchunks, c1 = C * (k + 1) / nchunks;
    int64_t off[kTile];
    bool valid[kTile];
    const scalar_t* flow_b = fp + b * fs.stride[0];
    acc_t* gxb = gx + b * C * HW;
    std::fill(gxb + c0 * HW, gxb + c1 * HW, acc_t(0));
    for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
      const int64_t n = std::min(kTile, HW - p0);
      int64_t i = p0 / W, j = p0 % W;
      for (int64_t p = 0; p < n; ++p) {
        acc_t px, py;
        sampling_point(flow_b, fs, i, j, px, py);
        valid[p] = nearest_tap(px, py, H, W, W, int64_t(1), pad, off[p]);
        if (++j == W) j = 0, ++i;
      }
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* gc = gp + (b * C + c) * HW + p0;
        acc_t* gxc = gxb + c * HW;
        for (int64_t p = 0; p < n; ++p) {
          if (valid[p]) gxc[off[p]] += static_cast<acc_t>(gc[p]);
        }
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
  // The kernels zero d(x) plane by plane themselves.
  BackwardBuffers b =
      prepare_backward(grad_out, x, flow, mode_name, padding_name, need_x_grad, need_flow_grad, false);
  if (x.numel() > 0 && (need_x_grad || b.flow_kernel)) {
    // One set of tap offsets addresses x, grad_out and d(x) when all three are contiguous (copies only if not).
    const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
    const Shape4 fs = shape4(flow);
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_warp_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *gp = gc.const_data_ptr<scalar_t>(),
                     *fp = flow.const_data_ptr<scalar_t>();
      acc_t* gx = need_x_grad ? b.grad_x_acc.data_ptr<acc_t>() : nullptr;
      scalar_t* gf = b.flow_kernel ? b.grad_flow.data_ptr<scalar_t>() : nullptr;
      if (b.mode == Mode::Nearest) {
        backward_nearest<scalar_t>(gp, fp, fs, B, C, H, W, gx, b.pad);
      } else if (gx && gf) {
        backward_bilinear<scalar_t, true, true>(xp, gp, fp, fs, B, C, H, W, gx, gf, b.pad);
      } else if (gx) {
        backward_bilinear<scalar_t, true, false>(xp, gp, fp, fs, B, C, H, W, gx, gf, b.pad);
      } else {
        backward_bilinear<scalar_t, false, true>(xp, gp, fp, fs, B, C, H, W, gx, gf, b.pad);
      }
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
