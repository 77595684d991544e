// AVX2 helpers shared by the SIMD kernel files. Include only after a
// `#pragma GCC target("avx2,fma,f16c")` (or a superset) so the intrinsics compile.
#pragma once
#include <immintrin.h>

#include "quant/blocks.h"
#include "quant/packed_x4.h"
#include "simd/avx2_reduce.h"

namespace tp_numa::quant {
extern float g_f16_table[65536];  // f16_table.cpp
}

namespace tp_numa::quant::simd {

using tp_numa::simd::hmax_ps;
using tp_numa::simd::hsum_ps;
using tp_numa::simd::hsum_ps128;

inline int hsum_i32_128(__m128i s) {
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

inline float f16(f16_t h) { return g_f16_table[h]; }
// Half -> float in all 8 lanes: a table load + broadcast, no vector ALU work.
inline __m256 f16x8(f16_t h) { return _mm256_broadcast_ss(&g_f16_table[h]); }

inline float absmax(const float* x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    return hmax_ps(m);
}

// 32 floats -> 32 int8 round(x * id) in element order; s16[0], s16[1] = sums of the two
// 16-element halves.
inline __m256i quant32(const float* x, __m256 id, int* s16) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), id), mode));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8), id), mode));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 16), id), mode));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 24), id), mode));
    s16[0] = hsum_i32(_mm256_add_epi32(i0, i1));
    s16[1] = hsum_i32(_mm256_add_epi32(i2, i3));
    // packs interleave 128-bit lanes: dwords come out as i0lo i1lo i2lo i3lo i0hi ...
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One 32-element Q8A block: returns the int8 values in element order, sets d and s.
// Bit-identical to the scalar quantizers (scalar.cpp), which mirror ggml's.
inline __m256i q8a_block(const float* x, float* d, float* s) {
    const float amax = absmax(x, QK);
    *d = round_to_f16(amax / 127.f);
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    int s16[2];
    const __m256i q = quant32(x, _mm256_set1_ps(id), s16);
    *s = *d * float(s16[0] + s16[1]);
    return q;
}

inline void quantize_q8a(const float* x, int64_t K, void* out) {
    auto* b = static_cast<BlockQ8A*>(out);
    for (int64_t i = 0; i < K / QK; ++i, x += QK) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(b[i].qs), q8a_block(x, &b[i].d, &b[i].s));
    }
}

// quantize_q8a's blocks in the x4 lane order (packed_x4.h): code vector v repeats the
// 4-byte groups 2v (lanes 0-3) and 2v + 1 (lanes 4-7) of the block.
inline void quantize_q8ax4(const float* x, int64_t K, void* out) {
    auto* b = static_cast<BlockQ8AX4*>(out);
    for (int64_t i = 0; i < K / QK; ++i, x += QK) {
        const __m256i q = q8a_block(x, &b[i].d, &b[i].s);
        for (int v = 0; v < 4; ++v) {
            const __m256i idx = _mm256_setr_epi32(2 * v, 2 * v, 2 * v, 2 * v, 2 * v + 1, 2 * v + 1, 2 * v + 1, 2 * v + 1);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(b[i].qs[v]), _mm256_permutevar8x32_epi32(q, idx));
        }
    }
}

inline void quantize_q8k(const float* x, int64_t K, void* out) {
    auto* b = static_cast<BlockQ8K*>(out);
    for (int64_t i = 0; i < K / QK_K; ++i, x += QK_K) {
        const float amax = absmax(x, QK_K);
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        const __m256 idv = _mm256_set1_ps(id);
        for (int c = 0; c < QK_K / 32; ++c) {
            int s[2];
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(b[i].qs + 32 * c), quant32(x + 32 * c, idv, s));
            b[i].bsums[2 * c] = int16_t(s[0]);
            b[i].bsums[2 * c + 1] = int16_t(s[1]);
        }
        b[i].d = amax != 0.f ? 1.f / id : 0.f;
    }
}

// quantize_q8k's super-blocks as BlockQ8KX4 (packed_x4.h): the values as they are, the
// sub-block sums rearranged.
inline void quantize_q8kx4(const float* x, int64_t K, void* out) {
    auto* o = static_cast<BlockQ8KX4*>(out);
    for (int64_t i = 0; i < K / QK_K; ++i, x += QK_K) {
        BlockQ8K b;
        quantize_q8k(x, QK_K, &b);
        expand_act_kx4(&b, 1, o + i);
    }
}

// ... as BlockQ8KX4L: vector v of pair p holds dword v % 4 of the 16-byte half v / 4 of
// sub-block p (low 128 bits) and of sub-block p + 4 (high 128 bits), each repeated over the
// half's 4 dwords.
inline void quantize_q8kx4l(const float* x, int64_t K, void* out) {
    auto* o = static_cast<BlockQ8KX4L*>(out);
    for (int64_t i = 0; i < K / QK_K; ++i, x += QK_K) {
        BlockQ8K b;
        quantize_q8k(x, QK_K, &b);
        kx4_sums(b, o[i]);
        for (int p = 0; p < 4; ++p) {
            const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * p));
            const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * (p + 4)));
            const __m256i h0 = _mm256_permute2x128_si256(lo, hi, 0x20);  // bytes 0..15 of each
            const __m256i h1 = _mm256_permute2x128_si256(lo, hi, 0x31);  // bytes 16..31 of each
            auto* dst = reinterpret_cast<__m256i*>(o[i].qs[p]);
            _mm256_storeu_si256(dst + 0, _mm256_shuffle_epi32(h0, 0x00));
            _mm256_storeu_si256(dst + 1, _mm256_shuffle_epi32(h0, 0x55));
            _mm256_storeu_si256(dst + 2, _mm256_shuffle_epi32(h0, 0xaa));
            _mm256_storeu_si256(dst + 3, _mm256_shuffle_epi32(h0, 0xff));
            _mm256_storeu_si256(dst + 4, _mm256_shuffle_epi32(h1, 0x00));
            _mm256_storeu_si256(dst + 5, _mm256_shuffle_epi32(h1, 0x55));
            _mm256_storeu_si256(dst + 6, _mm256_shuffle_epi32(h1, 0xaa));
            _mm256_storeu_si256(dst + 7, _mm256_shuffle_epi32(h1, 0xff));
        }
    }
}

}  // namespace tp_numa::quant::simd
