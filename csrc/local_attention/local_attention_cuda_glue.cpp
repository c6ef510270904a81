// local_attention CUDA glue: checks, channels-last fp32 copies, rounded offsets, launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "common/cuda_glue.h"
#include "common/native.h"
#include "local_attention/local_attention.h"
#include "local_attention/local_attention_cuda.cuh"

namespace vosops {
namespace local_attention {
namespace {

void check_cuda_inputs(const at::Tensor& q, const Config& c) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "local_attention: the cuda backend takes float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(c.topk <= kCudaMaxTopk, "local_attention: the cuda backend supports topk <= ", kCudaMaxTopk,
                    ", got ", c.topk);
}

// (B, [N,] C, H, W) -> contiguous fp32 (B, [N,] H, W, C).
at::Tensor to_cl(const at::Tensor& t) {
  if (t.dim() == 4) return t.permute({0, 2, 3, 1}).to(at::kFloat).contiguous();
  return t.permute({0, 1, 3, 4, 2}).to(at::kFloat).contiguous();
}

// The reference's rounding (half away from zero, exact; non-finite and huge offsets to +-L), on the device.
at::Tensor round_offsets_device(const at::Tensor& offsets, const Config& c) {
  const double L = static_cast<double>(offset_limit(c.H, c.W, c.radius, c.dilation));
  at::Tensor o = at::nan_to_num(offsets.to(at::kDouble), L, L, -L).clamp(-L, L);
  at::Tensor a = o.abs();
  at::Tensor f = a.floor();
  at::Tensor r = f + (a - f >= 0.5).to(at::kDouble);
  return at::where(o < 0, -r, r).to(at::kInt).contiguous();
}

// The in-window column table on the device, made once per (device, column list): a host-to-device copy on every
// call would synchronise a propagation loop with the host every frame. A few hundred bytes per window shape.
at::Tensor device_columns(const std::vector<int32_t>& cols, const at::Device& device) {
  static std::mutex mutex;
  // never destroyed: freeing CUDA memory from a static destructor at exit could outlive the CUDA runtime
  static auto* cache = new std::map<std::pair<int64_t, std::vector<int32_t>>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(static_cast<int64_t>(device.index()), cols);
  auto it = cache->find(key);
  if (it == cache->end()) {
    at::Tensor host = at::tensor(cols, at::TensorOptions().dtype(at::kInt));
    it = cache->emplace(std::move(key), host.to(device)).first;  // the one synchronous copy
  }
  return it->second;
}

struct Prepared {
  at::Tensor q, k, v, offsets, cols;
  CudaProblem p;
};

Prepared prepare(const Config& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& offsets) {
  Prepared r;
  r.q = to_cl(q);
  r.k = to_cl(k);
  r.v = to_cl(v);
  if (offsets.has_value()) r.offsets = round_offsets_device(*offsets, c);
  r.cols = device_columns(c.cols, q.device());
  CudaProblem& p = r.p;
  p.B = c.B;
  p.N = c.N;
  p.C = c.C;
  p.Cv = c.Cv;
  p.H = c.H;
  p.W = c.W;
  p.radius = c.radius;
  p.dilation = c.dilation;
  p.P = c.P;
  p.Q = c.Q();
  p.scale = static_cast<float>(c.scale);
  p.topk = c.topk;
  p.normalize = c.normalize;
  p.zero_border = c.zero_border;
  p.q = r.q.const_data_ptr<float>();
  p.k = r.k.const_data_ptr<float>();
  p.v = r.v.const_data_ptr<float>();
  p.offsets = offsets.has_value() ? r.offsets.const_data_ptr<int32_t>() : nullptr;
  p.cols = r.cols.const_data_ptr<int32_t>();
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& offsets,
    int64_t radius, int64_t dilation, double scale, int64_t topk, c10::string_view normalize,
    c10::string_view window, c10::string_view border, bool return_topk) {
  (void)return_topk;  // the top-k list is always produced when topk > 0: the backward needs it
  const Config c = make_config(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border);
  check_cuda_inputs(q, c);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = new_output({c.B, c.Cv, c.H, c.W}, f32);
  at::Tensor stats = new_output({c.B, c.H, c.W, 2}, f32);
  at::Tensor top_logits = new_output({c.B, c.H, c.W, c.topk}, f32);
  at::Tensor top_index = new_output({c.B, c.H, c.W, c.topk}, f32.dtype(at::kLong));
  if (c.B * c.H * c.W > 0) {  // C or Cv = 0 still runs: scores are 0, stats and top-k lists defined
    const Prepared r = prepare(c, q, k, v, offsets);
    check_launch(forward_cuda(r.p, out.data_ptr<float>(), stats.data_ptr<float>(),
                              c.topk ? top_logits.data_ptr<float>() : nullptr,
                              c.topk ? top_index.data_ptr<int64_t>() : nullptr, current_stream()),
                 "local_attention");
  }
  return {out.to(q.scalar_type()), stats, top_logits.to(q.scalar_type()), top_index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_topk_logits, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& offsets, const at::Tensor& stats,
    const at::Tensor& topk_index, int64_t radius, int64_t dilation, double scale, int64_t topk,
    c10::string_view normalize, c10::string_view window, c10::string_view border, bool need_q, bool need_k,
    bool need_v) {
  const Config c = make_config(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border);
  check_cuda_inputs(q, c);
  const bool with_gl = check_backward_inputs(c, grad_out, grad_topk_logits, stats, topk_index, at::kFloat);
  if (need_k || need_v) alert_atomic_backward("vosops::local_attention_backward (CUDA: the gradients of k and v)");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq, dk, dv;
  if (need_q) dq = at::zeros({c.B, c.H, c.W, c.C}, f32);
  if (need_k) dk = at::zeros({c.B, c.N, c.H, c.W, c.C}, f32);
  if (need_v) dv = at::zeros({c.B, c.N, c.H, c.W, c.Cv}, f32);
  if ((need_q || need_k || need_v) && c.B * c.H * c.W > 0) {
    const Prepared r = prepare(c, q, k, v, offsets);
    const at::Tensor g = to_cl(grad_out);
    const at::Tensor gl = with_gl ? grad_topk_logits->to(at::kFloat).contiguous() : at::Tensor();
    const at::Tensor st = stats.contiguous(), idx = topk_index.contiguous();
    check_launch(backward_cuda(r.p, g.const_data_ptr<float>(), with_gl ? gl.const_data_ptr<float>() : nullptr,
                               st.const_data_ptr<float>(), c.topk ? idx.const_data_ptr<int64_t>() : nullptr,
                               need_q ? dq.data_ptr<float>() : nullptr, need_k ? dk.data_ptr<float>() : nullptr,
                               need_v ? dv.data_ptr<float>() : nullptr, current_stream()),
                 "local_attention_backward");
  }
  const auto st = q.scalar_type();
  at::Tensor gq = need_q ? dq.permute({0, 3, 1, 2}).to(st).contiguous() : q.new_empty({0});
  at::Tensor gk = need_k ? dk.permute({0, 1, 4, 2, 3}).to(st).contiguous() : k.new_empty({0});
  at::Tensor gv = need_v ? dv.permute({0, 1, 4, 2, 3}).to(st).contiguous() : v.new_empty({0});
  return {gq, gk, gv};
}

}  // namespace
}  // namespace local_attention
}  // namespace vosops

TORCH_LIBRARY_IMPL(vosops, CUDA, m) {
  m.impl("local_attention", &vosops::local_attention::local_attention_cuda);
  m.impl("local_attention_backward", &vosops::local_attention::local_attention_backward_cuda);
}
