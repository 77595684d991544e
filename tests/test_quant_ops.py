"""tp_numa.ops.quant_matmul against the oracle: gguf.quants.dequantize then a float64 matmul.

Tolerances (why they are what they are):
- Float weights (F32/F16/BF16) see the float32 activation: error is float32 summation only,
  bounded by ``FLOAT_RTOL * (|x| @ |W|^T)``.
- Quantized weights see the activation rounded to 8-bit blocks (scale d_a = amax/127 per
  32 elements for 32-blocks, per 256 for K-quants/IQ4_XS), so each activation element is off
  by at most d_a/2. The test computes that bound per output,
  ``sum_k |W[n,k]| * d_a(k) / 2``, and requires the error to stay within it (plus float32
  slack). On top, the relative RMS error of the whole output must stay under the named
  per-type ``RMS_TOL`` (it is what a user sees; it is larger for 256-blocks, whose single
  activation scale per 256 elements is coarser).
- SIMD vs scalar: same integer sums, only float summation order differs.
- ``quant_matmul_exact`` (float64 sums of per-block fp32 terms, for row-parallel layers):
  the same oracle bounds, and bitwise invariance under any split of K into block ranges.
K-quants and IQ4 types cannot be quantized by gguf-py: their weights are random blocks
with finite, modest scales.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from tp_numa import ops

QUANTIZABLE = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
# byte offset of the f16 super-scale(s) in blocks that get random bytes
RANDOM_SCALES = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,), T.IQ4_NL: (0,)}
ALL_TYPES = sorted(QUANTIZABLE | set(RANDOM_SCALES), key=int)

FLOAT_RTOL = 2e-6
# RMS error of y vs the float64 oracle, relative to the typical output |x| |w| / sqrt(K), with standard-normal activations. Expected
# value: rounding to steps of amax/127 gives an error of std (amax/127)/sqrt(12) per element,
# i.e. ~0.5% of x's std for 32-blocks (amax ~2.1) and ~0.7% for 256-blocks (amax ~2.9);
# the limits leave room for the spread of small outputs (K = one block, few rows).
RMS_TOL = {
    T.F32: 1e-6, T.F16: 1e-6, T.BF16: 1e-6,
    T.Q4_0: 0.03, T.Q4_1: 0.03, T.Q5_0: 0.03, T.Q5_1: 0.03, T.Q8_0: 0.03, T.IQ4_NL: 0.03,
    T.Q4_K: 0.04, T.Q5_K: 0.04, T.Q6_K: 0.04, T.IQ4_XS: 0.04,
}

ISAS = ["scalar", "auto"]


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    ops.set_kernel_isa("auto")


def make_weight(qtype: T, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8 [n, row_bytes], dequantized float64 [n, k]) of a random weight."""
    if qtype in QUANTIZABLE:
        raw = quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    else:
        elems, nbytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
        for off in RANDOM_SCALES[qtype]:
            scale = rng.uniform(2e-3, 8e-3, size=raw.shape[:2]).astype(np.float16)
            raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(raw.shape[:2] + (2,))
        raw = raw.reshape(n, -1)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
    return raw, dequantize(raw, qtype).astype(np.float64).reshape(n, k)


def act_error_bound(qtype: T, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bound on |y - x @ W^T| from rounding x to 8-bit blocks: sum_k |W| * d_a / 2."""
    if qtype in (T.F32, T.F16, T.BF16):
        return np.zeros((x.shape[0], w.shape[0]))
    blk = 256 if GGML_QUANT_SIZES[qtype][0] == 256 else 32
    m, k = x.shape
    amax = np.abs(x.astype(np.float32)).reshape(m, k // blk, blk).max(axis=2)
    half_step = np.repeat(amax / 127.0 / 2.0, blk, axis=1)  # [m, k]
    return half_step @ np.abs(w).T


def check(qtype: T, m: int, n: int, k: int, isa: str, seed: int = 0, dtype=torch.float32,
          exact: bool = False, packed: bool = False) -> None:
    """``packed``: the weight goes through ``ops.pack_x4`` and the x4 ops."""
    rng = np.random.default_rng(seed + 1000 * int(qtype) + m + n + k)
    raw, w = make_weight(qtype, n, k, rng)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    ops.set_kernel_isa(isa)
    wt = torch.from_numpy(raw)
    if packed:
        wp = ops.pack_x4(wt, int(qtype))
        fast = lambda: ops.quant_matmul_x4(x, wp, int(qtype), n)            # noqa: E731
        slow = lambda: ops.quant_matmul_x4_exact(x, wp, int(qtype), n)      # noqa: E731
    else:
        fast = lambda: ops.quant_matmul(x, wt, int(qtype))                  # noqa: E731
        slow = lambda: ops.quant_matmul_exact(x, wt, int(qtype))            # noqa: E731
    if exact:
        y = slow()
        assert y.shape == (m, n) and y.dtype == torch.float64
        y = y.to(dtype)
    else:
        y = fast()
    assert y.shape == (m, n) and y.dtype == dtype
    xd = x.double().numpy()
    ref = xd @ w.T
    err = np.abs(y.double().numpy() - ref)
    scale = np.abs(xd) @ np.abs(w).T
    out_rtol = FLOAT_RTOL if dtype == torch.float32 else 2.0 ** -8  # bf16 output rounding
    bound = act_error_bound(qtype, xd, w) * 1.0001 + out_rtol * scale + 1e-6
    worst = float((err / bound).max())
    assert worst <= 1.0, f"{qtype.name} {isa} M={m} N={n} K={k}: error {worst:.3g} x bound"
    if dtype == torch.float32 and m * n >= 32:  # an RMS over a handful of outputs is noise
        # relative to the typical |x.w| of independent random rows, |x| |w| / sqrt(K)
        typ = np.outer((xd ** 2).sum(1), (w ** 2).sum(1)).mean() / k
        rms = float(np.sqrt((err ** 2).mean() / max(typ, 1e-30)))
        assert rms <= RMS_TOL[qtype], f"{qtype.name} {isa}: relative RMS error {rms:.3g}"


def ks(qtype: T) -> list[int]:
    blk = GGML_QUANT_SIZES[qtype][0]
    return [64, 96, 256] if blk == 1 else [blk, 2 * blk, 3 * blk]


def test_block_table_matches_gguf():
    for qtype in ALL_TYPES:
        assert ops.block_info(int(qtype)) == GGML_QUANT_SIZES[qtype]
        assert ops.is_supported(int(qtype))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_oracle(qtype, m, isa):
    for i, k in enumerate(ks(qtype)):
        for n in (1, 16, 33):
            check(qtype, m, n + i, k, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_exact_matches_oracle(qtype, m, isa):
    for i, k in enumerate(ks(qtype)):
        check(qtype, m, 33 + i, k, isa, exact=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_exact_is_split_invariant(qtype, isa):
    """Row-parallel shards: for every split of K into block ranges (2 and 3 ranks, uneven,
    at every boundary), the float64 sum of the shards' exact products rounds to the same
    float32 as the whole product, for GEMV (M=1) and prefill tiles (M=6), long rows (the
    4-rows-at-once kernels) and short ones, and any thread count."""
    blk = max(GGML_QUANT_SIZES[qtype][0], 32)
    ops.set_kernel_isa(isa)
    old = torch.get_num_threads()
    try:
        for nblocks in (7, 40):
            k = nblocks * blk
            rng = np.random.default_rng(int(qtype) + nblocks)
            raw, _ = make_weight(qtype, 37, k, rng)
            w = torch.from_numpy(raw)
            bpb = raw.shape[1] // (k // GGML_QUANT_SIZES[qtype][0]) * (blk // GGML_QUANT_SIZES[qtype][0])
            x = torch.from_numpy(rng.standard_normal((6, k)).astype(np.float32))
            for m in (1, 6):
                full = ops.quant_matmul_exact(x[:m], w, int(qtype)).float()
                cuts_list = [[0, c, nblocks] for c in range(1, nblocks)] + [[0, 2, nblocks - 3, nblocks]]
                for threads, cuts in enumerate(cuts_list):
                    torch.set_num_threads(1 + threads % 2)
                    total = torch.zeros(m, 37, dtype=torch.float64)
                    for a, b in zip(cuts, cuts[1:]):
                        total += ops.quant_matmul_exact(x[:m, a * blk:b * blk].contiguous(),
                                                        w[:, a * bpb:b * bpb].contiguous(), int(qtype))
                    assert torch.equal(total.float(), full), f"{qtype.name} {isa} K={k} M={m} cuts {cuts}"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_row_result_independent_of_row_range(qtype, exact):
    """Column-parallel shards: a weight row gives bitwise the same output whether it is
    computed in the whole matrix or in a row range starting anywhere (the GEMV kernels
    group rows by 4 from the range start; the result must not depend on the grouping)."""
    fn = ops.quant_matmul_exact if exact else ops.quant_matmul
    rng = np.random.default_rng(40 + int(qtype))
    for k in (4096, 256):                       # long rows (4 at once) and short ones
        if GGML_QUANT_SIZES[qtype][0] > k:
            continue
        raw, _ = make_weight(qtype, 23, k, rng)
        w = torch.from_numpy(raw)
        x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
        for m in (1, 3):
            full = fn(x[:m], w, int(qtype))
            for r0, r1 in ((1, 23), (3, 10), (5, 6)):
                assert torch.equal(fn(x[:m], w[r0:r1], int(qtype)), full[:, r0:r1]), f"{qtype.name} K={k} M={m} rows {r0}:{r1}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_prefill_m512(qtype, isa):
    blk = GGML_QUANT_SIZES[qtype][0]
    check(qtype, 512, 37, 2 * max(blk, 32), isa)
    check(qtype, 512, 24, max(blk, 32), isa)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.F16], ids=lambda t: t.name)
def test_bfloat16_activations(qtype):
    check(qtype, 5, 19, 512, "auto", dtype=torch.bfloat16)


@pytest.mark.parametrize("k", [4096, 256], ids=["long_rows", "short_rows"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_simd_matches_scalar(qtype, k):
    """Long rows (>= 1 KiB) take the 4-rows-at-once GEMV kernels, short rows the 1-row ones."""
    if ops.kernel_isa() == "scalar":
        pytest.skip("no SIMD kernel variant on this CPU")
    rng = np.random.default_rng(int(qtype))
    raw, w = make_weight(qtype, 67, k, rng)  # 67 rows: groups of 4 and a remainder
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    wt = torch.from_numpy(raw)
    scale = np.abs(x.double().numpy()) @ np.abs(w).T
    for m in (1, 3):  # GEMV kernels, then the prefill tiles
        y_simd = ops.quant_matmul(x[:m], wt, int(qtype))
        ops.set_kernel_isa("scalar")
        y_ref = ops.quant_matmul(x[:m], wt, int(qtype))
        ops.set_kernel_isa("auto")
        err = np.abs((y_simd - y_ref).double().numpy())
        assert (err <= 1e-5 * scale[:m] + 1e-6).all(), f"{qtype.name} M={m}: SIMD vs scalar {err.max():.3g}"


def test_threads_give_same_result():
    rng = np.random.default_rng(5)
    raw, _ = make_weight(T.Q4_K, 301, 512, rng)
    x = torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.quant_matmul(x, torch.from_numpy(raw), int(T.Q4_K))
        torch.set_num_threads(2)
        y2 = ops.quant_matmul(x, torch.from_numpy(raw), int(T.Q4_K))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)


def test_shards_compose():
    """Column shard = row range of W; row shard = block range copied contiguous; sums match."""
    rng = np.random.default_rng(6)
    raw, _ = make_weight(T.Q6_K, 40, 4 * 256, rng)
    x = torch.from_numpy(rng.standard_normal((2, 4 * 256)).astype(np.float32))
    w = torch.from_numpy(raw)
    full = ops.quant_matmul(x, w, int(T.Q6_K))
    cols = ops.quant_matmul(x, w[10:25], int(T.Q6_K))
    torch.testing.assert_close(cols, full[:, 10:25], rtol=0, atol=0)
    rb = 210
    part_a = ops.quant_matmul(x[:, :768].contiguous(), w[:, :3 * rb].contiguous(), int(T.Q6_K))
    part_b = ops.quant_matmul(x[:, 768:].contiguous(), w[:, 3 * rb:].contiguous(), int(T.Q6_K))
    torch.testing.assert_close(part_a + part_b, full, rtol=1e-5, atol=1e-4)


def test_empty_shapes():
    w = torch.zeros(0, 34, dtype=torch.uint8)
    assert ops.quant_matmul(torch.zeros(3, 32), w, int(T.Q8_0)).shape == (3, 0)
    w = torch.zeros(4, 34, dtype=torch.uint8)
    assert ops.quant_matmul(torch.zeros(0, 32), w, int(T.Q8_0)).shape == (0, 4)


@pytest.mark.parametrize("bad, message", [
    (lambda x, w: ops.quant_matmul(x, w, 99), "unknown or unsupported GGML type id 99"),
    (lambda x, w: ops.quant_matmul(x[:, :40].contiguous(), w, 8), "not a multiple of the Q8_0 block"),
    (lambda x, w: ops.quant_matmul(x, w[:, :30].contiguous(), 8), "bytes per row"),
    (lambda x, w: ops.quant_matmul(x.double(), w, 8), "float32 or bfloat16"),
    (lambda x, w: ops.quant_matmul(x.t(), w, 8), "must be 2-D|contiguous"),
    (lambda x, w: ops.quant_matmul(x[:, ::2], w, 8), "contiguous"),
    (lambda x, w: ops.quant_matmul(x, w[:, :34], 8), "contiguous"),
    (lambda x, w: ops.quant_matmul(x, w.view(torch.int8), 8), "uint8"),
    (lambda x, w: ops.quant_matmul(x[0], w, 8), "2-D"),
])
def test_bad_inputs_raise(bad, message):
    x = torch.randn(4, 64)
    w = torch.zeros(5, 68, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=message):
        bad(x, w)


def test_bad_isa_raises():
    with pytest.raises(RuntimeError, match="not available"):
        ops.set_kernel_isa("sse9")


def test_block_info_unknown_type():
    from tp_numa.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        ops.block_info(int(T.IQ2_XXS))


OPCHECK_CASES = [("quant_matmul", t) for t in (T.Q4_0, T.Q4_K, T.F32)] + \
                [("quant_matmul_exact", t) for t in (T.Q5_0, T.Q6_K, T.F16)]


@pytest.mark.parametrize("op, qtype", OPCHECK_CASES, ids=lambda c: c if isinstance(c, str) else c.name)
def test_opcheck(op, qtype):
    rng = np.random.default_rng(7 if op == "quant_matmul" else 8)
    blk = max(GGML_QUANT_SIZES[qtype][0], 32)
    raw, _ = make_weight(qtype, 9, 2 * blk, rng)
    x = torch.from_numpy(rng.standard_normal((3, 2 * blk)).astype(np.float32))
    torch.library.opcheck(getattr(torch.ops.tp_numa, op).default, (x, torch.from_numpy(raw), int(qtype)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_env_forces_scalar():
    import os
    import subprocess
    import sys

    env = dict(os.environ, TP_NUMA_KERNEL="scalar")
    out = subprocess.run([sys.executable, "-c", "from tp_numa import ops; print(ops.kernel_isa())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"


def test_exact_to_float32_is_the_rounded_float64():
    """Layers with nothing to all-reduce take the float32 rounding from the op itself."""
    rng = np.random.default_rng(12)
    raw, _ = make_weight(T.Q4_K, 19, 512, rng)
    w = torch.from_numpy(raw)
    x = torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32))
    y = ops.quant_matmul_exact(x, w, int(T.Q4_K), to_float32=True)
    assert y.dtype == torch.float32 and torch.equal(y, ops.quant_matmul_exact(x, w, int(T.Q4_K)).float())
    wp = ops.pack_x4(torch.from_numpy(make_weight(T.Q5_0, 19, 512, rng)[0]), int(T.Q5_0))
    y4 = ops.quant_matmul_x4_exact(x, wp, int(T.Q5_0), 19, to_float32=True)
    assert torch.equal(y4, ops.quant_matmul_x4_exact(x, wp, int(T.Q5_0), 19).float())


def test_read_bandwidth_probe_patterns_and_errors():
    """Every read pattern of the bandwidth probe runs (seconds > 0); bad patterns are named."""
    buf = torch.ones(3 << 20, dtype=torch.uint8)
    for streams, pf in [(1, 0), (2, 0), (2, 1024), (3, 0), (3, 4096), (4, 0), (8, 0), (8, 512)]:
        assert ops.read_bandwidth_probe(buf, 2, streams, pf) > 0
    with pytest.raises(RuntimeError, match="streams must be 1, 2, 3, 4 or 8"):
        ops.read_bandwidth_probe(buf, 1, 5, 0)
    with pytest.raises(RuntimeError, match="prefetch_bytes must be >= 0"):
        ops.read_bandwidth_probe(buf, 1, 2, -64)
    with pytest.raises(RuntimeError, match="repeats must be >= 1"):
        ops.read_bandwidth_probe(buf, 0)
