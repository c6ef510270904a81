// Torch-free pieces of the top-k ops shared by the CPU and CUDA kernels: the candidate order and a running
// top-k list.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace vosops {
namespace topk {

// The order every backend uses: larger logit first, equal logits to the lower key index.
template <typename acc_t>
VOSOPS_HD bool ranks_before(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}

// A running top-k list, sorted by ranks_before, over caller-owned storage (k slots). Candidates must arrive in
// increasing key index (key tiles swept in order): then a candidate equal to the current k-th logit loses the tie,
// and `v > threshold()` is the whole admission test. NaN and -inf never pass it.
template <typename acc_t>
struct RunningTopK {
  acc_t* val;
  int64_t* idx;
  int64_t k;
  int64_t n;

  VOSOPS_HD void reset(acc_t* v, int64_t* i, int64_t k_) {
    val = v;
    idx = i;
    k = k_;
    n = 0;
  }
  VOSOPS_HD acc_t threshold(acc_t neg_inf) const { return n < k ? neg_inf : val[k - 1]; }
  // Insert (v, i); the caller has checked v > threshold().
  VOSOPS_HD void push(acc_t v, int64_t i) {
    int64_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && v > val[pos - 1]) {  // equal logits already in the list have lower indices: keep them first
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = i;
  }
};

}  // namespace topk
}  // namespace vosops
