// AVX2 + FMA versions of the fused row ops (same contract as fused_scalar.cpp). Tails
// shorter than 8 lanes fall back to the scalar loop body.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "attention/avx2_math.h"
#include "fused/fused_kernels.h"
#include "simd/avx2_reduce.h"

namespace tp_numa::fused {
namespace {

void rms_norm_row_avx2(const float* x, const float* w, float eps, int64_t d, float* y) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    for (; i + 8 <= d; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(v, v, a0);
    }
    float ss = simd::hsum_ps(_mm256_add_ps(a0, a1));
    for (; i < d; ++i) ss += x[i] * x[i];
    const float inv = 1.f / std::sqrt(ss / float(d) + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= d; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _mm256_loadu_ps(w + i)));
    }
    for (; i < d; ++i) y[i] = x[i] * inv * w[i];
}

void add_rms_norm_row_avx2(float* r, const float* a, const float* w, float eps, int64_t d, float* y) {
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(r + i, _mm256_add_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(a + i)));
    for (; i < d; ++i) r[i] += a[i];
    rms_norm_row_avx2(r, w, eps, d, y);
}

void rope_head_avx2(float* x, const float* cos, const float* sin, int64_t rd, bool neox) {
    const int64_t half = rd / 2;
    if (!neox) {  // interleaved pairs: the scalar loop (llama layout; rare in the shipped models)
        scalar_kernels().rope_head(x, cos, sin, rd, neox);
        return;
    }
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + half);
        const __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
        _mm256_storeu_ps(x + i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
        _mm256_storeu_ps(x + i + half, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)));
    }
    for (; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = a * sin[i] + b * cos[i];
    }
}

// act(x) * u for 8 lanes: SiLU x / (1 + e^-x), or GELU-tanh 0.5 x (1 + tanh(z)) =
// x * sigmoid(2z) = x / (1 + e^(-2z)) with z = sqrt(2/pi) (x + 0.044715 x^3).
inline __m256 act8(__m256 x, __m256 u, bool gelu) {
    const __m256 one = _mm256_set1_ps(1.f);
    __m256 e;
    if (gelu) {
        const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x),
                                                       _mm256_mul_ps(x, x), x));
        e = simd::exp256(_mm256_mul_ps(_mm256_set1_ps(-2.f), z));
    } else {
        e = simd::exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
    }
    return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), u);
}

void act_mul_row_avx2(const float* g, const float* u, int64_t f, bool gelu, float* y) {
    int64_t i = 0;
    for (; i + 8 <= f; i += 8) _mm256_storeu_ps(y + i, act8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i), gelu));
    if (i < f) {
        // the tail goes through the same lane maths (zero-padded), so an element's value
        // never depends on where a rank's feature range starts or ends
        alignas(32) float gt[8] = {}, ut[8] = {}, yt[8];
        const int64_t n = f - i;
        std::copy(g + i, g + f, gt);
        std::copy(u + i, u + f, ut);
        _mm256_store_ps(yt, act8(_mm256_load_ps(gt), _mm256_load_ps(ut), gelu));
        std::copy(yt, yt + n, y + i);
    }
}

}  // namespace

const Kernels* avx2_kernels() {
    static const Kernels k{"avx2", rms_norm_row_avx2, add_rms_norm_row_avx2, rope_head_avx2, act_mul_row_avx2};
    const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return ok ? &k : nullptr;
}

}  // namespace tp_numa::fused
