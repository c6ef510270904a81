// topk_aggregate CUDA glue: the CPU glue's checks (not the index range, which would synchronise with the host: the
// kernels drop out-of-range candidates), allocation and the launches on PyTorch's current stream. Built only with
// CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/native.h"
#include "topk/topk.h"
#include "topk/topk_aggregate_cuda.cuh"

namespace vosops {
namespace topk {
namespace {

int64_t threshold_k(c10::string_view normalize, int64_t k) {
  if (parse_normalize(normalize) == Normalize::Softmax) return 0;
  TORCH_CHECK_VALUE(k >= 1, "topk_aggregate: k must be >= 1 with 'threshold', got ", k);
  return k;
}

at::Tensor topk_aggregate_cuda_op(const at::Tensor& logits_in, const at::Tensor& index_in, const at::Tensor& values,
                                  c10::string_view normalize, int64_t k) {
  check_aggregate_inputs(logits_in, index_in, values);
  const int64_t kth = threshold_k(normalize, k);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), index = index_in.contiguous();
  const int64_t B = logits.size(0), M = logits.size(1), K = logits.size(2), Cv = values.size(2);
  at::Tensor out = new_output({B, M, Cv}, values.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ws = at::empty({B * M * K}, logits.options().dtype(acc_type(logits.scalar_type())));
  const cudaError_t err = topk_aggregate_forward_cuda(
      to_dtype(logits.scalar_type()), logits.const_data_ptr(), index.const_data_ptr<int64_t>(),
      values.const_data_ptr(), shape_of<Shape3>(values), M, K, kth, ws.data_ptr(), out.data_ptr(),
      current_stream());
  check_launch(err, "topk_aggregate");
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_aggregate_backward_cuda_op(const at::Tensor& grad_in,
                                                                   const at::Tensor& logits_in,
                                                                   const at::Tensor& index_in,
                                                                   const at::Tensor& values, c10::string_view normalize,
                                                                   int64_t k, bool need_logits, bool need_values) {
  check_aggregate_inputs(logits_in, index_in, values);
  check_aggregate_grad(grad_in, logits_in, values);
  const int64_t kth = threshold_k(normalize, k);
  if (need_values) alert_atomic_backward("vosops::topk_aggregate_backward (CUDA: the gradient of values)");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), index = index_in.contiguous();
  const at::Tensor grad = grad_in.to(values.scalar_type());
  const int64_t B = logits.size(0), M = logits.size(1), K = logits.size(2);
  const auto acc = acc_type(logits.scalar_type());
  at::Tensor gl = need_logits ? new_output(logits.sizes(), logits.options()) : logits.new_empty({0});
  at::Tensor gv_acc = need_values ? at::zeros(values.sizes(), values.options().dtype(acc)) : at::Tensor();
  if (need_logits || need_values) {
    at::Tensor ws = at::empty({3 * B * M * K}, logits.options().dtype(acc));
    const cudaError_t err = topk_aggregate_backward_cuda(
        to_dtype(logits.scalar_type()), grad.const_data_ptr(), shape_of<Shape3>(grad), logits.const_data_ptr(),
        index.const_data_ptr<int64_t>(), values.const_data_ptr(), shape_of<Shape3>(values), M, K, kth, ws.data_ptr(),
        need_logits ? gl.data_ptr() : nullptr, need_values ? gv_acc.data_ptr() : nullptr,
        current_stream());
    check_launch(err, "topk_aggregate_backward");
  }
  at::Tensor gv = need_values ? gv_acc.to(values.scalar_type()) : values.new_empty({0});
  return {gl, gv};
}

}  // namespace
}  // namespace topk
}  // namespace vosops

TORCH_LIBRARY_IMPL(vosops, CUDA, m) {
  m.impl("topk_aggregate", &vosops::topk::topk_aggregate_cuda_op);
  m.impl("topk_aggregate_backward", &vosops::topk::topk_aggregate_backward_cuda_op);
}
