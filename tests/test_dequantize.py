"""tp_numa.ops.dequantize (csrc/quant/dequantize.cpp) against gguf.quants.dequantize: bitwise
equal for every supported type, on rows of random bytes (every code and bit pattern) with
finite fp16 scales; ops.quantize_q8_0 (the q8_0 KV cache format) bitwise
gguf.quants.quantize; clear errors for bad input; opcheck."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from tp_numa import ops

# byte offsets of the fp16 scale fields in each block (random bytes elsewhere)
SCALE_OFFSETS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.IQ4_NL: (0,),
    T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,),
}
FLOATS = (T.F32, T.F16, T.BF16)


def random_rows(qtype: T, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, row_bytes]: random codes, finite scales (signed, of both magnitudes)."""
    if qtype in FLOATS:
        vals = rng.standard_normal((n, k)).astype(np.float32) * 3
        if qtype == T.F16:
            return vals.astype(np.float16).view(np.uint8).reshape(n, -1)
        if qtype == T.BF16:
            return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, -1)
        return vals.view(np.uint8).reshape(n, -1)
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = (rng.uniform(1e-4, 2.0, size=raw.shape[:2]) * rng.choice([-1, 1], size=raw.shape[:2]))
        raw[:, :, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(raw.shape[:2] + (2,))
    return np.ascontiguousarray(raw.reshape(n, -1))


@pytest.mark.parametrize("qtype", list(FLOATS) + list(SCALE_OFFSETS), ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 7])
def test_bitwise_gguf(qtype, n):
    rng = np.random.default_rng(int(qtype) * 10 + n)
    k = 3 * max(GGML_QUANT_SIZES[qtype][0], 32)
    raw = random_rows(qtype, n, k, rng)
    ours = ops.dequantize(torch.from_numpy(raw), int(qtype))
    ref = dequantize(raw, qtype).astype(np.float32).reshape(n, k)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (n, k)
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32)), \
        f"max |diff| {np.abs(ours.numpy() - ref).max()}"


def test_many_rows_use_threads_and_agree():
    rng = np.random.default_rng(5)
    raw = random_rows(T.Q6_K, 600, 512, rng)
    torch.set_num_threads(2)
    ours = ops.dequantize(torch.from_numpy(raw), int(T.Q6_K))
    assert np.array_equal(ours.numpy(), dequantize(raw, T.Q6_K).reshape(600, 512))


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(2, 34, dtype=torch.uint8), 99), "unknown or unsupported GGML type id 99"),
    ((torch.zeros(2, 35, dtype=torch.uint8), 8), "35 bytes per row is not whole Q8_0 blocks of 34 bytes"),
    ((torch.zeros(2, 34, dtype=torch.int8), 8), "w must be a uint8 CPU tensor"),
    ((torch.zeros(4, 34, dtype=torch.uint8)[::2], 8), "w must be contiguous"),
])
def test_bad_inputs(args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.dequantize(*args)


def test_opcheck():
    raw = torch.from_numpy(random_rows(T.Q4_K, 3, 256, np.random.default_rng(1)))
    torch.library.opcheck(torch.ops.tp_numa.dequantize.default, (raw, int(T.Q4_K)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_quantize_q8_0_is_gguf_bitwise():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 3, 96)) * rng.uniform(0.01, 50, size=(5, 3, 1))).astype(np.float32)
    x[0, 0, :32] = 0.0                      # an all-zero block: scale 0, codes 0
    x[1, 1, 5] = 127.5 / 127 * 3            # ties at .5 round away from zero, as ggml's roundf
    ours = ops.quantize_q8_0(torch.from_numpy(x))
    assert tuple(ours.shape) == (5, 3, 102) and ours.dtype == torch.uint8
    ref = quantize(x.reshape(-1, 96), T.Q8_0).reshape(5, 3, 102)
    assert np.array_equal(ours.numpy(), ref)
    with pytest.raises(RuntimeError, match="not a multiple of the Q8_0 block size 32"):
        ops.quantize_q8_0(torch.zeros(2, 40))
