// merge_topk CUDA glue: checks, allocation and the launch on PyTorch's current stream. Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/native.h"
#include "topk/merge_topk.h"
#include "topk/merge_topk_cuda.cuh"

namespace vosops {
namespace topk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_topk_cuda_op(const at::Tensor& logits_in,
                                                                  const at::Tensor& index_in, int64_t topk) {
  check_merge_args(logits_in, index_in, topk);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), index = index_in.contiguous();
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2);
  at::Tensor out_l = new_output({B, M, topk}, logits.options());
  at::Tensor out_i = new_output({B, M, topk}, index.options());
  at::Tensor out_s = new_output({B, M, topk}, index.options());
  const cudaError_t err = merge_topk_cuda(to_dtype(logits.scalar_type()), logits.const_data_ptr(),
                                          index.const_data_ptr<int64_t>(), B * M, N, topk, out_l.data_ptr(),
                                          out_i.data_ptr<int64_t>(), out_s.data_ptr<int64_t>(),
                                          current_stream());
  check_launch(err, "merge_topk");
  return {out_l, out_i, out_s};
}

}  // namespace
}  // namespace topk
}  // namespace vosops

TORCH_LIBRARY_IMPL(vosops, CUDA, m) { m.impl("merge_topk", &vosops::topk::merge_topk_cuda_op); }
