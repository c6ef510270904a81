// merge_topk: the top-k of the union of candidate lists (a CRW / Mask-VOS memory read: frame 0 searched globally,
// the other frames in a local window, one joint top-k). Schema and CPU kernel.
//
// The op takes the lists concatenated, logits/index (B, M, N), and returns (logits, index, source) (B, M, topk):
// source is each output's position in the N inputs (-1 for padding), which the backward scatters the gradient to.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/native.h"
#include "topk/merge_topk.h"
#include "topk/merge_topk_math.h"

namespace vosops {
namespace topk {
namespace {

template <typename scalar_t>
void merge_impl(const at::Tensor& logits, const at::Tensor& index, int64_t topk, at::Tensor& out_l,
                at::Tensor& out_i, at::Tensor& out_s) {
  // float holds every half/bfloat16 value exactly, so comparing in it keeps the order of the inputs.
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t rows = logits.size(0) * logits.size(1), N = logits.size(2);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  scalar_t* olp = out_l.data_ptr<scalar_t>();
  int64_t* oip = out_i.data_ptr<int64_t>();
  int64_t* osp = out_s.data_ptr<int64_t>();
  const scalar_t pad = static_cast<scalar_t>(-std::numeric_limits<acc_t>::infinity());
  at::parallel_for(0, rows, std::max<int64_t>(1, 2048 / N), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> pos(N);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* l = lp + row * N;
      const int64_t* ix = ip + row * N;
      int64_t n = 0;
      for (int64_t j = 0; j < N; ++j) {
        if (candidate_valid(static_cast<acc_t>(l[j]), ix[j])) pos[n++] = j;
      }
      const int64_t kk = std::min(n, topk);
      std::partial_sort(pos.begin(), pos.begin() + kk, pos.begin() + n, [&](int64_t a, int64_t b) {
        return merge_before(static_cast<acc_t>(l[a]), ix[a], a, static_cast<acc_t>(l[b]), ix[b], b);
      });
      const int64_t o = row * topk;
      for (int64_t j = 0; j < topk; ++j) {
        const bool have = j < kk;
        olp[o + j] = have ? l[pos[j]] : pad;
        oip[o + j] = have ? ix[pos[j]] : -1;
        osp[o + j] = have ? pos[j] : -1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_topk_cpu(const at::Tensor& logits_in, const at::Tensor& index_in,
                                                              int64_t topk) {
  check_merge_args(logits_in, index_in, topk);
  const at::Tensor logits = logits_in.detach().contiguous(), index = index_in.contiguous();
  const int64_t B = logits.size(0), M = logits.size(1);
  at::Tensor out_l = new_output({B, M, topk}, logits.options());
  at::Tensor out_i = new_output({B, M, topk}, index.options());
  at::Tensor out_s = new_output({B, M, topk}, index.options());
  if (out_l.numel() == 0) return {out_l, out_i, out_s};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "merge_topk_cpu",
                                  [&] { merge_impl<scalar_t>(logits, index, topk, out_l, out_i, out_s); });
  return {out_l, out_i, out_s};
}

}  // namespace
}  // namespace topk
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def("merge_topk(Tensor logits, Tensor index, int topk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) { m.impl("merge_topk", &vosops::topk::merge_topk_cpu); }
