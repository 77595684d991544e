// ATen wrappers of the attention kernels: check shapes/dtypes, allocate scratch, split the
// work into items over at::parallel_for, merge decode partials.
//
// Decode (flash-decoding): items = KV heads x key chunks, so even one KV head keeps every
// thread busy; each item leaves (max, sum, unnormalised output) per query head and the
// chunks are merged with the log-sum-exp rule. Prefill: items = KV heads x query blocks,
// ordered so that the contiguous ranges parallel_for hands each thread mix early (cheap,
// few visible keys) and late (expensive) blocks of the causal triangle.
#include "attention/attention_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "attention/attention_kernels.h"
#include "quant/quant_ops.h"

namespace tp_numa {
namespace {

using attn::Geometry;
using attn::KvType;

const attn::Kernels& kernels() {
    // Follows the quant kernels' ISA choice, so TP_NUMA_KERNEL=scalar / set_kernel_isa("scalar")
    // also selects the attention reference.
    if (kernel_isa() != "scalar") {
        if (const attn::Kernels* k = attn::avx2_kernels()) return *k;
    }
    return attn::scalar_kernels();
}

KvType kv_type_of(const at::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kHalf: return KvType::F16;
        case at::kBFloat16: return KvType::BF16;
        case at::kFloat: return KvType::F32;
        case at::kByte: return KvType::Q8_0;
        default:
            TORCH_CHECK(false, "attention: ", name, " must be float16, bfloat16, float32 or uint8 (Q8_0 blocks), got ",
                        t.scalar_type());
    }
}

// Elements per KV row of a cache tensor [L, n_kv, last]: last, or for a Q8_0 cache (uint8,
// 34-byte blocks of 32) last / 34 * 32.
int64_t kv_head_dim(const at::Tensor& t) {
    if (t.scalar_type() != at::kByte) return t.size(-1);
    TORCH_CHECK(t.size(-1) % 34 == 0, "attention: a Q8_0 cache row must be whole 34-byte blocks, got ", t.size(-1),
                " bytes");
    return t.size(-1) / 34 * 32;
}

// cache[slot] = x ([n_kv, D] float32), rounded to the cache type: dtype conversion, or for a
// Q8_0 cache ggml's quantize_row_q8_0 (quantize_q8_0 in csrc/quant/dequantize.cpp).
void store_row(at::Tensor& cache, int64_t slot, const at::Tensor& x) {
    if (cache.scalar_type() == at::kByte) {
        cache.select(0, slot).copy_(quantize_q8_0(x.contiguous().to(at::kFloat)));
    } else {
        cache.select(0, slot).copy_(x);
    }
}

Geometry check_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n_heads,
                  int64_t head_dim, int64_t n_keys, double scale) {
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention: CPU tensors expected");
    TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "attention: q must be contiguous float32");
    TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "attention: k and v must be [L, n_kv, D] of one shape, got ",
                k.sizes(), " and ", v.sizes());
    TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attention: k and v dtypes differ");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "attention: k and v must be contiguous");
    TORCH_CHECK(kv_head_dim(k) == head_dim, "attention: head_dim of q (", head_dim, ") and k (", kv_head_dim(k),
                ") differ");
    const int64_t n_kv = k.size(1);
    TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0, "attention: ", n_heads, " query heads not a multiple of ", n_kv,
                " KV heads");
    TORCH_CHECK(n_keys >= 1 && n_keys <= k.size(0), "attention: n_keys=", n_keys, " outside 1..", k.size(0));
    return Geometry{int(n_heads), int(n_kv), int(head_dim), float(scale), kv_type_of(k, "k"), k.data_ptr(),
                    v.data_ptr()};
}

constexpr int64_t kDecodeChunk = 256;

}  // namespace

at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n_keys,
                       double scale) {
    TORCH_CHECK(q.dim() == 2, "attn_decode: q must be [H, D], got ", q.sizes());
    const Geometry g = check_kv(q, k, v, q.size(0), q.size(1), n_keys, scale);
    const attn::Kernels& kern = kernels();
    const int G = g.group(), D = g.head_dim;

    // Chunks of kDecodeChunk keys, a constant: the split (and so the rounding of the merged
    // result) depends only on n_keys, never on the thread count or on how many KV heads this
    // rank holds, so tp=N reproduces tp=1 bit for bit and so does any --threads. 256 keys
    // keep a chunk's scores in L1 and give every thread items from ~1k keys of context on;
    // below that attention is a small share of a decode step.
    const int64_t chunk = std::min<int64_t>(kDecodeChunk, std::max<int64_t>(n_keys, 1));
    const int64_t n_chunks = std::max<int64_t>(1, (n_keys + chunk - 1) / chunk);
    const int64_t items = g.n_kv * n_chunks;

    // uninitialised on purpose: every item writes its m, l, acc and scores before reading them
    std::unique_ptr<float[]> scratch(new float[size_t(items) * G * (2 + D + chunk)]);
    float* ms = scratch.get();
    float* ls = ms + items * G;
    float* accs = ls + items * G;
    float* scores = accs + items * G * D;
    const float* qp = q.data_ptr<float>();
    // short contexts: one thread (waking the pool costs more than the work)
    const int64_t grain = n_keys * g.n_kv * D < 32768 ? items : 1;
    at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
        for (int64_t it = b; it < e; ++it) {
            const int kv = int(it / n_chunks);
            const int64_t j0 = (it % n_chunks) * chunk, j1 = std::min(n_keys, j0 + chunk);
            attn::Partial p{ms + it * G, ls + it * G, accs + it * G * D};
            kern.decode_chunk(g, qp, kv, j0, j1, scores + it * G * chunk, p);
        }
    });
    at::Tensor out = at::empty({int64_t(g.n_heads) * D}, q.options());
    float* op = out.data_ptr<float>();
    for (int h = 0; h < g.n_heads; ++h) {
        const int64_t first = int64_t(h / G) * n_chunks * G + h % G;  // item (kv, chunk 0), head h % G
        attn::merge_partials(ms + first, ls + first, accs + first * D, n_chunks, G, int64_t(G) * D, D,
                             op + int64_t(h) * D);
    }
    return out;
}

at::Tensor attn_decode_update(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                              at::Tensor& v_cache, int64_t slot, int64_t n_keys, double scale) {
    TORCH_CHECK(k_cache.dim() == 3 && slot >= 0 && slot < k_cache.size(0), "attn_decode_update: slot ", slot,
                " outside the cache of ", k_cache.size(0), " slots");
    const std::vector<int64_t> row{k_cache.size(1), kv_head_dim(k_cache)};
    TORCH_CHECK(k_new.sizes() == c10::IntArrayRef(row) && v_new.sizes() == k_new.sizes(),
                "attn_decode_update: k_new/v_new must be [n_kv, D] = ", row, ", got ", k_new.sizes(), " and ",
                v_new.sizes());
    TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "attn_decode_update: k and v caches differ in dtype");
    // rounds to the cache type exactly as the Python side's cache writes do
    store_row(k_cache, slot, k_new);
    store_row(v_cache, slot, v_new);
    return attn_decode(q, k_cache, v_cache, n_keys, scale);
}

at::Tensor attn_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n_keys,
                        int64_t q_offset, double scale, int64_t window) {
    TORCH_CHECK(q.dim() == 3, "attn_prefill: q must be [T, H, D], got ", q.sizes());
    const Geometry g = check_kv(q, k, v, q.size(1), q.size(2), n_keys, scale);
    const int64_t T = q.size(0);
    TORCH_CHECK(q_offset >= 0 && q_offset + T <= n_keys, "attn_prefill: queries at key indices ", q_offset, "..",
                q_offset + T - 1, " need n_keys >= ", q_offset + T, ", got ", n_keys);
    TORCH_CHECK(window != 0, "attn_prefill: window must be positive or negative (none)");
    const attn::Kernels& kern = kernels();
    at::Tensor out = at::empty({T, int64_t(g.n_heads) * g.head_dim}, q.options());
    if (T == 0) return out;
    const int64_t QB = attn::kPrefillQueryBlock;
    const int64_t n_blocks = (T + QB - 1) / QB, items = g.n_kv * n_blocks;
    const float* qp = q.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t scratch_floats = attn::prefill_scratch_floats(g);
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
        std::unique_ptr<float[]> scratch(new float[scratch_floats]);  // the kernel initialises what it reads
        for (int64_t it = b; it < e; ++it) {
            const int kv = int(it % g.n_kv);
            const int64_t s = it / g.n_kv;
            // 0, last, 1, last-1, ...: neighbouring items pair a light and a heavy block
            const int64_t blk = (s % 2 == 0) ? s / 2 : n_blocks - 1 - s / 2;
            const int64_t i0 = blk * QB, i1 = std::min(T, i0 + QB);
            kern.prefill_block(g, qp, n_keys, q_offset, window, kv, i0, i1, scratch.get(), op);
        }
    });
    return out;
}

}  // namespace tp_numa
