// topk CUDA glue: checks, allocation and the launches on PyTorch's current stream. Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/native.h"
#include "topk/topk.h"
#include "topk/topk_cuda.cuh"

namespace vosops {
namespace topk {
namespace {

std::tuple<at::Tensor, at::Tensor> global_topk_cuda_op(const at::Tensor& q, const at::Tensor& k, int64_t topk,
                                                       double scale, const std::optional<at::Tensor>& key_mask) {
  const at::Tensor mask = check_global_topk_args(q, k, topk, scale, key_mask);
  const int64_t B = q.size(0), M = q.size(1);
  TORCH_CHECK_VALUE(B <= 65535, "global_topk: at most 65535 batch entries per call on CUDA (one grid row each), got ",
                    B);
  const c10::cuda::CUDAGuard guard(q.device());
  check_shared_memory("global_topk", global_topk_shared_bytes(to_dtype(q.scalar_type()), topk, q.size(2)),
                      "topk = " + std::to_string(topk) + " with C = " + std::to_string(q.size(2)) + " channels");
  at::Tensor out_l = new_output({B, M, topk}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor out_i = new_output({B, M, topk}, q.options().dtype(at::kLong));
  check_launch(global_topk_cuda(to_dtype(q.scalar_type()), q.const_data_ptr(), shape_of<Shape3>(q),
                                k.const_data_ptr(), shape_of<Shape3>(k),
                                mask.defined() ? mask.const_data_ptr<bool>() : nullptr, topk, scale, out_l.data_ptr(),
                                out_i.data_ptr<int64_t>(), current_stream()),
               "global_topk");
  return {out_l, out_i};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_cuda_op(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, int64_t topk, double scale,
                                                                      int64_t dense_keys) {
  check_attention_inputs(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), L = k.size(2), Dv = v.size(3);
  check_attention_counts(L, topk, dense_keys, scale);
  const auto [dense, kk] = split_keys(L, topk, dense_keys);
  TORCH_CHECK_VALUE(B * H <= 65535, "topk_attention: at most 65535 batch x heads per call on CUDA (one grid row "
                    "each), got ", B, " x ", H);
  const c10::cuda::CUDAGuard guard(q.device());
  check_shared_memory("topk_attention", topk_attention_shared_bytes(to_dtype(q.scalar_type()), kk, q.size(3), Dv),
                      "topk = " + std::to_string(kk) + " kept keys with D = " + std::to_string(q.size(3)) +
                          ", Dv = " + std::to_string(Dv));
  at::Tensor out = new_output({B, H, M, Dv}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = new_output({B, H, M}, q.options().dtype(acc_type(q.scalar_type())));
  at::Tensor index = new_output({B, H, M, kk}, q.options().dtype(at::kLong));
  check_launch(topk_attention_forward_cuda(to_dtype(q.scalar_type()), q.const_data_ptr(), shape4(q),
                                           k.const_data_ptr(), shape4(k), v.const_data_ptr(), shape4(v), dense, kk,
                                           scale, out.data_ptr(), lse.data_ptr(),
                                           kk > 0 ? index.data_ptr<int64_t>() : nullptr,
                                           current_stream()),
               "topk_attention");
  return {out, lse, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_backward_cuda_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& index, double scale, int64_t dense_keys) {
  check_attention_backward(grad_out, q, k, v, out, lse, index);
  check_scale("topk_attention_backward", scale);
  TORCH_CHECK_VALUE(q.size(0) * q.size(1) <= 65535, "topk_attention_backward: at most 65535 batch x heads per call "
                    "on CUDA (one grid row each), got ", q.size(0), " x ", q.size(1));
  alert_atomic_backward("vosops::topk_attention_backward (CUDA: the gradients of q, k and v)");
  const int64_t kk = index.size(-1);
  const int64_t dense = kk == 0 ? k.size(2) : dense_keys;
  const c10::cuda::CUDAGuard guard(q.device());
  check_shared_memory("topk_attention_backward",
                      topk_attention_shared_bytes(to_dtype(q.scalar_type()), kk, q.size(3), v.size(3)),
                      "D = " + std::to_string(q.size(3)) + ", Dv = " + std::to_string(v.size(3)));
  const auto acc = acc_type(q.scalar_type());
  at::Tensor g = grad_out.to(q.scalar_type());
  at::Tensor o = out.contiguous(), l = lse.to(acc).contiguous(), ix = index.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().dtype(acc));
  at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(acc));
  at::Tensor dv = at::zeros(v.sizes(), v.options().dtype(acc));
  check_launch(topk_attention_backward_cuda(to_dtype(q.scalar_type()), g.const_data_ptr(), shape4(g),
                                            q.const_data_ptr(), shape4(q), k.const_data_ptr(), shape4(k),
                                            v.const_data_ptr(), shape4(v), o.const_data_ptr(), l.const_data_ptr(),
                                            kk > 0 ? ix.const_data_ptr<int64_t>() : nullptr, dense, kk, scale,
                                            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                            current_stream()),
               "topk_attention_backward");
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace
}  // namespace topk
}  // namespace vosops

TORCH_LIBRARY_IMPL(vosops, CUDA, m) {
  m.impl("global_topk", &vosops::topk::global_topk_cuda_op);
  m.impl("topk_attention", &vosops::topk::topk_attention_cuda_op);
  m.impl("topk_attention_backward", &vosops::topk::topk_attention_backward_cuda_op);
}
