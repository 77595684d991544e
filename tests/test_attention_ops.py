"""Native attention ops (scalar reference and SIMD) against the torch reference.

Sizes cover the shipped models' geometry (Qwen2.5-0.5B: 14 heads / 2 KV, D=64; Gemma-3-270m:
4 heads / 1 KV, D=256), several decode chunks (flash-decoding merge), prefill longer than
one query and one key block, windows, and every cache dtype (q8_0: GGUF Q8_0 blocks in a
uint8 cache, checked against the reference on the dequantized cache).
"""
import pytest
import torch

from tp_numa import attention_ops, ops
from tp_numa.layers.attention import attention_reference, from_cache

pytestmark = pytest.mark.skipif(not attention_ops.available(), reason="native attention ops not built")

ISAS = ["scalar", "auto"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, "q8_0"]


@pytest.fixture(params=ISAS)
def isa(request):
    torch.ops.tp_numa.set_kernel_isa(request.param)
    yield request.param
    torch.ops.tp_numa.set_kernel_isa("auto")


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def cache(*shape, seed, dtype):
    """(cache tensor, its values as the reference reads them): a q8_0 cache holds the
    Q8_0 blocks of random values (uint8), the others the values in that dtype."""
    if dtype == "q8_0":
        if shape[-1] % 32:
            pytest.skip("a q8_0 cache needs head_dim % 32 == 0")
        c = ops.quantize_q8_0(rand(*shape, seed=seed))
        return c, from_cache(c, shape[-1])
    c = rand(*shape, seed=seed, dtype=dtype)
    return c, c


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,n_kv,D,n_keys", [(14, 2, 64, 1), (14, 2, 64, 700), (4, 1, 256, 1500),
                                             (8, 8, 24, 130), (16, 1, 64, 67)])
def test_decode_matches_reference(isa, dtype, H, n_kv, D, n_keys):
    S = n_keys + 5  # cache larger than the used prefix
    q = rand(H, D, seed=1)
    k, kf = cache(S, n_kv, D, seed=2, dtype=dtype)
    v, vf = cache(S, n_kv, D, seed=3, dtype=dtype)
    got = attention_ops.attn_decode(q, k, v, n_keys, 0.125)
    want = attention_reference(q[None], kf[:n_keys], vf[:n_keys], n_keys - 1, 0, 0.125, None)[0]
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_single_kv_head_uses_all_threads_same_result(threads):
    """Split-K over chunks must not change the result (beyond rounding) with the thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q = rand(4, 256, seed=4)
        k = rand(4096, 1, 256, seed=5, dtype=torch.float16)
        v = rand(4096, 1, 256, seed=6, dtype=torch.float16)
        got = attention_ops.attn_decode(q, k, v, 4096, 0.0625)
        want = attention_reference(q[None], k, v, 4095, 0, 0.0625, None)[0]
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,n_kv,D,T,past,window", [
    (14, 2, 64, 100, 0, -1),      # several query and key blocks
    (14, 2, 64, 37, 90, -1),      # prefill after a cached prefix
    (4, 1, 256, 150, 0, 40),      # sliding window shorter than the prompt
    (4, 1, 256, 20, 70, 32),      # window + prefix
    (6, 3, 40, 17, 3, 5),         # head_dim not a multiple of 64
    (2, 1, 12, 9, 0, -1),         # head_dim not a multiple of 8: scalar fallback
])
def test_prefill_matches_reference(isa, dtype, H, n_kv, D, T, past, window):
    L = past + T
    q = rand(T, H, D, seed=7)
    k, kf = cache(L + 3, n_kv, D, seed=8, dtype=dtype)
    v, vf = cache(L + 3, n_kv, D, seed=9, dtype=dtype)
    got = attention_ops.attn_prefill(q, k, v, L, past, 0.1, window)
    want = attention_reference(q, kf[:L], vf[:L], past, 0, 0.1, None if window < 0 else window)
    torch.testing.assert_close(got, want, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_update_writes_slot_then_attends(dtype):
    from tp_numa.layers.attention import to_cache

    q = rand(6, 32, seed=10)
    kc, _ = cache(9, 3, 32, seed=11, dtype=dtype)
    vc, _ = cache(9, 3, 32, seed=12, dtype=dtype)
    k_new, v_new = rand(3, 32, seed=13), rand(3, 32, seed=14)
    want_k, want_v = kc.clone(), vc.clone()
    # the same rounding as a Python-side cache write (Q8_0: ggml's quantize_row_q8_0)
    want_k[4], want_v[4] = to_cache(k_new, kc.dtype), to_cache(v_new, vc.dtype)
    got = attention_ops.attn_decode_update(q, k_new, v_new, kc, vc, 4, 7, 0.2)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    want = attention_reference(q[None], from_cache(want_k[:7], 32), from_cache(want_v[:7], 32), 6, 0, 0.2, None)[0]
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="slot"):
        attention_ops.attn_decode_update(q, k_new, v_new, kc, vc, 9, 7, 0.2)


def test_bad_arguments_raise():
    q = rand(4, 16)
    k = rand(8, 2, 16)
    with pytest.raises(RuntimeError, match="n_keys"):
        attention_ops.attn_decode(q, k, k, 9, 1.0)
    with pytest.raises(RuntimeError, match="multiple"):
        attention_ops.attn_decode(rand(3, 16), k, k, 4, 1.0)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or uint8"):
        attention_ops.attn_decode(q, k.double(), k.double(), 4, 1.0)
    with pytest.raises(RuntimeError, match="need n_keys"):
        attention_ops.attn_prefill(rand(5, 4, 16), k, k, 4, 0, 1.0, -1)


def test_opcheck():
    q = rand(4, 16)
    k = rand(8, 2, 16, dtype=torch.float16)
    torch.library.opcheck(torch.ops.tp_numa.attn_decode.default, (q, k, k, 5, 0.25))
    torch.library.opcheck(torch.ops.tp_numa.attn_decode_update.default,
                          (q, rand(2, 16, seed=1), rand(2, 16, seed=2), k.clone(), k.clone(), 5, 6, 0.25))
    torch.library.opcheck(torch.ops.tp_numa.attn_prefill.default, (rand(3, 4, 16), k, k, 6, 3, 0.25, 4))
