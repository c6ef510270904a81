// flow_warp CUDA launchers: torch-free (raw pointers, sizes, strides, a stream). Return the launch error.
#pragma once
#include <cuda_runtime_api.h>

#include "common/host_device.h"
#include "flow_warp/flow_warp_math.h"

namespace vosops {
namespace flow_warp {

// out: contiguous (B, C, H, W) of x's type.
cudaError_t forward_cuda(DType dtype, const void* x, Shape4 xs, const void* flow, Shape4 fs, void* out, Mode mode,
                         Padding pad, cudaStream_t stream);

// Scratch bytes backward_cuda needs (the d(flow) partial sums of its channel groups; 0 when grad_flow is not asked).
size_t backward_workspace_bytes(DType dtype, Shape4 xs, bool grad_flow);

// grad_x_acc: zero-filled contiguous (B, C, H, W) accumulator, float32 (float64 when dtype is Float64), or null.
// grad_flow: contiguous (B, 2, H, W) of x's type, or null. Bilinear only for grad_flow. workspace:
// backward_workspace_bytes(dtype, xs, grad_flow != null) bytes, suitably aligned (a cudaMalloc'd block).
cudaError_t backward_cuda(DType dtype, const void* grad_out, Shape4 gs, const void* x, Shape4 xs, const void* flow,
                          Shape4 fs, void* grad_x_acc, void* grad_flow, void* workspace, Mode mode, Padding pad,
                          cudaStream_t stream);

}  // namespace flow_warp
}  // namespace vosops
