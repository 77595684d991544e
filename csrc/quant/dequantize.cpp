// dequantize: raw GGUF rows -> float32, every supported type (scalar, per block); and
// quantize_q8_0, the one direction the engine needs (a Q8_0 KV cache).
//
// Each block is expanded with the same float32 operations, in the same order, as
// gguf-py's `gguf.quants.dequantize` (which follows ggml's dequantize_row_*), so the result
// is bitwise gguf's (tests/test_dequantize.py). Used where a few rows are needed as floats:
// the token embedding lookup (a decode step reads one row) and the GPU offload path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "quant/blocks.h"
#include "quant/kernels.h"
#include "quant/quant_ops.h"

namespace tp_numa {
namespace {

using namespace quant;

void deq_q4_0(const BlockQ4_0& b, float* y) {
    const float d = f16_to_f32(b.d);
    for (int j = 0; j < QK / 2; ++j) {
        y[j] = d * float(int(b.qs[j] & 0x0f) - 8);
        y[j + QK / 2] = d * float(int(b.qs[j] >> 4) - 8);
    }
}

void deq_q4_1(const BlockQ4_1& b, float* y) {
    const float d = f16_to_f32(b.d), m = f16_to_f32(b.m);
    for (int j = 0; j < QK / 2; ++j) {
        y[j] = d * float(b.qs[j] & 0x0f) + m;
        y[j + QK / 2] = d * float(b.qs[j] >> 4) + m;
    }
}

// Q5_0 / Q5_1: bit j of qh is the 5th bit of element j.
inline int q5_code(const uint8_t* qs, uint32_t qh, int j) {
    const int lo = j < QK / 2 ? (qs[j] & 0x0f) : (qs[j - QK / 2] >> 4);
    return lo | int(((qh >> j) & 1u) << 4);
}

void deq_q5_0(const BlockQ5_0& b, float* y) {
    const float d = f16_to_f32(b.d);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < QK; ++j) y[j] = d * float(q5_code(b.qs, qh, j) - 16);
}

void deq_q5_1(const BlockQ5_1& b, float* y) {
    const float d = f16_to_f32(b.d), m = f16_to_f32(b.m);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < QK; ++j) y[j] = d * float(q5_code(b.qs, qh, j)) + m;
}

void deq_q8_0(const BlockQ8_0& b, float* y) {
    const float d = f16_to_f32(b.d);
    for (int j = 0; j < QK; ++j) y[j] = d * float(b.qs[j]);
}

void deq_iq4_nl(const BlockIQ4_NL& b, float* y) {
    const float d = f16_to_f32(b.d);
    for (int j = 0; j < QK / 2; ++j) {
        y[j] = d * float(kIQ4Values[b.qs[j] & 0x0f]);
        y[j + QK / 2] = d * float(kIQ4Values[b.qs[j] >> 4]);
    }
}

// Q4_K / Q5_K: sub-block j (32 elements) = (d * sc_j) * q - (dmin * m_j); its low nibbles
// are byte l of the j/2-th 32-byte chunk (high nibble for odd j), Q5_K's 5th bit is bit j
// of qh[l].
template <class B>
void deq_k_scale_min(const B& b, const uint8_t* qh, float* y) {
    const float d = f16_to_f32(b.d), dmin = f16_to_f32(b.dmin);
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t sc, m;
        k_scale_min(j, b.scales, &sc, &m);
        const float dj = d * float(sc), mj = dmin * float(m);
        const uint8_t* q = b.qs + 32 * (j / 2);
        for (int l = 0; l < 32; ++l) {
            int code = (j % 2 == 0) ? (q[l] & 0x0f) : (q[l] >> 4);
            if (qh != nullptr) code |= ((qh[l] >> j) & 1) << 4;
            y[32 * j + l] = dj * float(code) - mj;
        }
    }
}

void deq_q4_k(const BlockQ4_K& b, float* y) { deq_k_scale_min(b, nullptr, y); }
void deq_q5_k(const BlockQ5_K& b, float* y) { deq_k_scale_min(b, b.qh, y); }

// Q6_K: element e of a 128-half h: low 4 bits from ql (byte l of 64, nibble by e's 32-group),
// high 2 bits from qh[l] (bit pair by group); scale (d * scales[e / 16]).
void deq_q6_k(const BlockQ6_K& b, float* y) {
    const float d = f16_to_f32(b.d);
    for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = b.ql + 64 * h;
        const uint8_t* qh = b.qh + 32 * h;
        for (int g = 0; g < 4; ++g) {         // 32-element group of this half
            for (int l = 0; l < 32; ++l) {
                const int lo = ql[l + 32 * (g & 1)];      // groups 0, 2: byte l; 1, 3: byte l + 32
                const int nib = g < 2 ? (lo & 0x0f) : (lo >> 4);
                const int hi = (qh[l] >> (2 * g)) & 3;
                const int e = 128 * h + 32 * g + l;
                y[e] = (d * float(b.scales[e / 16])) * float((nib | (hi << 4)) - 32);
            }
        }
    }
}

void deq_iq4_xs(const BlockIQ4_XS& b, float* y) {
    const float d = f16_to_f32(b.d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
        const int ls = ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f) | (((b.scales_h >> (2 * ib)) & 3) << 4);
        const float dl = d * float(ls - 32);
        const uint8_t* qs = b.qs + 16 * ib;
        for (int j = 0; j < 16; ++j) {
            y[32 * ib + j] = dl * float(kIQ4Values[qs[j] & 0x0f]);
            y[32 * ib + j + 16] = dl * float(kIQ4Values[qs[j] >> 4]);
        }
    }
}

template <class B, void (*F)(const B&, float*)>
void blocks(const uint8_t* row, int nb, float* y, int elems) {
    const auto* b = reinterpret_cast<const B*>(row);
    for (int i = 0; i < nb; ++i) F(b[i], y + size_t(i) * elems);
}

void dequantize_row(int64_t qtype, const uint8_t* row, int64_t K, float* y) {
    switch (qtype) {
        case kF32: std::memcpy(y, row, size_t(K) * 4); return;
        case kF16: {
            const auto* h = reinterpret_cast<const f16_t*>(row);
            for (int64_t i = 0; i < K; ++i) y[i] = f16_to_f32(h[i]);
            return;
        }
        case kBF16: {
            const auto* h = reinterpret_cast<const uint16_t*>(row);
            for (int64_t i = 0; i < K; ++i) y[i] = bf16_to_f32(h[i]);
            return;
        }
        case kQ4_0: return blocks<BlockQ4_0, deq_q4_0>(row, int(K / QK), y, QK);
        case kQ4_1: return blocks<BlockQ4_1, deq_q4_1>(row, int(K / QK), y, QK);
        case kQ5_0: return blocks<BlockQ5_0, deq_q5_0>(row, int(K / QK), y, QK);
        case kQ5_1: return blocks<BlockQ5_1, deq_q5_1>(row, int(K / QK), y, QK);
        case kQ8_0: return blocks<BlockQ8_0, deq_q8_0>(row, int(K / QK), y, QK);
        case kIQ4_NL: return blocks<BlockIQ4_NL, deq_iq4_nl>(row, int(K / QK), y, QK);
        case kQ4_K: return blocks<BlockQ4_K, deq_q4_k>(row, int(K / QK_K), y, QK_K);
        case kQ5_K: return blocks<BlockQ5_K, deq_q5_k>(row, int(K / QK_K), y, QK_K);
        case kQ6_K: return blocks<BlockQ6_K, deq_q6_k>(row, int(K / QK_K), y, QK_K);
        case kIQ4_XS: return blocks<BlockIQ4_XS, deq_iq4_xs>(row, int(K / QK_K), y, QK_K);
        default: TORCH_CHECK(false, "dequantize: unsupported type id ", qtype);
    }
}

}  // namespace

at::Tensor quantize_q8_0(const at::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
                "quantize_q8_0: x must be a contiguous float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
    const int64_t K = x.size(-1);
    TORCH_CHECK(K % QK == 0, "quantize_q8_0: the last dim (", K, ") is not a multiple of the Q8_0 block size 32");
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = K / QK * int64_t(sizeof(BlockQ8_0));
    at::Tensor out = at::empty(shape, x.options().dtype(at::kByte));
    const float* xp = x.data_ptr<float>();
    auto* bp = reinterpret_cast<BlockQ8_0*>(out.data_ptr<uint8_t>());
    const int64_t nb = x.numel() / QK;
    // ggml's quantize_row_q8_0_ref: d = amax / 127 (stored as f16), q = roundf(x / d)
    at::parallel_for(0, nb, 4096, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
            const float* v = xp + i * QK;
            float amax = 0.f;
            for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(v[j]));
            const float d = amax / 127.f;
            const float id = d != 0.f ? 1.f / d : 0.f;
            bp[i].d = f32_to_f16(d);
            for (int j = 0; j < QK; ++j) bp[i].qs[j] = int8_t(std::round(v[j] * id));
        }
    });
    return out;
}

at::Tensor dequantize(const at::Tensor& w, int64_t qtype) {
    const TypeInfo* ti = type_info(qtype);
    TORCH_CHECK(ti != nullptr, "dequantize: unknown or unsupported GGML type id ", qtype);
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2,
                "dequantize: w must be a uint8 CPU tensor [N, row_bytes], got ", w.scalar_type(), " ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), "dequantize: w must be contiguous");
    TORCH_CHECK(w.size(1) % ti->block_bytes == 0, "dequantize: ", w.size(1), " bytes per row is not whole ",
                ti->name, " blocks of ", ti->block_bytes, " bytes");
    const int64_t N = w.size(0), row_bytes = w.size(1);
    const int64_t K = row_bytes / ti->block_bytes * ti->block_elems;
    at::Tensor y = at::empty({N, K}, w.options().dtype(at::kFloat));
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    // one row (a decode step's embedding) stays on the calling thread
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K));
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) dequantize_row(qtype, wp + r * row_bytes, K, yp + r * K);
    });
    return y;
}

}  // namespace tp_numa
