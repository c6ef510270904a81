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

// Squared distances of one point to K centres, written with explicit 8-lane vectors (GCC/Clang vector extensions:
// one AVX register for float in the Haswell clone, pairs of SSE registers in the baseline one). Lane l sums the
// dimensions l, l+8, ...; the lanes are then added in a fixed tree and the D % 8 tail last, so the result does not
// depend on the thread count. Four centres share each loaded x vector.
template <typename T>
struct Vec8 {
  typedef T type __attribute__((vector_size(8 * sizeof(T))));
};

template <typename V, typename T>
__attribute__((always_inline)) inline V load8(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// Lane sums in the tree ((v0+v4) + (v1+v5)) + ((v2+v6) + (v3+v7)); hsum8x4 does four vectors at once with the
// same tree (shuffles instead of scalar extracts).
template <typename V>
__attribute__((always_inline)) inline auto hsum8(const V& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

template <typename V>
__attribute__((always_inline)) inline auto hsum8x4(const V& a0, const V& a1, const V& a2, const V& a3) {
  const auto h0 = __builtin_shufflevector(a0, a0, 0, 1, 2, 3) + __builtin_shufflevector(a0, a0, 4, 5, 6, 7);
  const auto h1 = __builtin_shufflevector(a1, a1, 0, 1, 2, 3) + __builtin_shufflevector(a1, a1, 4, 5, 6, 7);
  const auto h2 = __builtin_shufflevector(a2, a2, 0, 1, 2, 3) + __builtin_shufflevector(a2, a2, 4, 5, 6, 7);
  const auto h3 = __builtin_shufflevector(a3, a3, 0, 1, 2, 3) + __builtin_shufflevector(a3, a3, 4, 5, 6, 7);
  const auto e01 = __builtin_shufflevector(h0, h1, 0, 2, 4, 6) + __builtin_shufflevector(h0, h1, 1, 3, 5, 7);
  const auto e23 = __builtin_shufflevector(h2, h3, 0, 2, 4, 6) + __builtin_shufflevector(h2, h3, 1, 3, 5, 7);
  return __builtin_shufflevector(e01, e23, 0, 2, 4, 6) + __builtin_shufflevector(e01, e23, 1, 3, 5, 7);
}

template <typename T>
__attribute__((always_inline)) inline void distances_body(const T* x, const T* c, int64_t K, int64_t D, T* out) {
  using V = typename Vec8<T>::type;
  const int64_t Dv = D / 8 * 8;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const T *c0 = c + k * D, *c1 = c0 + D, *c2 = c1 + D, *c3 = c2 + D;
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t d = 0; d < Dv; d += 8) {
      const V xv = load8<V>(x + d);
      const V t0 = xv - load8<V>(c0 + d), t1 = xv - load8<V>(c1 + d);
      const V t2 = xv - load8<V>(c2 + d), t3 = xv - load8<V>(c3 + d);
      a0 += t0 * t0;
      a1 += t1 * t1;
      a2 += t2 * t2;
      a3 += t3 * t3;
    }
    const auto r = hsum8x4(a0, a1, a2, a3);
    T r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
    for (int64_t d = Dv; d < D; ++d) {
      const T t0 = x[d] - c0[d], t1 = x[d] - c1[d], t2 = x[d] - c2[d], t3 = x[d] - c3[d];
      r0 += t0 * t0;
      r1 += t1 * t1;
      r2 += t2 * t2;
      r3 += t3 * t3;
    }
    out[k] = r0;
    out[k + 1] = r1;
    out[k + 2] = r2;
    out[k + 3] = r3;
  }
  for (; k < K; ++k) {
    const T* ck = c + k * D;
    V a = {};
    for (int64_t d = 0; d < Dv; d += 8) {
      const V t = load8<V>(x + d) - load8<V>(ck + d);
      a += t * t;
    }
    T r = hsum8(a);
    for (int64_t d = Dv; d < D; ++d) {
      const T t = x[d] - ck[d];
      r += t * t;
    }
    out[k] = r;
  }
}

// Adds a point to its cluster's running sum.
template <typename T>
__attribute__((always_inline)) inline void add_row_body(T* s, const T* x, int64_t D) {
  using V = typename Vec8<T>::type;
  const int64_t Dv = D / 8 * 8;
  for (int64_t d = 0; d < Dv; d += 8) {
    const V v = load8<V>(s + d) + load8<V>(x + d);
    __builtin_memcpy(s + d, &v, sizeof(V));
  }
  for (int64_t d = Dv; d < D; ++d) s[d] += x[d];
}

// The hot loops are compiled twice, for AVX2 + FMA and for the baseline ISA, and picked once by what the CPU
// reports (by feature, not by CPU model, so AMD and Intel both get the AVX2 path). Results are reproducible on a
// given machine (FMA contraction differs between the two paths).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define VOSOPS_KMEANS_AVX2 __attribute__((target("avx2,fma")))
const bool kUseAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
#define VOSOPS_KMEANS_AVX2
const bool kUseAvx2 = false;
#endif

template <typename T>
VOSOPS_KMEANS_AVX2 void distances_avx2(const T* x, const T* c, int64_t K, int64_t D, T* out) {
  distances_body(x, c, K, D, out);
}
template <typename T>
void distances_base(const T* x, const T* c, int64_t K, int64_t D, T* out) {
  distances_body(x, c, K, D, out);
}
template <typename T>
VOSOPS_KMEANS_AVX2 void add_row_avx2(T* s, const T* x, int64_t D) {
  add_row_body(s, x, D);
}
template <typename T>
void add_row_base(T* s, const T* x, int64_t D) {
  add_row_body(s, x, D);
}
template <typename T>
inline void distances(const T* x, const T* c, int64_t K, int64_t D, T* out) {
  kUseAvx2 ? distances_avx2(x, c, K, D, out) : distances_base(x, c, K, D, out);
}
template <typename T>
inline void add_row(T* s, const T* x, int64_t D) {
  kUseAvx2 ? add_row_avx2(s, x, D) : add_row_base(s, x, D);
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
          add_row(ps + arg * D, xa, D);
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

// The Lloyd update for all problems in one call (the Python version is ~15 small tensor ops per iteration):
// centre = sum / count (kept when the cluster is empty), squared shift summed over the problem's centres,
// converged = labels unchanged or shift <= tol; inactive problems keep their centres. Parallel over problems.
std::tuple<at::Tensor, at::Tensor> kmeans_update_cpu(const at::Tensor& centers_in, const at::Tensor& sums_in,
                                                     const at::Tensor& counts_in, const at::Tensor& labels_in,
                                                     const at::Tensor& labels_old_in, const at::Tensor& active_in,
                                                     const at::Tensor& tol_in) {
  TORCH_CHECK_VALUE(centers_in.dim() == 3, "kmeans_update: centers must be (B, K, D), got ", centers_in.sizes());
  const int64_t B = centers_in.size(0), K = centers_in.size(1), D = centers_in.size(2);
  TORCH_CHECK_VALUE(sums_in.sizes() == centers_in.sizes(), "kmeans_update: sums ", sums_in.sizes(),
                    " must match centers ", centers_in.sizes());
  TORCH_CHECK_VALUE(counts_in.dim() == 2 && counts_in.size(0) == B && counts_in.size(1) == K,
                    "kmeans_update: counts must be (B, K), got ", counts_in.sizes());
  TORCH_CHECK_VALUE(labels_in.dim() == 2 && labels_in.size(0) == B && labels_old_in.sizes() == labels_in.sizes(),
                    "kmeans_update: labels and labels_old must be (B, N), got ", labels_in.sizes(), " and ",
                    labels_old_in.sizes());
  TORCH_CHECK_VALUE(active_in.sizes() == at::IntArrayRef{B} && tol_in.sizes() == at::IntArrayRef{B},
                    "kmeans_update: active and tol must be (B,), got ", active_in.sizes(), " and ", tol_in.sizes());
  TORCH_CHECK_TYPE(centers_in.scalar_type() == at::kFloat || centers_in.scalar_type() == at::kDouble,
                   "kmeans_update: centers must be float32 or float64, got ", centers_in.scalar_type());
  TORCH_CHECK_TYPE(counts_in.scalar_type() == at::kLong && labels_in.scalar_type() == at::kLong &&
                       labels_old_in.scalar_type() == at::kLong && active_in.scalar_type() == at::kBool,
                   "kmeans_update: counts and labels must be int64 and active bool");
  const at::Tensor centers = centers_in.contiguous();
  const at::Tensor sums = sums_in.to(centers.scalar_type()).contiguous();
  const at::Tensor counts = counts_in.contiguous(), labels = labels_in.contiguous();
  const at::Tensor labels_old = labels_old_in.contiguous(), active = active_in.contiguous();
  const at::Tensor tol = tol_in.to(centers.scalar_type()).contiguous();
  const int64_t N = labels.size(1);
  at::Tensor out = new_output(centers.sizes(), centers.options());
  at::Tensor converged = new_output({B}, active.options());
  AT_DISPATCH_FLOATING_TYPES(centers.scalar_type(), "kmeans_update_cpu", [&] {
    const scalar_t* c = centers.const_data_ptr<scalar_t>();
    const scalar_t* s = sums.const_data_ptr<scalar_t>();
    const scalar_t* t = tol.const_data_ptr<scalar_t>();
    const int64_t* n = counts.const_data_ptr<int64_t>();
    const int64_t* l = labels.const_data_ptr<int64_t>();
    const int64_t* lo = labels_old.const_data_ptr<int64_t>();
    const bool* act = active.const_data_ptr<bool>();
    scalar_t* o = out.data_ptr<scalar_t>();
    bool* conv = converged.data_ptr<bool>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        scalar_t shift = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = (b * K + k) * D;
          const int64_t cnt = n[b * K + k];
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t v = cnt > 0 ? s[e + d] / static_cast<scalar_t>(cnt) : c[e + d];
            shift += (v - c[e + d]) * (v - c[e + d]);
            o[e + d] = act[b] ? v : c[e + d];
          }
        }
        bool same = true;
        for (int64_t i = 0; i < N && same; ++i) same = l[b * N + i] == lo[b * N + i];
        conv[b] = same || shift <= t[b];
      }
    });
  });
  return {out, converged};
}

}  // namespace
}  // namespace kmeans
}  // namespace vosops

TORCH_LIBRARY_FRAGMENT(vosops, m) {
  m.def("kmeans_step(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kmeans_assign(Tensor x, Tensor lengths, Tensor centers) -> (Tensor, Tensor)");
  m.def(
      "kmeans_update(Tensor centers, Tensor sums, Tensor counts, Tensor labels, Tensor labels_old, Tensor active, "
      "Tensor tol) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vosops, CPU, m) {
  m.impl("kmeans_step", &vosops::kmeans::kmeans_step_cpu);
  m.impl("kmeans_assign", &vosops::kmeans::kmeans_assign_cpu);
  m.impl("kmeans_update", &vosops::kmeans::kmeans_update_cpu);
}
