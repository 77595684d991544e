// Scalar reference of the attention kernels: plain loops, the definition the AVX2 file
// must reproduce. Same work split (decode chunks, prefill blocks) as the SIMD version.
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/attention_kernels.h"
#include "quant/blocks.h"

namespace tp_numa::attn {
namespace {

// Element e of KV row `row` (row = key index * n_kv + kv head) as float.
inline float kv_at(const void* base, KvType t, int64_t row, int D, int e) {
    const int64_t i = row * D + e;
    switch (t) {
        case KvType::F16: return quant::f16_to_f32(static_cast<const uint16_t*>(base)[i]);
        case KvType::BF16: return quant::bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
        case KvType::Q8_0: {
            const auto& b = static_cast<const quant::BlockQ8_0*>(base)[i / 32];
            return quant::f16_to_f32(b.d) * float(b.qs[i % 32]);
        }
        default: return static_cast<const float*>(base)[i];
    }
}

void decode_chunk_scalar(const Geometry& g, const float* q, int kv_head, int64_t j0, int64_t j1,
                         float* scores, Partial out) {
    const int G = g.group(), D = g.head_dim;
    const int64_t n = j1 - j0;
    for (int hh = 0; hh < G; ++hh) {
        const float* qh = q + int64_t(kv_head * G + hh) * D;
        float* s = scores + hh * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
            const int64_t row = (j0 + j) * g.n_kv + kv_head;
            float dot = 0.f;
            for (int e = 0; e < D; ++e) dot += qh[e] * kv_at(g.k, g.kv_type, row, D, e);
            s[j] = dot * g.scale;
            m = std::max(m, s[j]);
        }
        float l = 0.f;
        float* acc = out.acc + int64_t(hh) * D;
        std::fill(acc, acc + D, 0.f);
        for (int64_t j = 0; j < n; ++j) {
            const float p = std::exp(s[j] - m);
            l += p;
            const int64_t row = (j0 + j) * g.n_kv + kv_head;
            for (int e = 0; e < D; ++e) acc[e] += p * kv_at(g.v, g.kv_type, row, D, e);
        }
        out.m[hh] = m;
        out.l[hh] = l;
    }
}

void prefill_block_scalar(const Geometry& g, const float* q, int64_t n_keys, int64_t q_offset,
                          int64_t window, int kv_head, int64_t i0, int64_t i1, float* scratch,
                          float* out) {
    (void)scratch;
    const int G = g.group(), D = g.head_dim, H = g.n_heads;
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = q_offset + i;  // key index of this query's own position
        const int64_t lo = window < 0 ? 0 : std::max<int64_t>(0, t - window + 1);
        const int64_t hi = std::min(t, n_keys - 1);
        for (int hh = 0; hh < G; ++hh) {
            const int h = kv_head * G + hh;
            const float* qh = q + (i * H + h) * D;
            float* o = out + (i * H + h) * D;
            // online softmax over the visible keys, one key at a time
            float m = -std::numeric_limits<float>::infinity(), l = 0.f;
            std::fill(o, o + D, 0.f);
            for (int64_t j = lo; j <= hi; ++j) {
                const int64_t row = j * g.n_kv + kv_head;
                float dot = 0.f;
                for (int e = 0; e < D; ++e) dot += qh[e] * kv_at(g.k, g.kv_type, row, D, e);
                const float s = dot * g.scale;
                const float m_new = std::max(m, s);
                const float corr = std::exp(m - m_new), p = std::exp(s - m_new);
                l = l * corr + p;
                for (int e = 0; e < D; ++e) o[e] = o[e] * corr + p * kv_at(g.v, g.kv_type, row, D, e);
                m = m_new;
            }
            const float inv = l > 0.f ? 1.f / l : 0.f;
            for (int e = 0; e < D; ++e) o[e] *= inv;
        }
    }
}

}  // namespace

const Kernels& scalar_kernels() {
    static const Kernels k{"scalar", decode_chunk_scalar, prefill_block_scalar};
    return k;
}

void merge_partials(const float* m, const float* l, const float* acc, int64_t n_chunks,
                    int64_t ml_stride, int64_t acc_stride, int head_dim, float* out) {
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < n_chunks; ++c) M = std::max(M, m[c * ml_stride]);
    float L = 0.f;
    std::fill(out, out + head_dim, 0.f);
    for (int64_t c = 0; c < n_chunks; ++c) {
        const float w = std::exp(m[c * ml_stride] - M);
        L += w * l[c * ml_stride];
        const float* a = acc + c * acc_stride;
        for (int e = 0; e < head_dim; ++e) out[e] += w * a[e];
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int e = 0; e < head_dim; ++e) out[e] *= inv;
}

}  // namespace tp_numa::attn
