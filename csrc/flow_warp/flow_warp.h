// flow_warp glue shared by the CPU and CUDA implementations: argument checks and mode parsing.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "common/native.h"
#include "flow_warp/flow_warp_math.h"

namespace vosops {
namespace flow_warp {

inline Mode parse_mode(c10::string_view mode) {
  if (mode == "bilinear") return Mode::Bilinear;
  if (mode == "nearest") return Mode::Nearest;
  TORCH_CHECK_VALUE(false, "flow_warp: mode must be 'bilinear' or 'nearest', got '", std::string(mode), "'");
}

inline Padding parse_padding(c10::string_view padding) {
  if (padding == "zeros") return Padding::Zeros;
  if (padding == "border") return Padding::Border;
  TORCH_CHECK_VALUE(false, "flow_warp: padding_mode must be 'zeros' or 'border', got '", std::string(padding), "'");
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& flow) {
  TORCH_CHECK_VALUE(x.dim() == 4, "flow_warp: x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(flow.dim() == 4 && flow.size(1) == 2, "flow_warp: flow must be (B, 2, H, W), got shape ",
                    flow.sizes());
  TORCH_CHECK_VALUE(flow.size(0) == x.size(0) && flow.size(2) == x.size(2) && flow.size(3) == x.size(3),
                    "flow_warp: flow ", flow.sizes(), " does not match x ", x.sizes(), " in batch or spatial size");
  TORCH_CHECK_TYPE(x.scalar_type() == flow.scalar_type(), "flow_warp: x and flow must have the same dtype, got ",
                   x.scalar_type(), " and ", flow.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "flow_warp: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == flow.device(), "flow_warp: x and flow must be on the same device, got ",
                    x.device(), " and ", flow.device());
}

// What a backward call allocates on either device: an accumulator for d(x) (float32; float64 for double inputs),
// zeroed unless the caller's kernel zeroes it itself (`zero_grad_x` false), and d(flow) (written by the kernel for
// bilinear; zeros for nearest, which is piecewise constant in the flow). Unrequested gradients are empty tensors.
struct BackwardBuffers {
  Mode mode;
  Padding pad;
  at::Tensor grad_x_acc;  // undefined unless d(x) is needed
  at::Tensor grad_flow;
  bool flow_kernel;  // the kernel must write grad_flow
};

inline BackwardBuffers prepare_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& flow,
                                        c10::string_view mode_name, c10::string_view padding_name, bool need_x_grad,
                                        bool need_flow_grad, bool zero_grad_x = true) {
  check_inputs(x, flow);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "flow_warp_backward: grad_out ", grad_out.sizes(),
                    " must match x ", x.sizes());
  BackwardBuffers b;
  b.mode = parse_mode(mode_name);
  b.pad = parse_padding(padding_name);
  b.flow_kernel = need_flow_grad && b.mode == Mode::Bilinear && x.numel() > 0;
  if (need_x_grad) {
    const auto acc_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    b.grad_x_acc = zero_grad_x ? at::zeros(x.sizes(), acc_opts) : new_output(x.sizes(), acc_opts);
  }
  const auto flow_opts = flow.options().memory_format(at::MemoryFormat::Contiguous);
  b.grad_flow = !need_flow_grad  ? flow.new_empty({0})
                : b.flow_kernel ? new_output(flow.sizes(), flow_opts)
                                : at::zeros(flow.sizes(), flow_opts);
  return b;
}

inline std::tuple<at::Tensor, at::Tensor> finish_backward(const BackwardBuffers& b, const at::Tensor& x) {
  at::Tensor grad_x = b.grad_x_acc.defined() ? b.grad_x_acc.to(x.scalar_type()) : x.new_empty({0});
  return {grad_x, b.grad_flow};
}

}  // namespace flow_warp
}  // namespace vosops
