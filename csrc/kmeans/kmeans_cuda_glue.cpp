// kmeans CUDA glue: checks, allocation and the launches on PyTorch's current stream. Built only with CUDA.
// lengths are clamped to [0, N] by the kernel (checking them here would synchronise); vosops.kmeans validates them.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/native.h"
#include "kmeans/kmeans.h"
#include "kmeans/kmeans_cuda.cuh"

namespace vosops {
namespace kmeans {
namespace {

std::vector<at::Tensor> run_cuda(const char* op, const at::Tensor& x_in, const at::Tensor& lengths_in,
                                 const at::Tensor& centers_in, bool accumulate) {
  check_inputs(op, x_in, lengths_in, centers_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers_in.size(1);
  TORCH_CHECK_VALUE(N > 0 && D > 0, op, ": x must have at least one point and one feature, got shape ", x.sizes());
  TORCH_CHECK_VALUE(B <= 65535, op, ": at most 65535 problems per call on CUDA, got ", B);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor centers = centers_in.to(acc).contiguous();
  at::Tensor labels = new_output({B, N}, x.options().dtype(at::kLong));
  at::Tensor mindist = new_output({B, N}, x.options().dtype(acc));
  at::Tensor sums, counts, workspace;
  const DType dtype = to_dtype(x.scalar_type());
  if (accumulate) {
    sums = new_output({B, K, D}, x.options().dtype(acc));
    counts = new_output({B, K}, x.options().dtype(at::kLong));
    workspace = at::empty({static_cast<int64_t>(step_workspace_bytes(dtype, B, N, D, K, true))},
                          x.options().dtype(at::kByte));
  }
  const cudaError_t err =
      step_cuda(dtype, x.const_data_ptr(), B, N, D, lengths.const_data_ptr<int64_t>(), centers.const_data_ptr(), K,
                labels.data_ptr<int64_t>(), mindist.data_ptr(), accumulate ? sums.data_ptr() : nullptr,
                accumulate ? counts.data_ptr<int64_t>() : nullptr, accumulate ? workspace.data_ptr() : nullptr,
                current_stream());
  TORCH_CHECK(err != cudaErrorInvalidValue, op, ": K * D = ", K * D,
              " centre values do not fit in the GPU's shared memory; use the triton or reference backend");
  check_launch(err, op);
  if (accumulate) return {labels, mindist, sums, counts};
  return {labels, mindist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step_cuda(const at::Tensor& x,
                                                                          const at::Tensor& lengths,
                                                                          const at::Tensor& centers) {
  auto r = run_cuda("kmeans_step", x, lengths, centers, true);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cuda(const at::Tensor& x, const at::Tensor& lengths,
                                                      const at::Tensor& centers) {
  auto r = run_cuda("kmeans_assign", x, lengths, centers, false);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_update_cuda(
    const at::Tensor& x_in, const at::Tensor& lengths, const at::Tensor& labels, const at::Tensor& mindist,
    const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& centers, const at::Tensor& active,
    const at::Tensor& n_iter, const at::Tensor& labels_equal, const at::Tensor& tol) {
  const char* op = "kmeans_update";
  check_update_inputs(op, x_in, lengths, labels, mindist, sums, counts, centers, active, n_iter, labels_equal, tol);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers.size(1);
  TORCH_CHECK_VALUE(K <= kCudaUpdateMaxK, op, ": at most ", kCudaUpdateMaxK, " clusters on CUDA, got ", K,
                    "; use the reference backend");
  TORCH_CHECK_VALUE(B <= 0x7fffffff, op, ": at most 2^31 - 1 problems on CUDA, got ", B);
  TORCH_CHECK_VALUE(K * D <= (1 << 24), op, ": at most 2^24 centre values (K * D) on CUDA, got ", K * D,
                    "; use the reference backend");
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor c = centers.to(acc).contiguous();
  const at::Tensor md = mindist.to(acc).contiguous(), s = sums.to(acc).contiguous(), t = tol.to(acc).contiguous();
  const at::Tensor lab = labels.contiguous(), cnt = counts.contiguous(), len = lengths.contiguous();
  const at::Tensor act = active.contiguous(), it = n_iter.contiguous(), eq = labels_equal.contiguous();
  at::Tensor centers_out = new_output({B, K, D}, c.options());
  at::Tensor active_out = new_output({B}, act.options());
  at::Tensor n_iter_out = new_output({B}, it.options());
  check_launch(update_cuda(to_dtype(x.scalar_type()), x.const_data_ptr(), B, N, D, K, len.const_data_ptr<int64_t>(),
                           lab.const_data_ptr<int64_t>(), md.const_data_ptr(), s.const_data_ptr(),
                           cnt.const_data_ptr<int64_t>(), c.const_data_ptr(), act.const_data_ptr<bool>(),
                           it.const_data_ptr<int64_t>(), eq.const_data_ptr<bool>(), t.const_data_ptr(),
                           centers_out.data_ptr(), active_out.data_ptr<bool>(), n_iter_out.data_ptr<int64_t>(),
                           current_stream()),
               op);
  return {centers_out, active_out, n_iter_out};
}

}  // namespace
}  // namespace kmeans
}  // namespace vosops

TORCH_LIBRARY_IMPL(vosops, CUDA, m) {
  m.impl("kmeans_step", &vosops::kmeans::kmeans_step_cuda);
  m.impl("kmeans_assign", &vosops::kmeans::kmeans_assign_cuda);
  m.impl("kmeans_update", &vosops::kmeans::kmeans_update_cuda);
}
