// bn_relu.h's per-element math for 8 floats (AVX2), the same operations in the same order,
// shared by the BN-ReLU passes (bn_relu.cpp) and the 1x1-convolution unit's tiles (conv1x1.cpp).
#pragma once

#ifdef __AVX2__
#include <immintrin.h>

#include <c10/macros/Macros.h>

namespace fasthg {

// bn_relu_value. max_ps returns its second operand, y, for a NaN and for -0, as
// bn_relu_value's y < 0 ? 0 : y does.
C10_ALWAYS_INLINE __m256 value8(__m256 x, __m256 m, __m256 s, __m256 w, __m256 b) {
  const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, m), _mm256_mul_ps(s, w)), b);
  return _mm256_max_ps(_mm256_setzero_ps(), y);
}

// bn_relu_masked_grad: dy where the forward's pre-activation is > 0 or NaN, else 0.
C10_ALWAYS_INLINE __m256 masked8(__m256 dy, __m256 d, __m256 s, __m256 w, __m256 b) {
  const __m256 pre = _mm256_add_ps(_mm256_mul_ps(d, _mm256_mul_ps(s, w)), b);
  return _mm256_and_ps(_mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_NLE_UQ), dy);
}

// bn_relu_masked_grad then bn_relu_grad_input.
C10_ALWAYS_INLINE __m256 grad8(__m256 dy, __m256 x, __m256 m, __m256 s, __m256 w, __m256 b, __m256 mg,
                               __m256 mgx) {
  const __m256 d = _mm256_sub_ps(x, m);
  const __m256 g = masked8(dy, d, s, w, b);
  const __m256 xhat = _mm256_mul_ps(d, s);
  return _mm256_mul_ps(_mm256_mul_ps(w, s), _mm256_sub_ps(_mm256_sub_ps(g, mg), _mm256_mul_ps(xhat, mgx)));
}

}  // namespace fasthg
#endif
