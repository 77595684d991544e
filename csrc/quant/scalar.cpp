// Scalar reference kernels for every type (the "generic" versions the SIMD files mirror).
//
// Quantized types: the activation is 8-bit (BlockQ8A / BlockQ8K) and each block's dot
// product is an exact integer sum, scaled once per block (or sub-block):
//   Q4_0:  d_w * (d_a * sum(q*a) - 8 * s_a)          with q in 0..15, s_a = d_a * sum(a)
//   Q4_1:  d_w * d_a * sum(q*a) + m_w * s_a
//   Q5_0:  d_w * (d_a * sum(q*a) - 16 * s_a)         with q in 0..31
//   Q8_0:  d_w * d_a * sum(q*a)
//   Q4_K:  d_a * (d * sum_j sc_j * sum(q*a)_j - dmin * sum_j m_j * bsum_j)
//   Q6_K:  d_a * d * sum_j sc_j * (sum(q*a)_j - 32 * bsum_j)   (16-element sub-blocks)
// Float types (F32/F16/BF16) take the float activation and accumulate in float.
//
// Every dot is a template over the accumulator T: float (quant_matmul) or double
// (quant_matmul_exact). Either way each block's term (each element's product for float
// types) is computed in fp32 first; T only decides the precision of the running sum.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "quant/kernels.h"

namespace tp_numa::quant {
namespace {

// ---- activation quantizers ----

// Both mirror ggml's x86 activation quantizers bit for bit (see BlockQ8A / BlockQ8K in
// blocks.h): the scale is 127/amax, rounding is to nearest even (the default FP mode, as
// vroundps in the SIMD versions), and Q8A's d is rounded to half precision.
void quantize_q8a(const float* x, int64_t K, void* out) {
    auto* b = static_cast<BlockQ8A*>(out);
    for (int64_t i = 0; i < K / QK; ++i, x += QK) {
        float amax = 0.f;
        for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = round_to_f16(amax / 127.f);
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; ++j) {
            const int q = int(std::nearbyint(x[j] * id));
            b[i].qs[j] = int8_t(q);
            sum += q;
        }
        b[i].d = d;
        b[i].s = d * float(sum);
    }
}

void quantize_q8k(const float* x, int64_t K, void* out) {
    auto* b = static_cast<BlockQ8K*>(out);
    for (int64_t i = 0; i < K / QK_K; ++i, x += QK_K) {
        float amax = 0.f;
        for (int j = 0; j < QK_K; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        for (int j = 0; j < QK_K; ++j) b[i].qs[j] = int8_t(std::min(127, int(std::nearbyint(x[j] * id))));
        for (int g = 0; g < QK_K / 16; ++g) {
            int s = 0;
            for (int j = 0; j < 16; ++j) s += b[i].qs[16 * g + j];
            b[i].bsums[g] = int16_t(s);
        }
        b[i].d = amax != 0.f ? 1.f / id : 0.f;
    }
}

// The blocks of a row quantizer (Quantize: Block, N elements each) in the form an x4
// kernel takes (Expand: Block -> Out), block by block.
template <class Block, int N, void (*Quantize)(const float*, int64_t, void*), class Out,
          void (*Expand)(const void*, int, void*)>
void quantize_for_x4(const float* x, int64_t K, void* out) {
    auto* o = static_cast<Out*>(out);
    for (int64_t i = 0; i < K / N; ++i) {
        Block b;
        Quantize(x + i * N, N, &b);
        Expand(&b, 1, o + i);
    }
}

// ---- per-row dot products ----

template <class T>
T dot_f32(int K, const uint8_t* w, const void* act) {
    const float* x = static_cast<const float*>(act);
    const float* r = reinterpret_cast<const float*>(w);
    T acc = 0;
    for (int i = 0; i < K; ++i) acc += float(r[i] * x[i]);
    return acc;
}

template <class T>
T dot_f16(int K, const uint8_t* w, const void* act) {
    const float* x = static_cast<const float*>(act);
    const auto* r = reinterpret_cast<const f16_t*>(w);
    T acc = 0;
    for (int i = 0; i < K; ++i) acc += float(f16_to_f32(r[i]) * x[i]);
    return acc;
}

template <class T>
T dot_bf16(int K, const uint8_t* w, const void* act) {
    const float* x = static_cast<const float*>(act);
    const auto* r = reinterpret_cast<const uint16_t*>(w);
    T acc = 0;
    for (int i = 0; i < K; ++i) acc += float(bf16_to_f32(r[i]) * x[i]);
    return acc;
}

template <class T>
T dot_q4_0(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockQ4_0*>(w);
    const auto* a = static_cast<const BlockQ8A*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        int sumi = 0;
        for (int j = 0; j < QK / 2; ++j) {
            sumi += (x[i].qs[j] & 0xf) * a[i].qs[j] + (x[i].qs[j] >> 4) * a[i].qs[j + 16];
        }
        acc += float(f16_to_f32(x[i].d) * (a[i].d * float(sumi) - 8.f * a[i].s));
    }
    return acc;
}

template <class T>
T dot_q4_1(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockQ4_1*>(w);
    const auto* a = static_cast<const BlockQ8A*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        int sumi = 0;
        for (int j = 0; j < QK / 2; ++j) {
            sumi += (x[i].qs[j] & 0xf) * a[i].qs[j] + (x[i].qs[j] >> 4) * a[i].qs[j + 16];
        }
        acc += float(f16_to_f32(x[i].d) * a[i].d * float(sumi) + f16_to_f32(x[i].m) * a[i].s);
    }
    return acc;
}

// 5-bit codes of a Q5_0 / Q5_1 block: low nibble | bit j of qh << 4.
inline int q5_code(const uint8_t* qs, uint32_t qh, int j) {
    const int lo = j < 16 ? (qs[j] & 0xf) : (qs[j - 16] >> 4);
    return lo | int((qh >> j) & 1) << 4;
}

template <class T>
T dot_q5_0(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockQ5_0*>(w);
    const auto* a = static_cast<const BlockQ8A*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += q5_code(x[i].qs, qh, j) * a[i].qs[j];
        acc += float(f16_to_f32(x[i].d) * (a[i].d * float(sumi) - 16.f * a[i].s));
    }
    return acc;
}

template <class T>
T dot_q5_1(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockQ5_1*>(w);
    const auto* a = static_cast<const BlockQ8A*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        uint32_t qh;
        std::memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += q5_code(x[i].qs, qh, j) * a[i].qs[j];
        acc += float(f16_to_f32(x[i].d) * a[i].d * float(sumi) + f16_to_f32(x[i].m) * a[i].s);
    }
    return acc;
}

template <class T>
T dot_q8_0(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockQ8_0*>(w);
    const auto* a = static_cast<const BlockQ8A*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += x[i].qs[j] * a[i].qs[j];
        acc += float(f16_to_f32(x[i].d) * a[i].d * float(sumi));
    }
    return acc;
}

template <class T>
T dot_iq4_nl(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockIQ4_NL*>(w);
    const auto* a = static_cast<const BlockQ8A*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        int sumi = 0;
        for (int j = 0; j < QK / 2; ++j) {
            sumi += kIQ4Values[x[i].qs[j] & 0xf] * a[i].qs[j] +
                    kIQ4Values[x[i].qs[j] >> 4] * a[i].qs[j + 16];
        }
        acc += float(f16_to_f32(x[i].d) * a[i].d * float(sumi));
    }
    return acc;
}

// Q4_K and Q5_K: the same super-block (8 sub-blocks with 6-bit scales and mins); Q5_K adds
// a 5th bit per element: bit j of qh[l] belongs to sub-block j, element l.
template <class T, class Block>
T dot_k_scale_min(int nb, const uint8_t* w, const void* act) {
    constexpr bool kHighBit = std::is_same_v<Block, BlockQ5_K>;
    const auto* x = reinterpret_cast<const Block*>(w);
    const auto* a = static_cast<const BlockQ8K*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        uint8_t sm[16];
        k_scales_mins(x[i].scales, sm);
        int sum_q = 0, sum_m = 0;
        for (int j = 0; j < 8; ++j) {
            // sub-block j: 32-byte chunk j/2, low nibbles for even j, high for odd j
            const uint8_t* qs = x[i].qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            const int8_t* q8 = a[i].qs + 32 * j;
            int s = 0;
            for (int l = 0; l < 32; ++l) {
                int q = (qs[l] >> shift) & 0xf;
                if constexpr (kHighBit) q |= ((x[i].qh[l] >> j) & 1) << 4;
                s += q * q8[l];
            }
            sum_q += sm[j] * s;
            sum_m += sm[8 + j] * (a[i].bsums[2 * j] + a[i].bsums[2 * j + 1]);
        }
        acc += float(a[i].d * (f16_to_f32(x[i].d) * float(sum_q) - f16_to_f32(x[i].dmin) * float(sum_m)));
    }
    return acc;
}

template <class T>
T dot_q4_k(int nb, const uint8_t* w, const void* act) {
    return dot_k_scale_min<T, BlockQ4_K>(nb, w, act);
}

template <class T>
T dot_q5_k(int nb, const uint8_t* w, const void* act) {
    return dot_k_scale_min<T, BlockQ5_K>(nb, w, act);
}

template <class T>
T dot_q6_k(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockQ6_K*>(w);
    const auto* a = static_cast<const BlockQ8K*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        // two halves of 128 elements; in each, element 32*k + l (k = 0..3, l = 0..31) has
        // low bits from ql[l + 32*(k&1)] (nibble k>>1) and high bits (qh[l] >> 2k) & 3
        int sum = 0;
        for (int h = 0; h < 2; ++h) {
            const uint8_t* ql = x[i].ql + 64 * h;
            const uint8_t* qh = x[i].qh + 32 * h;
            for (int k = 0; k < 4; ++k) {
                const uint8_t* lo = ql + 32 * (k & 1);
                const int shift = 4 * (k >> 1);
                for (int half = 0; half < 2; ++half) {  // 16-element sub-blocks
                    const int e0 = 128 * h + 32 * k + 16 * half;
                    int s = 0;
                    for (int l = 16 * half; l < 16 * half + 16; ++l) {
                        const int q = ((lo[l] >> shift) & 0xf) | (((qh[l] >> (2 * k)) & 3) << 4);
                        s += q * a[i].qs[128 * h + 32 * k + l];
                    }
                    sum += x[i].scales[e0 / 16] * (s - 32 * a[i].bsums[e0 / 16]);
                }
            }
        }
        acc += float(a[i].d * f16_to_f32(x[i].d) * float(sum));
    }
    return acc;
}

template <class T>
T dot_iq4_xs(int nb, const uint8_t* w, const void* act) {
    const auto* x = reinterpret_cast<const BlockIQ4_XS*>(w);
    const auto* a = static_cast<const BlockQ8K*>(act);
    T acc = 0;
    for (int i = 0; i < nb; ++i) {
        int sum = 0;
        for (int ib = 0; ib < 8; ++ib) {
            const uint8_t* qs = x[i].qs + 16 * ib;
            const int8_t* q8 = a[i].qs + 32 * ib;
            int s = 0;
            for (int j = 0; j < 16; ++j) {
                s += kIQ4Values[qs[j] & 0xf] * q8[j] + kIQ4Values[qs[j] >> 4] * q8[j + 16];
            }
            sum += iq4xs_scale(x[i], ib) * s;
        }
        acc += float(a[i].d * f16_to_f32(x[i].d) * float(sum));
    }
    return acc;
}

// Lifts a one-row dot into the rows interface.
template <class T, T (*Dot)(int, const uint8_t*, const void*)>
void rows(int nb, const uint8_t* w, size_t w_stride, int nrows, const void* act, T* y) {
    for (int r = 0; r < nrows; ++r) y[r] = Dot(nb, w + r * w_stride, act);
}

Kernels make_scalar() {
    Kernels k{};
    k.isa = "scalar";
    k.rows[kF32] = rows<float, dot_f32<float>>;
    k.rows_exact[kF32] = rows<double, dot_f32<double>>;
    k.rows[kF16] = rows<float, dot_f16<float>>;
    k.rows_exact[kF16] = rows<double, dot_f16<double>>;
    k.rows[kBF16] = rows<float, dot_bf16<float>>;
    k.rows_exact[kBF16] = rows<double, dot_bf16<double>>;
    k.rows[kQ4_0] = rows<float, dot_q4_0<float>>;
    k.rows_exact[kQ4_0] = rows<double, dot_q4_0<double>>;
    k.rows[kQ4_1] = rows<float, dot_q4_1<float>>;
    k.rows_exact[kQ4_1] = rows<double, dot_q4_1<double>>;
    k.rows[kQ5_0] = rows<float, dot_q5_0<float>>;
    k.rows_exact[kQ5_0] = rows<double, dot_q5_0<double>>;
    k.rows[kQ5_1] = rows<float, dot_q5_1<float>>;
    k.rows_exact[kQ5_1] = rows<double, dot_q5_1<double>>;
    k.rows[kQ8_0] = rows<float, dot_q8_0<float>>;
    k.rows_exact[kQ8_0] = rows<double, dot_q8_0<double>>;
    k.rows[kIQ4_NL] = rows<float, dot_iq4_nl<float>>;
    k.rows_exact[kIQ4_NL] = rows<double, dot_iq4_nl<double>>;
    k.rows[kQ4_K] = rows<float, dot_q4_k<float>>;
    k.rows_exact[kQ4_K] = rows<double, dot_q4_k<double>>;
    k.rows[kQ5_K] = rows<float, dot_q5_k<float>>;
    k.rows_exact[kQ5_K] = rows<double, dot_q5_k<double>>;
    k.rows[kQ6_K] = rows<float, dot_q6_k<float>>;
    k.rows_exact[kQ6_K] = rows<double, dot_q6_k<double>>;
    k.rows[kIQ4_XS] = rows<float, dot_iq4_xs<float>>;
    k.rows_exact[kIQ4_XS] = rows<double, dot_iq4_xs<double>>;
    k.quantize_q8a = quantize_q8a;
    k.quantize_q8ax4 = quantize_for_x4<BlockQ8A, QK, quantize_q8a, BlockQ8AX4, expand_act_x4>;
    k.quantize_q8kx4 = quantize_for_x4<BlockQ8K, QK_K, quantize_q8k, BlockQ8KX4, expand_act_kx4>;
    k.quantize_q8kx4l = quantize_for_x4<BlockQ8K, QK_K, quantize_q8k, BlockQ8KX4L, expand_act_kx4l>;
    k.quantize_q8k = quantize_q8k;
    return k;
}

}  // namespace

const Kernels& scalar_kernels() {
    static const Kernels k = make_scalar();
    return k;
}

}  // namespace tp_numa::quant
