// Torch-free candidate rules of merge_topk and topk_aggregate, shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace vosops {
namespace topk {

// A candidate takes part when its index is set and its logit is above -inf (NaN fails the comparison).
template <typename acc_t>
VOSOPS_HD bool candidate_valid(acc_t logit, int64_t index) {
  return index >= 0 && logit > static_cast<acc_t>(-INFINITY);
}

// merge_topk's order, the reference's two stable sorts: logit descending, then index ascending, then position in
// the concatenated input (duplicate indices keep their input order, which decides where the gradient goes).
template <typename acc_t>
VOSOPS_HD bool merge_before(acc_t a, int64_t ia, int64_t pa, acc_t b, int64_t ib, int64_t pb) {
  return a > b || (a == b && (ia < ib || (ia == ib && pa < pb)));
}

// topk_aggregate's threshold rule without a sort: a valid candidate is kept when fewer than min(k, K) valid
// logits are strictly greater, which is exactly "logit >= the k-th largest" with ties kept (and every valid
// candidate when fewer than k are valid).
VOSOPS_HD bool threshold_keeps(int64_t strictly_greater, int64_t k, int64_t K) {
  return strictly_greater < (k < K ? k : K);
}

}  // namespace topk
}  // namespace vosops
