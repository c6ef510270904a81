// kmeans: op schemas and the CPU kernels of the fused Lloyd pass (kmeans_step) and the assignment (kmeans_assign).
//
// One pass over x: for each point the squared distance to every centre (sum_d (x_d - c_d)^2, accumulated in
// float32, float64 for float64 input), the argmin (ties to the lower index), and the point added to its cluster's
// running sum. Work is split into (problem, chunk of kChunk points) tasks; each task owns its own partial sums, and
// the partials are reduced in chunk order afterwards, so the result is deterministic for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/native.h"
#include "kmeans/kmeans.h"

namespace vosops {
namespace kmeans {
namespace {

// Squared distances of one point to K centres, each with eight independent partial sums: the fixed-width inner
// loop maps onto one SIMD register without reassociating anything. Compiled for AVX2+FMA and for the baseline ISA;
// the loader picks the clone the CPU supports (results are reproducible on a given machine).
#define VOSOPS_KMEANS_DIST_BODY                                                   \
  for (int64_t k = 0; k < K; ++k) {                                               \
    const auto* ck = c + k * D;                                                   \
    decltype(+*c) p[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                \
    int64_t d = 0;                                                                \
    for (; d + 8 <= D; d += 8) {                                                  \
      for (int l = 0; l < 8; ++l) {                                               \
        const auto t = x[d + l] - ck[d + l];                                      \
        p[l] += t * t;                                                            \
      }                                                                           \
    }                                                                             \
    for (int l = 0; d < D; ++d, ++l) {                                            \
      const auto t = x[d] - ck[d];                                                \
      p[l] += t * t;                                                              \
    }                                                                             \
    out[k] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));   \
  }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VOSOPS_KMEANS_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define VOSOPS_KMEANS_CLONES
#endif

VOSOPS_KMEANS_CLONES void distances(const float* x, const float* c, int64_t K, int64_t D, float* out) {
  VOSOPS_KMEANS_DIST_BODY
}
VOSOPS_KMEANS_CLONES void distances(const double* x, const double* c, int64_t K, int64_t D, double* out) {
  VOSOPS_KMEANS_DIST_BODY
}

template <typename scalar_t>
void step_cpu(const at::Tensor& x, const int64_t* lengths, const at::Tensor& centers, int64_t* labels,
              at::opmath_type<scalar_t>* mindist, at::opmath_type<scalar_t>* sums, int64_t* counts) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers.size(1);
  const int64_t nchunk = (N + kChunk - 1) / kChunk;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* cp = centers.const_data_ptr<acc_t>();
  const bool accumulate = sums != nullptr;
  std::vector<acc_t> psum(accumulate ? static_cast<size_t>(B * nchunk * K * D) : 0);
  std::vector<int64_t> pcount(accumulate ? static_cast<size_t>(B * nchunk * K) : 0);
  at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(kConvert ? D : 0), dist(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunk, ch = task % nchunk;
      const int64_t len = std::clamp<int64_t>(lengths[b], 0, N);
      const int64_t p0 = ch * kChunk, p1 = std::min(N, p0 + kChunk);
      const acc_t* cb = cp + b * K * D;
      acc_t* ps = accumulate ? psum.data() + task * K * D : nullptr;
      int64_t* pc = accumulate ? pcount.data() + task * K : nullptr;
      if (accumulate) {
        std::fill(ps, ps + K * D, acc_t(0));
        std::fill(pc, pc + K, int64_t(0));
      }
      for (int64_t i = p0; i < p1; ++i) {
        const int64_t o = b * N + i;
        if (i >= len) {  // padding: ignored
          labels[o] = -1;
          mindist[o] = acc_t(0);
          continue;
        }
        const scalar_t* xr = xp + o * D;
        const acc_t* xa;
        if constexpr (kConvert) {
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<acc_t>(xr[d]);
          xa = row.data();
        } else {
          xa = xr;
        }
        distances(xa, cb, K, D, dist.data());
        acc_t best = dist[0];
        int64_t arg = 0;
        for (int64_t k = 1; k < K; ++k) {
          if (dist[k] < best) {
            best = dist[k];
            arg = k;
          }
        }
        labels[o] = arg;
        mindist[o] = best;
        if (accumulate) {
          acc_t* s = ps + arg * D;
          for (int64_t d = 0; d < D; ++d) s[d] += xa[d];
          pc[arg] += 1;
        }
      }
    }
  });
  if (!accumulate) return;
  // Deterministic reduction: chunks in order, parallel over (problem, centre).
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      acc_t* s = sums + bk * D;
      std::fill(s, s + D, acc_t(0));
      int64_t c = 0;
      for (int64_t ch = 0; ch < nchunk; ++ch) {
        const acc_t* p = psum.data() + ((b * nchunk + ch) * K + k) * D;
        for (int64_t d = 0; d < D; ++d) s[d] += p[d];
        c += pcount[(b * nchunk + ch) * K + k];
      }
      counts[bk] = c;
    }
  });
}

void check_lengths_cpu(const char* op, const at::Tensor& lengths, int64_t N) {
  if (lengths.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(lengths);
  TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= N, op, ": lengths must lie in [0, ", N,
                    "], got [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
}

std::vector<at::Tensor> run_cpu(const char* op, const at::Tensor& x_in, const at::Tensor& lengths_in,
                                const at::Tensor& centers_in, bool accumulate) {
  check_inputs(op, x_in, lengths_in, centers_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centers_in.size(1);
  TORCH_CHECK_VALUE(N > 0 && D > 0, op, ": x must have at least one point and one feature, got shape ", x.sizes());
  check_lengths_cpu(op, lengths, N);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor centers = centers_in.to(acc).contiguous();
  at::Tensor labels = new_output({B, N}, x.options().dtype(at::kLong));
  at::Tensor mindist = new_output({B, N}, x.options().dtype(acc));
  at::Tensor sums, counts;
  if (accumulate) {
    sums = new_output({B, K, D}, x.options().dtype(acc));
    counts = new_output({B, K}, x.options().dtype(at::kLong));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    step_cpu<scalar_t>(x, lengths.const_data_ptr<int64_t>(), centers, labels.data_ptr<int64_t>(),
                       mindist.data_ptr<acc_t>(), accumulate ? sums.data_ptr<acc_t>() : nullptr,
                       accumulate ? counts.data_ptr<int64_t>() : nullptr);
  });
  if (accumulate) return {labels, mindist, sums, counts};
  return {labels, mindist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step_cpu(const at::Tensor& x,
                                                                         const at::Tensor& lengths,
                                                                         const at::Tensor& centers) {
  auto r = run_cpu("kmeans_step", x, lengths, centers, true);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& lengths,
                                                     const at::Tensor& centers) {
  auto r = run_cpu("kmeans_assign", x, lengths, centers, false);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace kmeans
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def("kmeans_step(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kmeans_assign(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("kmeans_step", &vosops::kmeans::kmeans_step_cpu);
  m.impl("kmeans_assign", &vosops::kmeans::kmeans_assign_cpu);
}
