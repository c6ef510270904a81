// Building blocks of the CPU row kernels of local_attention, local_affinity and local_aggregate (calls without
// offsets).
//
// Without offsets the window of query (i, j + 1) is the window of (i, j) moved one pixel right, so a candidate
// column (dy, dx) of eight consecutive queries of a row is eight consecutive keys of one key row: with the
// columns innermost (the row layout below) one 8-wide load, every product vertical in its own lane (no horizontal sums), and a key load shared by
// eight queries. The kernels here are AVX2/FMA, compiled with target attributes and chosen at run time.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VOSOPS_ROWS_AVX2 1
#endif

namespace vosops {
namespace row_kernels {

constexpr int64_t kLanes = 8;  // query pixels per block: one AVX2 vector of floats
constexpr int64_t kPad = 8;    // zero columns on each side of a padded row (>= kLanes - 1)
// local_attention scores from the row kernels up to this many channels. Against its per-query dot products (long
// contiguous dots, already efficient when wide) the row scores measured 1.65x at 64 channels, 1.6x at 128, 1.2x at
// 256 and 0.97x at 384 (DINO's ViT-S; threshold, 8 references, 30 x 53). local_affinity's other path is slower:
// its row scores measured 2.3x even at 384 channels and take every width.
constexpr int64_t kMaxScoreChannels = 256;

// A CPU with AVX2 and FMA, and the row kernels not turned off by VOSOPS_CPU_ROW_KERNELS=0 (the tests run both).
inline bool enabled() {
#ifdef VOSOPS_ROWS_AVX2
  static const bool cpu_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("VOSOPS_CPU_ROW_KERNELS");
  return cpu_ok && !(env != nullptr && std::strcmp(env, "0") == 0);
#else
  return false;
#endif
}

// Whether k (B, N, C, H, W) is float channels-last, which the other paths read in place and the row kernels would
// copy to their row layout: such a k (ViT tokens viewed as images, possibly gigabytes) keeps those paths.
inline bool read_in_place(const at::Tensor& k) {
  return k.scalar_type() == at::kFloat && k.permute({0, 1, 3, 4, 2}).is_contiguous();
}

// The row kernels' layout of a (..., C, H, W) tensor: (..., H, C, W'), a pixel row's C channel rows one after
// another. Going from one channel to the next then steps W' floats, not a whole H x W' plane: a wide-channel
// block's loads stay within a few pages (C planes apart they touched a page per channel and missed the TLB).

// The row kernels read padded copies of their operands; the other paths read a contiguous float operand in place
// (local_affinity / local_aggregate) or copy it once (local_attention's channels-last copy). Past this size of
// the reference-frame operand's padded copy (k or v) the row kernels step aside, so that a call on gigabytes of
// features does not allocate gigabytes more (a narrow frame's two 8-column borders can triple it).
constexpr int64_t kMaxCopyBytes = int64_t(1) << 30;

// Whether the padded copy of t (..., C, H, W) stays within kMaxCopyBytes.
inline bool copy_fits(const at::Tensor& t) {
  return t.numel() / std::max<int64_t>(t.size(-1), 1) * (t.size(-1) + 2 * kPad) *
             static_cast<int64_t>(sizeof(float)) <= kMaxCopyBytes;
}

// Float copy of t (..., C, H, W) in the row layout with W rounded up to a multiple of kLanes, zero past the end
// (a view of t when t is already that).
inline at::Tensor pad_tail(const at::Tensor& t) {
  const at::Tensor rows = t.transpose(-3, -2);  // (..., H, C, W)
  const int64_t W = t.size(-1), Wq = (W + kLanes - 1) / kLanes * kLanes;
  if (Wq == W && t.scalar_type() == at::kFloat && rows.is_contiguous()) return rows;
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.back() = Wq;
  at::Tensor p = at::zeros(shape, t.options().dtype(at::kFloat));
  p.narrow(-1, 0, W).copy_(rows);
  return p;
}

// Float copy of t (..., C, H, W) in the row layout with kPad zero columns before and after each row: column x at
// kPad + x.
inline at::Tensor pad_ends(const at::Tensor& t) {
  const at::Tensor rows = t.transpose(-3, -2);  // (..., H, C, W)
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.back() += 2 * kPad;
  at::Tensor p = at::zeros(shape, t.options().dtype(at::kFloat));
  p.narrow(-1, kPad, t.size(-1)).copy_(rows);
  return p;
}

#ifdef VOSOPS_ROWS_AVX2

// Columns scored at once: up to kGroup accumulators, the query vector and a key vector in the 16 ymm registers.
constexpr int kGroup = 14;

// out[u][l] = sum over channels ch < C of q[ch * q_stride + l] * k[ch * k_stride + u * step + l], one fused
// multiply-add per channel in channel order. kUnit: step 1, a compile-time part of the addressing.
template <int G, bool kUnit>
__attribute__((target("avx2,fma"))) void score_group(const float* q, int64_t q_stride, const float* k,
                                                      int64_t k_stride, int64_t step, int64_t C, float* out) {
  __m256 acc[G];
#pragma GCC unroll 14
  for (int u = 0; u < G; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t ch = 0; ch < C; ++ch) {
    const __m256 qv = _mm256_loadu_ps(q + ch * q_stride);
    const float* kr = k + ch * k_stride;
#pragma GCC unroll 14
    for (int u = 0; u < G; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr + (kUnit ? u : u * step)), acc[u]);
  }
#pragma GCC unroll 14
  for (int u = 0; u < G; ++u) _mm256_storeu_ps(out + u * kLanes, acc[u]);
}

using GroupFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*);

template <bool kUnit, int... G>
constexpr std::array<GroupFn, sizeof...(G)> group_table(std::integer_sequence<int, G...>) {
  return {&score_group<G + 1, kUnit>...};
}

// score_group for g columns (1 <= g <= kGroup) spaced `step` apart.
inline GroupFn score_group_fn(int64_t g, int64_t step) {
  static const auto unit = group_table<true>(std::make_integer_sequence<int, kGroup>{});
  static const auto strided = group_table<false>(std::make_integer_sequence<int, kGroup>{});
  return (step == 1 ? unit : strided)[g - 1];
}

// Lanes l with lo <= base + l < hi and l < lanes, as a mask for maskload/blend.
__attribute__((target("avx2,fma"))) inline __m256i lane_mask(int64_t base, int64_t lo, int64_t hi, int64_t lanes) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(base)), lane);
  const __m256i ge = _mm256_cmpgt_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(lo - 1)));
  const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(hi)), x);
  const __m256i real = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(lanes)), lane);
  return _mm256_and_si256(_mm256_and_si256(ge, lt), real);
}

// Columns are scored in groups of at most kGroup, as equal as possible: 15 columns as 8 + 7, not 14 + 1 (a
// one-column group loads the query for a single product). group_count(n) groups; the next one's size when `left`
// columns remain for `groups` groups.
inline int64_t group_count(int64_t n) { return (n + kGroup - 1) / kGroup; }
inline int64_t next_group(int64_t left, int64_t groups) { return (left + groups - 1) / groups; }

// Calls f(first column, count) for each group of the n columns from `first`, in order.
template <typename F>
inline void for_each_group(int64_t first, int64_t n, F&& f) {
  for (int64_t t = first, left = n, g = group_count(n); left > 0; --g) {
    const int64_t count = next_group(left, g);
    f(t, count);
    t += count;
    left -= count;
  }
}

#endif

}  // namespace row_kernels
}  // namespace vosops
