// Attention over a KV cache on raw pointers (no torch). The ATen wrapper
// (attention_ops.cpp) checks shapes, allocates scratch, and spreads the work items below
// over threads; each kernel function here is one work item, single-threaded.
//
// Layouts (row-major, contiguous):
//   q   float32 [T, H, D]        (decode: T = 1)
//   k,v KvType  [L, n_kv, D]     key j at row j; query head h reads KV head h / (H / n_kv)
//   out float32 [T, H, D]
// Every kernel has a scalar reference (attention_scalar.cpp) and an AVX2+FMA+F16C version
// (attention_avx2.cpp) with the same signature and the same arithmetic order per element
// up to float rounding.
#pragma once
#include <cstdint>

namespace tp_numa::attn {

// Q8_0: each [n_kv, D] row of the cache is D / 32 GGUF Q8_0 blocks (f16 scale d + 32 int8,
// x = d * q), so element e of the flattened cache is element e % 32 of block e / 32
// (D % 32 == 0). Kernels address every type by element index.
enum class KvType : int { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3 };

// Shared geometry of one call.
struct Geometry {
    int n_heads;    // H: query heads
    int n_kv;       // KV heads; H % n_kv == 0
    int head_dim;   // D
    float scale;    // multiplies q.k before the softmax
    KvType kv_type;
    const void* k;  // [L, n_kv, D] of kv_type
    const void* v;
    int group() const { return n_heads / n_kv; }
};

// Flash-decoding partial result of one (KV head, key chunk) item, for its `group` query
// heads: m = max score, l = sum exp(s - m), acc = sum exp(s - m) v  (unnormalised).
struct Partial {
    float* m;    // [group]
    float* l;    // [group]
    float* acc;  // [group, D]
};

// Decode item: query q [H, D] (one position) against keys j0..j1-1 of KV head kv_head.
// scores: scratch of group * (j1 - j0) floats.
using DecodeChunkFn = void (*)(const Geometry& g, const float* q, int kv_head, int64_t j0,
                               int64_t j1, float* scores, Partial out);

// Prefill item: queries i0..i1-1 (query i sits at key index q_offset + i) of the `group`
// heads of KV head kv_head; keys 0..n_keys-1; key j visible iff j <= q_offset + i and
// (window < 0 or q_offset + i - j < window). Blocked online softmax over key blocks of
// kPrefillKeyBlock. out rows are written in full. scratch: prefill_scratch_floats(g).
using PrefillBlockFn = void (*)(const Geometry& g, const float* q, int64_t n_keys,
                                int64_t q_offset, int64_t window, int kv_head, int64_t i0,
                                int64_t i1, float* scratch, float* out);

constexpr int kPrefillQueryBlock = 16;
constexpr int kPrefillKeyBlock = 64;

// Scratch floats one prefill item needs: per query row m, l, acc[D]; the key block as
// floats, transposed K^T [D, Bk] and V [Bk, D]; one row of scores [Bk].
inline int64_t prefill_scratch_floats(const Geometry& g) {
    const int64_t rows = int64_t(g.group()) * kPrefillQueryBlock;
    return rows * (2 + g.head_dim) + 2 * int64_t(g.head_dim) * kPrefillKeyBlock + kPrefillKeyBlock;
}

struct Kernels {
    const char* isa;
    DecodeChunkFn decode_chunk;
    PrefillBlockFn prefill_block;
};

const Kernels& scalar_kernels();
const Kernels* avx2_kernels();  // nullptr if the CPU lacks AVX2/FMA/F16C

// Merges n_chunks partials of one query head (stride between chunks given) into out[D]:
//   M = max m_c,  out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
void merge_partials(const float* m, const float* l, const float* acc, int64_t n_chunks,
                    int64_t ml_stride, int64_t acc_stride, int head_dim, float* out);

}  // namespace tp_numa::attn
