// Horizontal reductions of one AVX register, shared by the AVX2 kernel files of every op
// family (quant, attention, fused). Include only after a `#pragma GCC target("avx2,...")`
// (or a superset). A fixed reduction order: the same lanes give the same float everywhere.
#pragma once
#include <immintrin.h>

namespace tp_numa::simd {

// ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))
inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// (v0 + v2) + (v1 + v3)
inline float hsum_ps128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

}  // namespace tp_numa::simd
