// flow_warp CUDA glue: checks, allocation and the launch on PyTorch's current stream. Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/native.h"
#include "flow_warp/flow_warp.h"
#include "flow_warp/flow_warp_cuda.cuh"

namespace vosops {
namespace flow_warp {
namespace {

at::Tensor flow_warp_cuda(const at::Tensor& x, const at::Tensor& flow, c10::string_view mode_name,
                          c10::string_view padding_name) {
  check_inputs(x, flow);
  const Mode mode = parse_mode(mode_name);
  const Padding pad = parse_padding(padding_name);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(forward_cuda(to_dtype(x.scalar_type()), x.const_data_ptr(), shape4(x), flow.const_data_ptr(),
                            shape4(flow), out.data_ptr(), mode, pad, current_stream()),
               "flow_warp");
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_warp_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& flow, c10::string_view mode_name,
                                                           c10::string_view padding_name, bool need_x_grad,
                                                           bool need_flow_grad) {
  const c10::cuda::CUDAGuard guard(x.device());
  BackwardBuffers b =
      prepare_backward(grad_out, x, flow, mode_name, padding_name, need_x_grad, need_flow_grad);
  if (need_x_grad) alert_atomic_backward("vosops::flow_warp_backward (CUDA: the gradient of x)");
  const DType dtype = to_dtype(x.scalar_type());
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(backward_workspace_bytes(dtype, shape4(x), b.flow_kernel))}, x.options().dtype(at::kByte));
  check_launch(backward_cuda(dtype, grad_out.const_data_ptr(), shape4(grad_out),
                             x.const_data_ptr(), shape4(x), flow.const_data_ptr(), shape4(flow),
                             need_x_grad ? b.grad_x_acc.data_ptr() : nullptr,
                             b.flow_kernel ? b.grad_flow.data_ptr() : nullptr, workspace.data_ptr(), b.mode, b.pad,
                             current_stream()),
               "flow_warp_backward");
  return finish_backward(b, x);
}

}  // namespace
}  // namespace flow_warp
}  // namespace vosops

TORCH_LIBRARY_IMPL(vosops, CUDA, m) {
  m.impl("flow_warp", &vosops::flow_warp::flow_warp_cuda);
  m.impl("flow_warp_backward", &vosops::flow_warp::flow_warp_backward_cuda);
}
