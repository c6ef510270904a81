// flow_warp glue shared by the CPU and CUDA implementations: argument checks and mode parsing.
#pragma once
#include <ATen/ATen.h>

#include <string>

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

}  // namespace flow_warp
}  // namespace vosops
