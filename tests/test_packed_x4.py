"""The x4 weight layout (csrc/quant/packed_x4.h) and its ops (Q4_0, Q5_0, Q8_0, Q4_K,
Q5_K, Q6_K), against the same oracle as the row layout (tests/test_quant_ops.py: gguf dequantize
+ float64 matmul, with the bound of the activation's 8-bit rounding), plus the properties
tensor parallelism relies on: lossless packing, results independent of row grouping,
threads and K splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from tp_numa import ops

from test_quant_ops import check, make_weight

X4_TYPES = [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
ISAS = ["scalar", "auto"]


def block(qtype: T) -> int:
    """Elements per block: 32, or 256 for the K-quant super-block."""
    return GGML_QUANT_SIZES[qtype][0]


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    ops.set_kernel_isa("auto")


def test_x4_types_match_kernels():
    assert tuple(int(t) for t in X4_TYPES) == ops.X4_QTYPES


@pytest.mark.parametrize("qtype", X4_TYPES, ids=lambda t: t.name)
def test_pack_roundtrip_is_lossless(qtype):
    rng = np.random.default_rng(int(qtype))
    for n in (1, 3, 4, 9, 33):
        raw, _ = make_weight(qtype, n, 3 * block(qtype), rng)
        wt = torch.from_numpy(raw)
        wp = ops.pack_x4(wt, int(qtype))
        assert wp.shape == ((n + 3) // 4, 4 * raw.shape[1])
        assert torch.equal(ops.unpack_x4(wp, int(qtype), n), wt)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 7, 64, 512])
@pytest.mark.parametrize("qtype", X4_TYPES, ids=lambda t: t.name)
def test_x4_matches_oracle(qtype, m, isa):
    for i, nb in enumerate([1, 2, 7 if block(qtype) == 256 else 28]):
        k = nb * block(qtype)
        for n in ((1, 16, 33) if m < 512 else (37,)):
            check(qtype, m, n + i, k, isa, packed=True)
            check(qtype, m, n + i, k, isa, packed=True, exact=True)


def test_x4_bfloat16_activations():
    check(T.Q5_0, 5, 19, 512, "auto", dtype=torch.bfloat16, packed=True)


@pytest.mark.parametrize("qtype", X4_TYPES, ids=lambda t: t.name)
def test_x4_close_to_row_layout(qtype):
    """Same integer sums as quant_matmul; only the fp32 summation order differs."""
    rng = np.random.default_rng(3 + int(qtype))
    k = 7 * 256 if block(qtype) == 256 else 896
    raw, w = make_weight(qtype, 67, k, rng)
    wt = torch.from_numpy(raw)
    wp = ops.pack_x4(wt, int(qtype))
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    scale = np.abs(x.double().numpy()) @ np.abs(w).T
    for m in (1, 5):
        err = (ops.quant_matmul_x4(x[:m], wp, int(qtype), 67) - ops.quant_matmul(x[:m], wt, int(qtype))).abs()
        assert (err.double().numpy() <= 1e-5 * scale[:m] + 1e-6).all()


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("qtype", X4_TYPES, ids=lambda t: t.name)
def test_x4_row_result_independent_of_grouping(qtype, exact):
    """Column-parallel shards pack their own row range, so a row lands in a different group
    position (or in the padded last group) depending on tp: its result must not change."""
    fn = ops.quant_matmul_x4_exact if exact else ops.quant_matmul_x4
    rng = np.random.default_rng(50 + int(qtype))
    k = 2 * block(qtype) if block(qtype) == 256 else 256
    raw, _ = make_weight(qtype, 23, k, rng)
    wt = torch.from_numpy(raw)
    x = torch.from_numpy(rng.standard_normal((6, k)).astype(np.float32))
    for m in (1, 6):
        full = fn(x[:m], ops.pack_x4(wt, int(qtype)), int(qtype), 23)
        for r0, r1 in ((1, 23), (3, 10), (5, 6), (2, 20)):
            part = fn(x[:m], ops.pack_x4(wt[r0:r1].contiguous(), int(qtype)), int(qtype), r1 - r0)
            assert torch.equal(part, full[:, r0:r1]), f"{qtype.name} M={m} rows {r0}:{r1}"


@pytest.mark.parametrize("qtype", X4_TYPES, ids=lambda t: t.name)
def test_x4_exact_is_split_invariant(qtype):
    """Row-parallel shards pack their own block range; float64 partials must compose."""
    rng = np.random.default_rng(60 + int(qtype))
    nb, be = 11, block(qtype)
    raw, _ = make_weight(qtype, 21, be * nb, rng)
    wt = torch.from_numpy(raw)
    bb = GGML_QUANT_SIZES[qtype][1]
    x = torch.from_numpy(rng.standard_normal((6, be * nb)).astype(np.float32))
    for m in (1, 6):
        full = ops.quant_matmul_x4_exact(x[:m], ops.pack_x4(wt, int(qtype)), int(qtype), 21).float()
        for cuts in ([0, 4, nb], [0, 1, 7, nb], [0, 5, 6, 10, nb]):
            total = torch.zeros(m, 21, dtype=torch.float64)
            for a, b in zip(cuts, cuts[1:]):
                wp = ops.pack_x4(wt[:, a * bb:b * bb].contiguous(), int(qtype))
                total += ops.quant_matmul_x4_exact(x[:m, be * a:be * b].contiguous(), wp, int(qtype), 21)
            assert torch.equal(total.float(), full), f"{qtype.name} M={m} cuts {cuts}"


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_x4_kquant_gemv_equals_prefill_rows(qtype, exact):
    """The K-quant GEMV (M = 1) reads a compact activation and builds its lane vectors in
    the kernel; prefill (M >= 2) reads them prepared. Same sums, same order: bitwise."""
    fn = ops.quant_matmul_x4_exact if exact else ops.quant_matmul_x4
    rng = np.random.default_rng(70 + int(qtype))
    raw, _ = make_weight(qtype, 37, 5 * 256, rng)
    wp = ops.pack_x4(torch.from_numpy(raw), int(qtype))
    x = torch.from_numpy(rng.standard_normal((9, 5 * 256)).astype(np.float32))
    batch = fn(x, wp, int(qtype), 37)
    for m in (0, 4, 8):
        assert torch.equal(fn(x[m:m + 1], wp, int(qtype), 37), batch[m:m + 1]), f"row {m}"


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_x4_threads_give_same_result(qtype):
    rng = np.random.default_rng(9)
    raw, _ = make_weight(qtype, 301, 512, rng)
    wp = ops.pack_x4(torch.from_numpy(raw), int(qtype))
    x = torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32))
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((ops.quant_matmul_x4(x, wp, int(qtype), 301), ops.quant_matmul_x4(x[:1], wp, int(qtype), 301)))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("bad, message", [
    (lambda x, w: ops.pack_x4(w, int(T.IQ4_XS)), "type id 23 has no x4 layout"),
    (lambda x, w: ops.pack_x4(w[:, :30].contiguous(), 8), "not whole Q8_0 blocks"),
    (lambda x, w: ops.quant_matmul_x4(x, ops.pack_x4(w, 8), 8, 9), r"must be \[3, 272\]"),
    (lambda x, w: ops.quant_matmul_x4(x, ops.pack_x4(w, 8), 6, 5), "Q5_0 weight of n=5"),
    (lambda x, w: ops.quant_matmul_x4(x[:, :40].contiguous(), ops.pack_x4(w, 8), 8, 5), "not a multiple"),
    (lambda x, w: ops.quant_matmul_x4(x.double(), ops.pack_x4(w, 8), 8, 5), "float32 or bfloat16"),
    (lambda x, w: ops.quant_matmul_x4(x, ops.pack_x4(w, 8).view(torch.int8), 8, 5), "uint8"),
    (lambda x, w: ops.unpack_x4(ops.pack_x4(w, 8), 8, 12), r"must be \[3, 272\]"),
])
def test_x4_bad_inputs_raise(bad, message):
    x = torch.randn(4, 64)
    w = torch.zeros(5, 68, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=message):
        bad(x, w)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("op", ["quant_matmul_x4", "quant_matmul_x4_exact"])
def test_x4_opcheck(op, qtype):
    rng = np.random.default_rng(11)
    k = 2 * block(qtype)
    raw, _ = make_weight(qtype, 9, k, rng)
    wp = ops.pack_x4(torch.from_numpy(raw), int(qtype))
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    torch.library.opcheck(getattr(torch.ops.tp_numa, op).default, (x, wp, int(qtype), 9),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.tp_numa.pack_x4.default, (torch.from_numpy(raw), int(qtype)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.tp_numa.unpack_x4.default, (wp, int(qtype), 9),
                          test_utils=("test_schema", "test_faketensor"))


def test_which_weights_are_repacked(monkeypatch):
    from tp_numa.layers.quant import x4_pays

    assert x4_pays(int(T.Q5_0)) and x4_pays(int(T.Q4_0))
    assert x4_pays(int(T.Q8_0))                     # any width (3-stream x4 GEMV beats the row layout)
    assert x4_pays(int(T.Q4_K))                     # 4 rows' scales in one vpmaddwd
    assert x4_pays(int(T.Q6_K))
    assert x4_pays(int(T.Q5_K))
    assert not x4_pays(int(T.IQ4_XS))               # no x4 layout
    monkeypatch.setenv("TP_NUMA_X4", "0")
    assert not x4_pays(int(T.Q5_0))
