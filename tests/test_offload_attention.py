"""DeviceAttention (the offloaded attention core) against the CPU attention layer and a
float64 oracle. Device "cpu" stands in for the GPU on machines without CUDA; the tests
marked ``cuda`` run the real path and are skipped where no CUDA GPU is available."""
import pytest
import torch

from tp_numa.errors import TpNumaError
from tp_numa.layers.attention import Attention
from tp_numa.layers.device_attention import DeviceAttention

HAS_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def oracle(q, k, v, scale, window):
    """All positions 0..N-1 at once, float64, explicit visibility: p <= t and t - p < window."""
    N, H, D = q.shape
    group = H // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)                # (N, H, D)
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("thd,phd->htp", q.double(), kk) * scale       # (H, N, N)
    t = torch.arange(N).unsqueeze(1)
    p = torch.arange(N).unsqueeze(0)
    visible = (p <= t) & ((t - p < window) if window is not None else True)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("htp,phd->thd", torch.softmax(s, -1), vv).reshape(N, H * D)


def run(layer, q, k, v, chunks):
    outs, pos = [], 0
    for c in chunks:
        outs.append(layer(q[pos:pos + c], k[pos:pos + c], v[pos:pos + c], pos))
        pos += c
    return torch.cat(outs)


CASES = [  # heads, kv heads, head dim, window, chunk sizes
    (4, 1, 32, None, [5, 1, 1, 3, 1]),
    (4, 2, 16, 4, [6, 1, 1, 5, 1, 1]),
    (7, 1, 8, 3, [1] * 9),
    (6, 6, 16, None, [11]),
    (8, 2, 64, 6, [4, 4, 1, 7, 1]),
]


@pytest.mark.parametrize("H,n_kv,D,window,chunks", CASES)
@pytest.mark.parametrize("cache", ["f32", "f16"])
def test_cpu_stand_in_matches_cpu_attention(H, n_kv, D, window, chunks, cache):
    torch.manual_seed(H * 100 + D)
    N = sum(chunks)
    q, k, v = torch.randn(N, H, D), torch.randn(N, n_kv, D), torch.randn(N, n_kv, D)
    ref = Attention(H, n_kv, D, D ** -0.5, window, 0, use_native=False)
    dev = DeviceAttention.from_attention(ref, "cpu")
    ref.setup_cache(N + 2, cache)
    dev.setup_cache(N + 2, cache)
    want = run(ref, q, k, v, chunks)
    got = run(dev, q, k, v, chunks)
    assert got.dtype == torch.float32 and got.shape == (N, H * D)
    # same dtype, same rounded keys, float32 maths in both: equal to rounding noise
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if cache == "f32":
        torch.testing.assert_close(got.double(), oracle(q, k, v, D ** -0.5, window), rtol=1e-5, atol=1e-5)


def test_window_longer_than_ring():
    """Past the window the CPU layer wraps its ring; the device cache stays flat."""
    torch.manual_seed(1)
    H, n_kv, D, window, N = 4, 2, 16, 8, 40
    q, k, v = torch.randn(N, H, D), torch.randn(N, n_kv, D), torch.randn(N, n_kv, D)
    ref = Attention(H, n_kv, D, 0.25, window, 3, use_native=False)
    dev = DeviceAttention.from_attention(ref, "cpu")
    ref.setup_cache(N, "f32")
    dev.setup_cache(N, "f32")
    chunks = [13, 1, 1, 10, 1, 1, 1, 12]
    torch.testing.assert_close(run(dev, q, k, v, chunks), run(ref, q, k, v, chunks), rtol=1e-5, atol=1e-5)
    dev.setup_cache(N, "f32")   # a fresh cache, the whole sequence in one prefill
    torch.testing.assert_close(run(dev, q, k, v, [N]).double(), oracle(q, k, v, 0.25, window),
                               rtol=1e-5, atol=1e-5)


def test_keeps_the_layer_config_and_is_an_attention():
    ref = Attention(8, 2, 64, 0.125, 512, 7)
    dev = DeviceAttention.from_attention(ref, "cpu")
    assert isinstance(dev, Attention)
    assert (dev.n_heads, dev.n_kv_heads, dev.head_dim, dev.scale, dev.sliding_window, dev.layer_idx) == \
        (8, 2, 64, 0.125, 512, 7)
    dev.setup_cache(100, "bf16", device="cpu")
    assert dev.k_cache.shape == (1, 100, 2, 64) and dev.k_cache.dtype == torch.bfloat16
    assert "device=cpu" in repr(dev)


def test_errors():
    dev = DeviceAttention(4, 1, 8, 1.0, None, 0, "cpu")
    q, k = torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    with pytest.raises(TpNumaError, match="setup_cache"):
        dev(q, k, k, 0)
    dev.setup_cache(3, "f32")
    with pytest.raises(TpNumaError, match="exceed the context size 3"):
        dev(q, k, k, 2)
    with pytest.raises(ValueError, match="bad shapes"):
        dev(q, torch.randn(2, 2, 8), torch.randn(2, 2, 8), 0)
    with pytest.raises(TpNumaError, match="q8_0 KV cache is CPU only; attention placed on cpu needs f16"):
        DeviceAttention(4, 1, 32, 1.0, None, 0, "cpu").setup_cache(8, "q8_0")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(TpNumaError, match="placed on cuda:0, but CUDA is not available"):
        DeviceAttention(4, 1, 8, 1.0, None, 0, "cuda:0")


# ---------------------------------------------------------------- real GPU

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("H,n_kv,D,window,chunks", CASES)
@pytest.mark.parametrize("cache", ["f16", "bf16"])
def test_gpu_matches_cpu_attention(H, n_kv, D, window, chunks, cache):
    torch.manual_seed(7)
    N = sum(chunks)
    q, k, v = torch.randn(N, H, D), torch.randn(N, n_kv, D), torch.randn(N, n_kv, D)
    ref = Attention(H, n_kv, D, D ** -0.5, window, 0, use_native=False)
    gpu = DeviceAttention.from_attention(ref, "cuda:0")
    ref.setup_cache(N, cache)
    gpu.setup_cache(N, cache)
    want = run(ref, q, k, v, chunks)
    got = run(gpu, q, k, v, chunks)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert gpu.k_cache.device.type == "cuda" and gpu.k_cache.dtype == ref.k_cache.dtype
    # q is rounded to the cache dtype on the GPU (the CPU path keeps it in float32)
    tol = 2e-2 if cache == "bf16" else 3e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.cuda
@needs_cuda
def test_gpu_uses_pinned_staging_buffers():
    dev = DeviceAttention(4, 1, 8, 1.0, None, 0, "cuda:0")
    dev.setup_cache(8, "f16")
    dev(torch.randn(3, 4, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8), 0)
    assert dev._pinned and all(buf.is_pinned() for buf in dev._pinned.values())
