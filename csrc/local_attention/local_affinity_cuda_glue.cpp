// local_affinity / local_aggregate CUDA glue: checks, fp32 contiguous copies, rounded offsets, launches on the
// current stream. float32 / float16 / bfloat16 (accumulated in fp32); float64 runs on the cpu/reference backends.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/cuda_glue.h"
#include "common/native.h"
#include "local_attention/local_affinity.h"
#include "local_attention/local_affinity_cuda.cuh"

namespace vosops {
namespace local_affinity {
namespace {

void check_cuda_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   op, ": the cuda backend takes float32, float16 or bfloat16 ", name, ", got ", t.scalar_type());
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The reference's rounding (half away from zero, exact; non-finite and huge offsets to +-L), on the device.
at::Tensor round_offsets_device(const std::optional<at::Tensor>& offsets, const Geometry& g) {
  if (!offsets.has_value()) return at::Tensor();
  const double L = static_cast<double>(local_attention::offset_limit(g.H, g.W, g.radius, g.dilation));
  at::Tensor o = at::nan_to_num(offsets->to(at::kDouble), L, L, -L).clamp(-L, L);
  at::Tensor a = o.abs();
  at::Tensor f = a.floor();
  at::Tensor r = f + (a - f >= 0.5).to(at::kDouble);
  return at::where(o < 0, -r, r).to(at::kInt).contiguous();
}

at::Tensor local_affinity_cuda(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& offsets,
                               int64_t radius, int64_t dilation, c10::string_view window, double scale,
                               c10::string_view border) {
  check_scale("local_affinity", scale);
  Geometry g = affinity_geometry(q, k, offsets, radius, dilation, window, border);
  check_cuda_dtype("local_affinity", "q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = new_output({g.B, g.N, g.P, g.H, g.W}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    const at::Tensor off = round_offsets_device(offsets, g), qf = f32(q), kf = f32(k);
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    const float fill = border == "zero" ? 0.f : -std::numeric_limits<float>::infinity();
    check_launch(scores_cuda(g, qf.const_data_ptr<float>(), kf.const_data_ptr<float>(), q.size(1),
                             static_cast<float>(scale), fill, out.data_ptr<float>(), current_stream()),
                 "local_affinity");
  }
  return out.to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> local_affinity_backward_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                                const at::Tensor& k,
                                                                const std::optional<at::Tensor>& offsets,
                                                                int64_t radius, int64_t dilation,
                                                                c10::string_view window, double scale, bool need_q,
                                                                bool need_k) {
  check_scale("local_affinity_backward", scale);
  // Either border: out-of-frame logits are constants (-inf or 0) and pass no gradient.
  Geometry g = affinity_geometry(q, k, offsets, radius, dilation, window, "mask");
  check_cuda_dtype("local_affinity_backward", "q", q);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({g.B, g.N, g.P, g.H, g.W}),
                    "local_affinity_backward: grad must be (B, N, P, H, W), got ", grad.sizes());
  if (need_k) alert_atomic_backward("vosops::local_affinity_backward (CUDA: the gradient of k)");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor gq = need_q ? at::empty(q.sizes(), opts) : q.new_empty({0});
  at::Tensor gk = need_k ? at::zeros(k.sizes(), opts) : k.new_empty({0});
  if ((need_q || need_k) && grad.numel() > 0) {
    const at::Tensor off = round_offsets_device(offsets, g), gf = f32(grad);
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    const float s = static_cast<float>(scale);
    if (need_q) {
      const at::Tensor kf = f32(k);
      check_launch(gather_cuda(g, gf.const_data_ptr<float>(), kf.const_data_ptr<float>(), q.size(1), s,
                               gq.data_ptr<float>(), current_stream()),
                   "local_affinity_backward");
    }
    if (need_k) {
      const at::Tensor qf = f32(q);
      check_launch(scatter_cuda(g, gf.const_data_ptr<float>(), qf.const_data_ptr<float>(), q.size(1), s,
                                gk.data_ptr<float>(), current_stream()),
                   "local_affinity_backward");
    }
  } else if (need_q) {
    gq.zero_();
  }
  return {gq.to(q.scalar_type()), gk.to(k.scalar_type())};
}

at::Tensor local_aggregate_cuda(const at::Tensor& weights, const at::Tensor& v,
                                const std::optional<at::Tensor>& offsets, int64_t radius, int64_t dilation) {
  Geometry g = aggregate_geometry(weights, v, offsets, radius, dilation);
  check_cuda_dtype("local_aggregate", "weights", weights);
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t Cv = v.size(2);
  at::Tensor out = new_output({g.B, Cv, g.H, g.W}, v.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    const at::Tensor off = round_offsets_device(offsets, g), wf = f32(weights), vf = f32(v);
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    check_launch(gather_cuda(g, wf.const_data_ptr<float>(), vf.const_data_ptr<float>(), Cv, 1.f,
                             out.data_ptr<float>(), current_stream()),
                 "local_aggregate");
  }
  return out.to(v.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> local_aggregate_backward_cuda(const at::Tensor& grad_out,
                                                                 const at::Tensor& weights, const at::Tensor& v,
                                                                 const std::optional<at::Tensor>& offsets,
                                                                 int64_t radius, int64_t dilation, bool need_weights,
                                                                 bool need_v) {
  Geometry g = aggregate_geometry(weights, v, offsets, radius, dilation);
  check_cuda_dtype("local_aggregate_backward", "weights", weights);
  const int64_t Cv = v.size(2);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef({g.B, Cv, g.H, g.W}),
                    "local_aggregate_backward: grad_out must be (B, Cv, H, W), got ", grad_out.sizes());
  if (need_v) alert_atomic_backward("vosops::local_aggregate_backward (CUDA: the gradient of v)");
  const c10::cuda::CUDAGuard guard(v.device());
  const auto opts = v.options().dtype(at::kFloat);
  at::Tensor gw = need_weights ? at::empty(weights.sizes(), opts) : weights.new_empty({0});
  at::Tensor gv = need_v ? at::zeros(v.sizes(), opts) : v.new_empty({0});
  if ((need_weights || need_v) && weights.numel() > 0) {
    const at::Tensor off = round_offsets_device(offsets, g), gf = f32(grad_out);
    g.offsets = off.defined() ? off.const_data_ptr<int32_t>() : nullptr;
    if (need_weights) {  // an unscaled affinity of grad_out against v, 0 out of frame
      const at::Tensor vf = f32(v);
      check_launch(scores_cuda(g, gf.const_data_ptr<float>(), vf.const_data_ptr<float>(), Cv, 1.f, 0.f,
                               gw.data_ptr<float>(), current_stream()),
                   "local_aggregate_backward");
    }
    if (need_v) {
      const at::Tensor wf = f32(weights);
      check_launch(scatter_cuda(g, wf.const_data_ptr<float>(), gf.const_data_ptr<float>(), Cv, 1.f,
                                gv.data_ptr<float>(), current_stream()),
                   "local_aggregate_backward");
    }
  }
  return {gw.to(weights.scalar_type()), gv.to(v.scalar_type())};
}

}  // namespace
}  // namespace local_affinity
}  // namespace vosops

TORCH_LIBRARY_IMPL(vosops, CUDA, m) {
  m.impl("local_affinity", &vosops::local_affinity::local_affinity_cuda);
  m.impl("local_affinity_backward", &vosops::local_affinity::local_affinity_backward_cuda);
  m.impl("local_aggregate", &vosops::local_affinity::local_aggregate_cuda);
  m.impl("local_aggregate_backward", &vosops::local_affinity::local_aggregate_backward_cuda);
}
