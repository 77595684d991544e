"""Attention layer (torch path and native ops) against a naive float implementation.

The oracle loops over queries and heads in float64 with an explicit visibility rule:
key p is visible from query t iff p <= t and (no window or t - p < window).
"""
import math

import pytest
import torch

from tp_numa import attention_ops
from tp_numa.errors import TpNumaError
from tp_numa.layers.attention import Attention, attention_reference

NATIVE = attention_ops.available()
needs_native = pytest.mark.skipif(not NATIVE, reason="native attention ops not built")


def naive_attention(q, k, v, scale, window):
    """q [N, H, D], k/v [N, n_kv, D] for positions 0..N-1 (all queries) -> [N, H*D] float64."""
    N, H, D = q.shape
    n_kv = k.shape[1]
    group = H // n_kv
    out = torch.zeros(N, H, D, dtype=torch.float64)
    for t in range(N):
        for h in range(H):
            kh = h // group
            ps = [p for p in range(t + 1) if window is None or t - p < window]
            s = torch.tensor([float(q[t, h].double() @ k[p, kh].double()) * scale for p in ps])
            w = torch.softmax(s, dim=0)
            out[t, h] = sum(w[i] * v[p, kh].double() for i, p in enumerate(ps))
    return out.reshape(N, H * D)


def run_chunks(attn, q, k, v, chunks):
    """Feeds positions 0..N-1 to the layer in the given chunk sizes; returns all outputs."""
    outs, pos = [], 0
    for c in chunks:
        outs.append(attn(q[pos:pos + c], k[pos:pos + c], v[pos:pos + c], pos))
        pos += c
    assert pos == q.shape[0]
    return torch.cat(outs)


def make_qkv(N, H, n_kv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, D, generator=g)
    k = torch.randn(N, n_kv, D, generator=g)
    v = torch.randn(N, n_kv, D, generator=g)
    return q, k, v


CASES = [
    # name, H, n_kv, D, window, max_seq_len, chunks
    ("decode_only_mha", 2, 2, 16, None, 12, [1] * 12),
    ("prefill_then_decode_gqa", 6, 2, 16, None, 20, [9, 1, 1, 1, 5, 1]),
    ("window_no_wrap", 4, 1, 8, 8, 8, [5, 1, 1, 1]),
    ("window_ring_decode_wrap", 4, 2, 8, 4, 32, [3] + [1] * 10),
    ("window_prefill_wraps", 4, 2, 8, 5, 32, [3, 7, 1, 1, 6, 1]),
    ("window_prefill_longer_than_window", 2, 1, 8, 4, 32, [11, 1, 1]),
    ("window_larger_than_context", 3, 1, 8, 64, 10, [4, 1, 5]),
]


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)], ids=["torch", "native"])
@pytest.mark.parametrize("name,H,n_kv,D,window,max_len,chunks", CASES, ids=[c[0] for c in CASES])
def test_layer_matches_naive_f32_cache(native, name, H, n_kv, D, window, max_len, chunks):
    N = sum(chunks)
    q, k, v = make_qkv(N, H, n_kv, D)
    scale = 1.0 / math.sqrt(D)
    attn = Attention(H, n_kv, D, scale, window, layer_idx=0, use_native=native)
    attn.setup_cache(max_len, torch.float32)
    got = run_chunks(attn, q, k, v, chunks)
    want = naive_attention(q, k, v, scale, window)
    assert got.dtype == torch.float32 and got.shape == (N, H * D)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)], ids=["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_cache_rounds_keys_once(native, dtype):
    """With a 16-bit cache the result equals float attention over the rounded k/v, and
    prefill-all equals token-by-token (both read the same rounded keys)."""
    H, n_kv, D, N = 4, 2, 32, 13
    q, k, v = make_qkv(N, H, n_kv, D, seed=3)
    scale = 0.125
    want = naive_attention(q, k.to(dtype).float(), v.to(dtype).float(), scale, 6)
    for chunks in ([N], [1] * N, [4, 1, 8]):
        attn = Attention(H, n_kv, D, scale, 6, layer_idx=1, use_native=native)
        attn.setup_cache(16, dtype)
        got = run_chunks(attn, q, k, v, chunks)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)], ids=["torch", "native"])
def test_q8_0_cache_rounds_keys_once(native):
    """q8_0 cache: the result equals float attention over the Q8_0-rounded k/v (ggml's
    quantize_row_q8_0, then dequantized), whatever the chunking, ring wrap included."""
    from tp_numa import ops

    H, n_kv, D, N = 4, 2, 64, 13
    q, k, v = make_qkv(N, H, n_kv, D, seed=4)

    def rounded(x):
        return ops.dequantize(ops.quantize_q8_0(x).reshape(N * n_kv, -1), 8).view(N, n_kv, D)

    want = naive_attention(q, rounded(k), rounded(v), 0.125, 6)
    for chunks in ([N], [1] * N, [4, 1, 8]):
        attn = Attention(H, n_kv, D, 0.125, 6, layer_idx=1, use_native=native)
        attn.setup_cache(16, "q8_0")
        assert attn.k_cache.dtype == torch.uint8 and attn.k_cache.shape == (1, 6, n_kv, D // 32 * 34)
        got = run_chunks(attn, q, k, v, chunks)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


def test_q8_0_cache_needs_whole_blocks():
    attn = Attention(4, 2, 40, 1.0, None, layer_idx=3)
    with pytest.raises(TpNumaError, match="layer 3: a q8_0 KV cache needs head_dim divisible by 32, got 40"):
        attn.setup_cache(8, "q8_0")


def test_ring_buffer_holds_only_window():
    attn = Attention(4, 2, 8, 1.0, 4, layer_idx=0, use_native=False)
    attn.setup_cache(100, "f16")
    assert attn.k_cache.shape == (1, 4, 2, 8) and attn.k_cache.dtype == torch.float16
    full = Attention(4, 2, 8, 1.0, None, layer_idx=1, use_native=False)
    full.setup_cache(100, "bf16")
    assert full.v_cache.shape == (1, 100, 2, 8) and full.v_cache.dtype == torch.bfloat16


def test_reference_matches_naive_with_offsets():
    q, k, v = make_qkv(10, 4, 2, 8, seed=5)
    got = attention_reference(q[6:], k, v, 6, 0, 0.3, 3)
    want = naive_attention(q, k, v, 0.3, 3)[6:]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    attn = Attention(4, 2, 8, 1.0, None, layer_idx=7, use_native=False)
    q, k, v = make_qkv(3, 4, 2, 8)
    with pytest.raises(TpNumaError, match="setup_cache"):
        attn(q, k, v, 0)
    attn.setup_cache(4, torch.float32)
    with pytest.raises(TpNumaError, match="context size 4"):
        attn(q, k, v, 2)
    with pytest.raises(TpNumaError, match="multiple"):
        Attention(5, 2, 8, 1.0, None, layer_idx=0)
    with pytest.raises(TpNumaError, match="q4_0"):
        attn.setup_cache(4, "q4_0")
