// ATen entry points of the attention ops (implemented in csrc/attention/attention_ops.cpp).
#pragma once
#include <ATen/ATen.h>

namespace tp_numa {

// Decode: q float32 [H, D] against k/v cache rows 0..n_keys-1 ([S, n_kv, D], f16/bf16/f32,
// contiguous), all visible. Returns float32 [H * D].
at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       int64_t n_keys, double scale);

// Decode with the cache write fused in: k_cache[slot] = k_new, v_cache[slot] = v_new
// (k_new/v_new [n_kv, D], rounded to the cache dtype), then attn_decode over n_keys slots.
at::Tensor attn_decode_update(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                              at::Tensor& v_cache, int64_t slot, int64_t n_keys, double scale);

// Prefill: q float32 [T, H, D]; k/v [L, n_kv, D] in position order, keys 0..n_keys-1 used;
// query i sits at key index q_offset + i; causal, window < 0 = none. Returns float32 [T, H*D].
at::Tensor attn_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        int64_t n_keys, int64_t q_offset, double scale, int64_t window);

}  // namespace tp_numa
