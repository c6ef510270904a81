// exp of eight floats in AVX2, shared by the CPU kernels' softmaxes (top-k and local attention): torch-free.
//
// libm's exp is a call per element; a softmax needs millions per call. Cephes' expf (Cody-Waite reduction,
// degree-6 polynomial, within 2 ulp of the correctly rounded exp on [-87.3, 0]) as explicit vectors, because GCC
// will not if-convert the clamps of a scalar version under the default -ftrapping-math. Defined for x <= 88
// (callers pass logit - row max); x below -87.3 (and -inf) gives exactly 0, NaN stays NaN.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VOSOPS_AVX2_EXP 1
#include <immintrin.h>

namespace vosops {

__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);  // x - fx * ln2, ln2 in two parts
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  __m256 out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  out = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), out);           // far below: 0
  return _mm256_blendv_ps(out, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));     // NaN in, NaN out
}

}  // namespace vosops

#else
#define VOSOPS_AVX2_EXP 0
#endif
