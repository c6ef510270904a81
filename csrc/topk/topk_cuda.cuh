// topk CUDA launchers: torch-free (raw pointers, sizes, strides, a stream). Return the launch error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/host_device.h"

namespace vosops {
namespace topk {

struct Shape3 {
  int64_t size[3];
  int64_t stride[3];
};

// q (B, M, C), k (B, L, C) of one dtype; key_mask: contiguous (B, L) bool or null. out_logits (B, M, topk) contiguous
// of q's dtype, out_index (B, M, topk) contiguous int64 (-1 / -inf pad when fewer than topk keys are valid).
cudaError_t global_topk_cuda(DType dtype, const void* q, Shape3 qs, const void* k, Shape3 ks, const bool* key_mask,
                             int64_t topk, double scale, void* out_logits, int64_t* out_index, cudaStream_t stream);

// q (B, H, M, D), k (B, H, L, D), v (B, H, L, Dv). Keys [0, dense) are kept; kk > 0 sparse keys per query among
// [dense, L). out (B, H, M, Dv) contiguous of q's dtype; lse (B, H, M) contiguous in the accumulation type
// (float, double for Float64); index (B, H, M, kk) contiguous int64.
cudaError_t topk_attention_forward_cuda(DType dtype, const void* q, Shape4 qs, const void* k, Shape4 ks, const void* v,
                                        Shape4 vs, int64_t dense, int64_t kk, double scale, void* out, void* lse,
                                        int64_t* index, cudaStream_t stream);

// grad_out (B, H, M, Dv) any strides; out, lse, index as written by the forward. dq (B, H, M, D) contiguous in the
// accumulation type (written); dk (B, H, L, D), dv (B, H, L, Dv) contiguous zero-filled accumulators (atomics).
cudaError_t topk_attention_backward_cuda(DType dtype, const void* grad_out, Shape4 gs, const void* q, Shape4 qs,
                                         const void* k, Shape4 ks, const void* v, Shape4 vs, const void* out,
                                         const void* lse, const int64_t* index, int64_t dense, int64_t kk, double scale,
                                         void* dq, void* dk, void* dv, cudaStream_t stream);

// Dynamic shared memory per block the kernels take: global_topk's grows with topk (a running list per query of a
// block), topk_attention's forward with the kept sparse keys kk. The glue checks them against the device's limit,
// so a too large topk is an error naming it rather than a failed launch.
size_t global_topk_shared_bytes(DType dtype, int64_t topk, int64_t C);
size_t topk_attention_shared_bytes(DType dtype, int64_t kk, int64_t D, int64_t Dv);

}  // namespace topk
}  // namespace vosops
