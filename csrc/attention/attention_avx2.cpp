// AVX2 + FMA + F16C attention kernels (same contract as attention_scalar.cpp).
//
// Decode chunk: query heads of the GQA group in tiles of up to 4; each K row is converted
// 8 lanes at a time and dotted with the tile's heads, several keys at once (one K read
// serves the tile, 8 independent FMA chains), 8 dot products reduced together with hadd;
// then p = exp(s - m) vectorised and acc[h] += p[h][j] * V[j] over L1-sized key blocks.
// Prefill block: the key block is converted once to float (K transposed to [D, Bk], V as
// [Bk, D]); each query row computes its Bk scores as 8 vectors of 8 keys (no horizontal
// sums), updates its running max/sum (online softmax) and accumulates P V 64 lanes at a time.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/attention_kernels.h"
#include "attention/avx2_math.h"
#include "quant/blocks.h"
#include "simd/avx2_reduce.h"

namespace tp_numa::attn {
namespace {

// 8 elements of a KV row as float.
template <KvType T>
inline __m256 load8(const void* base, int64_t i) {
    if constexpr (T == KvType::F16) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
    } else if constexpr (T == KvType::BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else if constexpr (T == KvType::Q8_0) {
        // i % 8 == 0 and D % 32 == 0: the 8 elements sit in one block
        const auto* b = static_cast<const quant::BlockQ8_0*>(base) + (i >> 5);
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b->qs + (i & 31)));
        return _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(b->d)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    } else {
        return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    }
}

// Four horizontal sums at once: lane i of the result = sum of a_i.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// Scores of NH <= 4 query heads (qs: NH rows of D, contiguous) against keys j0..j1-1:
// s[h * n + j] = scale * q_h . k_j. KB keys at once (KB * NH = 8 accumulators), so each
// K load serves NH heads, each q load KB keys, and 8 independent FMA chains hide the FMA
// latency; the 8 dot products are reduced together by two hsum4.
//
// With `prefetch` (the first head tile of a chunk, which is the one reading the cache from
// DRAM), the K and V rows kPrefetchKeys ahead are prefetched: a KV head's rows are strided
// by n_kv * D elements, and without this the loop waits on memory latency (measured 2.5x
// slower from DRAM than from cache at 4096 keys).
constexpr int64_t kPrefetchKeys = 48;

template <KvType T>
inline void prefetch_kv_row(const Geometry& g, int64_t elem) {
    // bytes of `n` elements (Q8_0: 34 bytes per 32; elem and D are multiples of 32 there)
    auto bytes = [](int64_t n) { return T == KvType::F32 ? 4 * n : (T == KvType::Q8_0 ? n / 32 * 34 : 2 * n); };
    const auto* kp = static_cast<const char*>(g.k) + bytes(elem);
    const auto* vp = static_cast<const char*>(g.v) + bytes(elem);
    for (int64_t b = 0; b < bytes(g.head_dim); b += 64) {
        _mm_prefetch(kp + b, _MM_HINT_T0);
        _mm_prefetch(vp + b, _MM_HINT_T1);
    }
}

template <KvType T, int NH>
void decode_scores(const Geometry& g, const float* qs, int kv_head, int64_t j0, int64_t j1,
                   float* s, int64_t n, bool prefetch) {
    static_assert(NH >= 1 && NH <= 4, "head tile of 1..4");
    constexpr int KB = NH == 1 ? 8 : (NH == 2 ? 4 : 2);
    const int D = g.head_dim;
    const int64_t row = int64_t(g.n_kv) * D;  // elements between consecutive keys
    int64_t j = j0;
    for (; j + KB <= j1; j += KB) {
        if (prefetch) {
            for (int kb = 0; kb < KB; ++kb) prefetch_kv_row<T>(g, ((j + kb + kPrefetchKeys) * g.n_kv + kv_head) * D);
        }
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        const int64_t base = (j * g.n_kv + kv_head) * D;
        for (int d = 0; d < D; d += 8) {
            __m256 qv[NH];
            for (int h = 0; h < NH; ++h) qv[h] = _mm256_loadu_ps(qs + h * D + d);
            for (int kb = 0; kb < KB; ++kb) {
                const __m256 kv = load8<T>(g.k, base + kb * row + d);
                for (int h = 0; h < NH; ++h) acc[kb * NH + h] = _mm256_fmadd_ps(qv[h], kv, acc[kb * NH + h]);
            }
        }
        float r[8];
        _mm_storeu_ps(r, hsum4(acc[0], acc[1], acc[2], acc[3]));
        _mm_storeu_ps(r + 4, hsum4(acc[4], acc[5], acc[6], acc[7]));
        for (int kb = 0; kb < KB; ++kb)
            for (int h = 0; h < NH; ++h) s[h * n + (j + kb - j0)] = r[kb * NH + h] * g.scale;
    }
    for (; j < j1; ++j) {  // tail: one key at a time
        __m256 acc[4];
        for (int h = 0; h < 4; ++h) acc[h] = _mm256_setzero_ps();
        const int64_t base = (j * g.n_kv + kv_head) * D;
        for (int d = 0; d < D; d += 8) {
            const __m256 kv = load8<T>(g.k, base + d);
            for (int h = 0; h < NH; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + h * D + d), kv, acc[h]);
        }
        float r[4];
        _mm_storeu_ps(r, hsum4(acc[0], acc[1], acc[2], acc[3]));
        for (int h = 0; h < NH; ++h) s[h * n + (j - j0)] = r[h] * g.scale;
    }
}

// acc[h, :] = sum_j p[h, j] V_j for NH <= 4 heads. Keys in blocks of 32 (their V rows stay
// in L1 across the passes over D); each pass covers DC = 8 / NH lane groups of 8, so one
// broadcast p[h, j] serves DC FMAs and NH * DC = 8 independent accumulators hide the FMA
// latency.
template <KvType T, int NH>
void decode_pv(const Geometry& g, const float* p, int kv_head, int64_t j0, int64_t j1, int64_t n,
               float* acc_out) {
    constexpr int64_t JB = 32;
    constexpr int DC = NH == 1 ? 8 : (NH == 2 ? 4 : 2);
    const int D = g.head_dim;
    const int64_t row = int64_t(g.n_kv) * D;
    for (int64_t jb = j0; jb < j1; jb += JB) {
        const int64_t je = std::min(j1, jb + JB);
        const bool first = jb == j0;
        int d = 0;
        for (; d + 8 * DC <= D; d += 8 * DC) {
            __m256 a[NH][DC];
            for (int h = 0; h < NH; ++h)
                for (int c = 0; c < DC; ++c)
                    a[h][c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_out + h * D + d + 8 * c);
            const int64_t base = (jb * g.n_kv + kv_head) * D + d;
            for (int64_t j = jb; j < je; ++j) {
                __m256 v[DC];
                for (int c = 0; c < DC; ++c) v[c] = load8<T>(g.v, base + (j - jb) * row + 8 * c);
                for (int h = 0; h < NH; ++h) {
                    const __m256 ph = _mm256_set1_ps(p[h * n + (j - j0)]);
                    for (int c = 0; c < DC; ++c) a[h][c] = _mm256_fmadd_ps(ph, v[c], a[h][c]);
                }
            }
            for (int h = 0; h < NH; ++h)
                for (int c = 0; c < DC; ++c) _mm256_storeu_ps(acc_out + h * D + d + 8 * c, a[h][c]);
        }
        for (; d < D; d += 8) {  // D not a multiple of 8 * DC: one lane group at a time
            __m256 a[NH];
            for (int h = 0; h < NH; ++h) a[h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_out + h * D + d);
            for (int64_t j = jb; j < je; ++j) {
                const __m256 v = load8<T>(g.v, (j * g.n_kv + kv_head) * D + d);
                for (int h = 0; h < NH; ++h) a[h] = _mm256_fmadd_ps(_mm256_set1_ps(p[h * n + (j - j0)]), v, a[h]);
            }
            for (int h = 0; h < NH; ++h) _mm256_storeu_ps(acc_out + h * D + d, a[h]);
        }
    }
}

template <KvType T, int NH>
void decode_tile(const Geometry& g, const float* qs, int kv_head, int64_t j0, int64_t j1,
                 float* s, float* m, float* l, float* acc, bool prefetch) {
    const int64_t n = j1 - j0;
    decode_scores<T, NH>(g, qs, kv_head, j0, j1, s, n, prefetch);
    for (int h = 0; h < NH; ++h) {
        float* sh = s + h * n;
        __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sh + j));
        float mx = simd::hmax_ps(vm);
        for (; j < n; ++j) mx = std::max(mx, sh[j]);
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 vl = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 p = simd::exp256(_mm256_sub_ps(_mm256_loadu_ps(sh + j), vmx));
            _mm256_storeu_ps(sh + j, p);
            vl = _mm256_add_ps(vl, p);
        }
        float sum = simd::hsum_ps(vl);
        for (; j < n; ++j) {
            sh[j] = std::exp(sh[j] - mx);
            sum += sh[j];
        }
        m[h] = mx;
        l[h] = sum;
    }
    decode_pv<T, NH>(g, s, kv_head, j0, j1, n, acc);
}

template <KvType T>
void decode_chunk_avx2(const Geometry& g, const float* q, int kv_head, int64_t j0, int64_t j1,
                       float* scores, Partial out) {
    const int G = g.group(), D = g.head_dim;
    if (D % 8 != 0) {
        scalar_kernels().decode_chunk(g, q, kv_head, j0, j1, scores, out);
        return;
    }
    const int64_t n = j1 - j0;
    for (int h0 = 0; h0 < G; h0 += 4) {
        const int nh = std::min(4, G - h0);
        const float* qs = q + int64_t(kv_head * G + h0) * D;
        float* s = scores + h0 * n;
        float* m = out.m + h0;
        float* l = out.l + h0;
        float* acc = out.acc + int64_t(h0) * D;
        switch (nh) {
            case 1: decode_tile<T, 1>(g, qs, kv_head, j0, j1, s, m, l, acc, h0 == 0); break;
            case 2: decode_tile<T, 2>(g, qs, kv_head, j0, j1, s, m, l, acc, h0 == 0); break;
            case 3: decode_tile<T, 3>(g, qs, kv_head, j0, j1, s, m, l, acc, h0 == 0); break;
            default: decode_tile<T, 4>(g, qs, kv_head, j0, j1, s, m, l, acc, h0 == 0); break;
        }
    }
}

template <KvType T>
void prefill_block_avx2(const Geometry& g, const float* q, int64_t n_keys, int64_t q_offset,
                        int64_t window, int kv_head, int64_t i0, int64_t i1, float* scratch,
                        float* out) {
    const int G = g.group(), D = g.head_dim, H = g.n_heads;
    constexpr int Bk = kPrefillKeyBlock;
    if (D % 8 != 0) {
        scalar_kernels().prefill_block(g, q, n_keys, q_offset, window, kv_head, i0, i1, scratch, out);
        return;
    }
    const int64_t nq = i1 - i0, R = G * nq;  // rows r = hh * nq + (i - i0)
    float* m = scratch;
    float* l = m + R;
    float* acc = l + R;
    float* kt = acc + R * D;          // [D, Bk]
    float* vf = kt + int64_t(D) * Bk; // [Bk, D]
    float* sc = vf + int64_t(Bk) * D; // [Bk]
    std::fill(m, m + R, -std::numeric_limits<float>::infinity());
    std::fill(l, l + R, 0.f);
    std::fill(acc, acc + R * D, 0.f);

    const int64_t t_lo = q_offset + i0, t_hi = q_offset + i1 - 1;
    const int64_t j_lo = window < 0 ? 0 : std::max<int64_t>(0, t_lo - window + 1);
    const int64_t j_hi = std::min(t_hi, n_keys - 1);
    const __m256 vscale = _mm256_set1_ps(g.scale);
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    alignas(32) float tmp[8];

    for (int64_t jb = j_lo; jb <= j_hi; jb += Bk) {
        const int nb = int(std::min<int64_t>(Bk, j_hi + 1 - jb));
        // key block to float: K transposed (zero-padded columns), V row-major
        for (int jj = 0; jj < Bk; ++jj) {
            if (jj < nb) {
                const int64_t base = ((jb + jj) * g.n_kv + kv_head) * D;
                for (int d = 0; d < D; d += 8) {
                    _mm256_store_ps(tmp, load8<T>(g.k, base + d));
                    for (int e = 0; e < 8; ++e) kt[(d + e) * Bk + jj] = tmp[e];
                    _mm256_storeu_ps(vf + jj * D + d, load8<T>(g.v, base + d));
                }
            } else {
                for (int d = 0; d < D; ++d) kt[d * Bk + jj] = 0.f;
            }
        }
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t t = q_offset + i;
            const int64_t lo = window < 0 ? 0 : std::max<int64_t>(0, t - window + 1);
            // visible keys of this row within the block: jj in [a, b)
            const int a = int(std::max<int64_t>(0, lo - jb));
            const int b = int(std::min<int64_t>(nb, t - jb + 1));
            if (a >= b) continue;
            for (int hh = 0; hh < G; ++hh) {
                const int64_t r = hh * nq + (i - i0);
                const float* qr = q + (i * H + kv_head * G + hh) * D;
                __m256 s[Bk / 8];
                for (int c = 0; c < Bk / 8; ++c) s[c] = _mm256_setzero_ps();
                for (int d = 0; d < D; ++d) {
                    const __m256 bq = _mm256_set1_ps(qr[d]);
                    const float* krow = kt + d * Bk;
                    for (int c = 0; c < Bk / 8; ++c) s[c] = _mm256_fmadd_ps(bq, _mm256_loadu_ps(krow + 8 * c), s[c]);
                }
                // scale, mask keys outside [a, b), block max
                __m256 vmax = ninf;
                for (int c = 0; c < Bk / 8; ++c) {
                    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(8 * c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                    const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(a - 1)),
                                                        _mm256_cmpgt_epi32(_mm256_set1_epi32(b), idx));
                    s[c] = _mm256_blendv_ps(ninf, _mm256_mul_ps(s[c], vscale), _mm256_castsi256_ps(in));
                    vmax = _mm256_max_ps(vmax, s[c]);
                }
                const float m_new = std::max(m[r], simd::hmax_ps(vmax));
                const float corr = std::exp(m[r] - m_new);
                const __m256 vm = _mm256_set1_ps(m_new);
                __m256 vsum = _mm256_setzero_ps();
                for (int c = 0; c < Bk / 8; ++c) {
                    // exp of a masked (-inf) score must be exactly 0
                    const __m256 keep = _mm256_cmp_ps(s[c], ninf, _CMP_NEQ_OQ);
                    const __m256 p = _mm256_and_ps(simd::exp256(_mm256_sub_ps(s[c], vm)), keep);
                    _mm256_storeu_ps(sc + 8 * c, p);
                    vsum = _mm256_add_ps(vsum, p);
                }
                l[r] = l[r] * corr + simd::hsum_ps(vsum);
                m[r] = m_new;
                float* ar = acc + r * D;
                const __m256 vcorr = _mm256_set1_ps(corr);
                int d = 0;
                for (; d + 64 <= D; d += 64) {
                    __m256 o[8];
                    for (int k = 0; k < 8; ++k) o[k] = _mm256_mul_ps(_mm256_loadu_ps(ar + d + 8 * k), vcorr);
                    for (int jj = a; jj < b; ++jj) {
                        const __m256 p = _mm256_set1_ps(sc[jj]);
                        const float* vr = vf + jj * D + d;
                        for (int k = 0; k < 8; ++k) o[k] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * k), o[k]);
                    }
                    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(ar + d + 8 * k, o[k]);
                }
                for (; d < D; d += 8) {
                    __m256 o = _mm256_mul_ps(_mm256_loadu_ps(ar + d), vcorr);
                    for (int jj = a; jj < b; ++jj) o = _mm256_fmadd_ps(_mm256_set1_ps(sc[jj]), _mm256_loadu_ps(vf + jj * D + d), o);
                    _mm256_storeu_ps(ar + d, o);
                }
            }
        }
    }
    for (int64_t i = i0; i < i1; ++i) {
        for (int hh = 0; hh < G; ++hh) {
            const int64_t r = hh * nq + (i - i0);
            const __m256 inv = _mm256_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
            float* o = out + (i * H + kv_head * G + hh) * D;
            const float* ar = acc + r * D;
            for (int d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(ar + d), inv));
        }
    }
}

void decode_chunk_dispatch(const Geometry& g, const float* q, int kv_head, int64_t j0, int64_t j1,
                           float* scores, Partial out) {
    switch (g.kv_type) {
        case KvType::F16: return decode_chunk_avx2<KvType::F16>(g, q, kv_head, j0, j1, scores, out);
        case KvType::BF16: return decode_chunk_avx2<KvType::BF16>(g, q, kv_head, j0, j1, scores, out);
        case KvType::Q8_0: return decode_chunk_avx2<KvType::Q8_0>(g, q, kv_head, j0, j1, scores, out);
        default: return decode_chunk_avx2<KvType::F32>(g, q, kv_head, j0, j1, scores, out);
    }
}

void prefill_block_dispatch(const Geometry& g, const float* q, int64_t n_keys, int64_t q_offset,
                            int64_t window, int kv_head, int64_t i0, int64_t i1, float* scratch,
                            float* out) {
    switch (g.kv_type) {
        case KvType::F16:
            return prefill_block_avx2<KvType::F16>(g, q, n_keys, q_offset, window, kv_head, i0, i1, scratch, out);
        case KvType::BF16:
            return prefill_block_avx2<KvType::BF16>(g, q, n_keys, q_offset, window, kv_head, i0, i1, scratch, out);
        case KvType::Q8_0:
            return prefill_block_avx2<KvType::Q8_0>(g, q, n_keys, q_offset, window, kv_head, i0, i1, scratch, out);
        default:
            return prefill_block_avx2<KvType::F32>(g, q, n_keys, q_offset, window, kv_head, i0, i1, scratch, out);
    }
}

}  // namespace

const Kernels* avx2_kernels() {
    static const Kernels k{"avx2", decode_chunk_dispatch, prefill_block_dispatch};
    const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
    return ok ? &k : nullptr;
}

}  // namespace tp_numa::attn
