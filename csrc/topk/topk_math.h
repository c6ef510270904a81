// Torch-free definition of the candidate order shared by the top-k kernels.
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

}  // namespace topk
}  // namespace vosops
