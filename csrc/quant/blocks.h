// GGUF block layouts (weights) and the 8-bit activation blocks the integer dot products use.
// Plain structs, no torch: every kernel file includes this. Layouts follow the published
// GGUF format; sizes are pinned by static_asserts so a typo cannot silently shift a field.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

namespace tp_numa::quant {

// GGML type ids (gguf.GGMLQuantizationType).
enum QType : int {
    kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
    kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23, kBF16 = 30,
};

constexpr int QK = 32;    // elements of a "small" block (Q4_0 .. Q8_0, IQ4_NL)
constexpr int QK_K = 256; // elements of a super-block (K-quants, IQ4_XS)

using f16_t = uint16_t;   // IEEE half, stored as its bits

struct BlockQ4_0 { f16_t d; uint8_t qs[QK / 2]; };
struct BlockQ4_1 { f16_t d; f16_t m; uint8_t qs[QK / 2]; };
struct BlockQ5_0 { f16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; };
struct BlockQ5_1 { f16_t d; f16_t m; uint8_t qh[4]; uint8_t qs[QK / 2]; };
struct BlockQ8_0 { f16_t d; int8_t qs[QK]; };
struct BlockIQ4_NL { f16_t d; uint8_t qs[QK / 2]; };
struct BlockQ4_K { f16_t d; f16_t dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; };
struct BlockQ5_K { f16_t d; f16_t dmin; uint8_t scales[12]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
struct BlockQ6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; f16_t d; };
struct BlockIQ4_XS { f16_t d; uint16_t scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2]; };

static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block");
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 block");
static_assert(sizeof(BlockQ5_1) == 24, "Q5_1 block");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block");
static_assert(sizeof(BlockIQ4_NL) == 18, "IQ4_NL block");
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block");
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block");
static_assert(sizeof(BlockIQ4_XS) == 136, "IQ4_XS block");

// Activation row quantized for 32-element weight blocks: x[i] ~= d * qs[i]. Mirrors ggml's
// block_q8_0 as its x86 quantize_row_q8_0 makes it: qs = round_half_even(x * (127/amax)),
// d = amax/127 rounded to half precision (ggml stores d as fp16), kept here as a float.
// s = d * sum(qs) serves the offset terms (Q4_0's -8, Q5_0's -16, Q4_1/Q5_1's +m), so the
// integer dot can multiply unsigned weight codes directly: sum((q-8)*a) = sum(q*a) - 8*sum(a).
struct BlockQ8A { float d; float s; int8_t qs[QK]; };
static_assert(sizeof(BlockQ8A) == 40, "Q8A block");

// Activation row quantized for 256-element super-blocks (ggml's Q8_K): x ~= d * qs, and
// bsums[j] = sum of qs over elements 16j..16j+15, for the per-sub-block min/offset terms.
// As ggml's quantize_row_q8_K: iscale = 127/amax (ggml: -127/max, the same up to the sign
// of qs and d), qs = round_half_even(x * iscale), d = 1/iscale in float.
struct BlockQ8K { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; };
static_assert(sizeof(BlockQ8K) == 292, "Q8K block");

// IQ4_NL / IQ4_XS non-linear code book.
constexpr int8_t kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                   1,    13,   25,  38,  53,  69,  89,  113};

// Portable half -> float (the scalar reference; SIMD files use F16C).
inline float f16_to_f32(f16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal half: normalise the mantissa
        int e = -1;
        do { mant <<= 1; ++e; } while (!(mant & 0x400));
        bits = sign | (uint32_t(112 - e) << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Portable float -> half, round to nearest even (what F16C's vcvtps2ph with imm 0 and
// ggml's GGML_FP32_TO_FP16 do): the activation quantizers round their scale through it.
inline f16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return f16_t(sign | 0x7e00u);  // nan
    if (ax >= 0x477ff000u) return f16_t(sign | 0x7c00u);  // >= 65520 (and inf) -> inf
    if (ax < 0x38800000u) {  // below 2^-14: half subnormal, units of 2^-24
        float a;
        std::memcpy(&a, &ax, 4);
        return f16_t(sign | uint32_t(int(std::nearbyint(a * 16777216.f))));  // exact scaling
    }
    const uint32_t h = ax - 0x38000000u;  // rebias 127 -> 15 (mantissa still 23 bits)
    // round the 13 dropped bits to nearest even; a carry correctly bumps the exponent
    return f16_t(sign | ((h + 0x0fffu + ((h >> 13) & 1u)) >> 13));
}

// x rounded to the nearest half, as a float.
inline float round_to_f16(float x) { return f16_to_f32(f32_to_f16(x)); }

inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
inline void k_scale_min(int j, const uint8_t* s, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K / Q5_K: all 8 (scale, min) pairs as bytes: out[0..7] scales, out[8..15] mins.
inline void k_scales_mins(const uint8_t* s, uint8_t out[16]) {
    for (int j = 0; j < 8; ++j) k_scale_min(j, s, &out[j], &out[8 + j]);
}

// IQ4_XS: signed 6-bit scale (ls - 32) of sub-block ib (0..7).
inline int iq4xs_scale(const BlockIQ4_XS& b, int ib) {
    const int lo = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
    const int hi = (b.scales_h >> (2 * ib)) & 3;
    return (lo | (hi << 4)) - 32;
}

}  // namespace tp_numa::quant
