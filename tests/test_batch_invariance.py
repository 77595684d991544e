"""Batch invariance (issue 20): a row's result does not depend on its batch.

At temperature 0 a request must give the same tokens served alone and beside others, so
for one activation row the quantized matmul must return the same bits whatever M is,
whichever rows share the call, however the weight rows are split over threads or cut into
a shard, for every type, both weight layouts (raw GGUF rows, x4), every kernel ISA this CPU
runs, and both accumulations (Fast float32, Exact float64). The reference is each row
computed alone (M = 1: the GEMV kernels); M >= 2 runs the prefill micro-kernels and their
row / tile tails (MR = 4 activation rows per micro-kernel call, 64 per pass over a tile).
MoE: a token's float64 partial from moe_experts is the same alone (decode path) and among
other tokens (prefill path). docs/kernels.md, "Batch invariance", says how it is kept.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from test_moe import _flat, _random_rows
from test_quant_ops import ALL_TYPES, make_weight
from tp_numa import moe_ops, ops

AVAILABLE_ISAS = ops.available_kernel_isas()
M_VALUES = (1, 2, 3, 4, 5, 8, 9, 64, 65)
M_MAX = max(M_VALUES)
# Weight rows: not a multiple of 4 (x4 tail group), enough that 2 threads split a GEMV and
# that a thread's range spans several 128 KiB tiles.
N = 262
THREADS = (1, 2)
X4_TYPES = [T(q) for q in ops.X4_QTYPES]
CASES = [(qt, "raw") for qt in ALL_TYPES] + [(qt, "x4") for qt in X4_TYPES]


@pytest.fixture(params=ops.KERNEL_ISAS)
def isa(request):
    if request.param not in AVAILABLE_ISAS:
        pytest.skip(f"this CPU or build has no {request.param} kernels")
    ops.set_kernel_isa(request.param)
    yield request.param
    ops.set_kernel_isa("auto")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_available_kernel_isas():
    assert AVAILABLE_ISAS[0] == "scalar" and set(AVAILABLE_ISAS) <= set(ops.KERNEL_ISAS)
    assert ops.kernel_isa() in AVAILABLE_ISAS
    for isa in ops.KERNEL_ISAS:
        if isa not in AVAILABLE_ISAS:
            with pytest.raises(RuntimeError):
                ops.set_kernel_isa(isa)
    ops.set_kernel_isa("auto")


def k_for(qtype: T) -> int:
    """K of an odd number of blocks (the GEMV's two alternating accumulators end on a
    lone block) whose row is at least 1 KiB (so the GEMV takes 4 rows per call: rows_by4)."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if elems == 1:  # float types: also a tail of K % 8 elements
        return (1024 // nbytes) + 12
    nb = -(-1024 // nbytes)
    return elems * (nb | 1)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if torch.equal(bits(got), bits(want)):
        return
    bad = (bits(got) != bits(want)).any(dim=1).nonzero().flatten().tolist()
    diff = (got.double() - want.double()).abs().max().item()
    pytest.fail(f"{what}: rows {bad[:8]} differ from M = 1 (max abs diff {diff:.3g})")


def matmul_fn(qtype: T, raw: torch.Tensor, layout: str, exact: bool):
    """x -> y for the op under test on weight rows `raw` (packed when layout is x4)."""
    n = raw.shape[0]
    if layout == "x4":
        wp = ops.pack_x4(raw, int(qtype))
        if exact:
            return lambda x: ops.quant_matmul_x4_exact(x, wp, int(qtype), n)
        return lambda x: ops.quant_matmul_x4(x, wp, int(qtype), n)
    if exact:
        return lambda x: ops.quant_matmul_exact(x, raw, int(qtype))
    return lambda x: ops.quant_matmul(x, raw, int(qtype))


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("qtype,layout", CASES, ids=[f"{q.name}-{lay}" for q, lay in CASES])
def test_rows_do_not_depend_on_batch(isa, qtype, layout, exact):
    k = k_for(qtype)
    rng = np.random.default_rng(int(qtype) * 7 + len(layout))
    raw = torch.from_numpy(make_weight(qtype, N, k, rng)[0])
    x = torch.from_numpy(rng.standard_normal((M_MAX, k)).astype(np.float32))
    fn = matmul_fn(qtype, raw, layout, exact)
    torch.set_num_threads(1)
    ref = torch.cat([fn(x[m:m + 1].contiguous()) for m in range(M_MAX)])
    perm = torch.from_numpy(rng.permutation(M_MAX))
    subsets = {"rows 60..64": torch.arange(60, 65), "9 shuffled rows": perm[:9], "6 shuffled rows": perm[9:15],
               "a row twice": torch.tensor([3, 40, 3, 7, 40])}
    for threads in THREADS:
        torch.set_num_threads(threads)
        where = f"{qtype.name} {layout} {isa} {'exact' if exact else 'fast'} threads={threads}"
        for m in M_VALUES:
            assert_bitwise(fn(x[:m].contiguous()), ref[:m], f"{where} M={m}")
        for name, idx in subsets.items():
            assert_bitwise(fn(x[idx].contiguous()), ref[idx], f"{where} {name}")


@pytest.mark.parametrize("qtype,layout", CASES, ids=[f"{q.name}-{lay}" for q, lay in CASES])
def test_rows_do_not_depend_on_weight_range(isa, qtype, layout):
    """A shard of the weight rows (an x4 one repacked from an offset that is not a multiple
    of 4, so rows move to other lanes and groups) gives its rows' bits of the whole."""
    k = k_for(qtype)
    rng = np.random.default_rng(int(qtype))
    raw = torch.from_numpy(make_weight(qtype, N, k, rng)[0])
    x = torch.from_numpy(rng.standard_normal((9, k)).astype(np.float32))
    for exact in (False, True):
        full = {m: matmul_fn(qtype, raw, layout, exact)(x[:m].contiguous()) for m in (1, 9)}
        for n0, n1 in ((1, N), (5, 138), (130, 131)):
            part = matmul_fn(qtype, raw[n0:n1].contiguous(), layout, exact)
            for m in (1, 9):
                assert_bitwise(part(x[:m].contiguous()), full[m][:, n0:n1],
                               f"{qtype.name} {layout} {isa} exact={exact} rows [{n0}, {n1}) M={m}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=[q.name for q in ALL_TYPES])
def test_bfloat16_rows_do_not_depend_on_batch(qtype):
    k = k_for(qtype)
    rng = np.random.default_rng(int(qtype) + 100)
    raw = torch.from_numpy(make_weight(qtype, 70, k, rng)[0])
    x = torch.from_numpy(rng.standard_normal((9, k)).astype(np.float32)).bfloat16()
    full = ops.quant_matmul(x, raw, int(qtype))
    assert full.dtype == torch.bfloat16
    for m in range(9):
        assert_bitwise(ops.quant_matmul(x[m:m + 1].contiguous(), raw, int(qtype)).view(torch.int16).int(),
                       full[m:m + 1].view(torch.int16).int(), f"{qtype.name} bf16 row {m}")


MOE_CASES = [  # gate/up type, down type, d, expert slice widths (0: no slice here), x4
    (T.Q8_0, T.Q4_0, 128, [64, 32, 0, 96, 32, 64], True),
    (T.Q5_0, T.Q8_0, 96, [32, 64, 32, 32, 0, 32], True),
    (T.Q4_K, T.Q6_K, 256, [512, 256, 0, 256, 256, 256], True),
    (T.Q5_K, T.Q4_K, 256, [256, 256, 512, 0, 256, 256], True),
    (T.Q4_K, T.Q6_K, 256, [512, 256, 0, 256, 256, 256], False),
    (T.Q4_1, T.Q5_1, 160, [64, 96, 32, 0, 32, 64], False),
    (T.IQ4_XS, T.IQ4_NL, 256, [256, 0, 256, 256, 256, 256], False),
    (T.F32, T.F32, 64, [16, 8, 0, 24, 8, 16], False),
]


@pytest.mark.parametrize("gq,dq,d,ff,x4", MOE_CASES,
                         ids=[f"{g.name}-{q.name}-{'x4' if v else 'raw'}" for g, q, _, _, v in MOE_CASES])
def test_moe_experts_token_does_not_depend_on_batch(isa, gq, dq, d, ff, x4):
    """moe_experts on T tokens (per-expert GEMMs) gives each token the float64 bits of the
    token alone (the T = 1 decode pass), and of any subset of the tokens."""
    rng = np.random.default_rng(d + len(ff))
    E, k, ntok = len(ff), 3, 11
    gate = [_random_rows(rng, f, d, gq) if f else None for f in ff]
    up = [_random_rows(rng, f, d, gq) if f else None for f in ff]
    down = [_random_rows(rng, d, f, dq) if f else None for f in ff]
    mats, offs = zip(*(_flat(m, q, x4) for m, q in ((gate, gq), (up, gq), (down, dq))))
    x = torch.from_numpy(rng.standard_normal((ntok, d)).astype(np.float32))
    ids, w = moe_ops.moe_route(torch.from_numpy(rng.standard_normal((ntok, E)).astype(np.float32)), None, k, 1,
                               True, 1.0)
    rest = (list(mats), torch.stack(offs).contiguous(), torch.tensor(ff, dtype=torch.int64),
            [int(gq), int(gq), int(dq)], [int(x4)] * 3, False)

    def run(idx):
        return moe_ops.moe_experts(x[idx].contiguous(), ids[idx].contiguous(), w[idx].contiguous(), *rest)

    torch.set_num_threads(1)
    ref = torch.cat([run(torch.tensor([t])) for t in range(ntok)])
    assert ref.abs().max() > 0
    for threads in THREADS:
        torch.set_num_threads(threads)
        for name, idx in {"all": torch.arange(ntok), "tokens 2..6": torch.arange(2, 7),
                          "shuffled": torch.from_numpy(rng.permutation(ntok)[:6])}.items():
            assert_bitwise(run(idx), ref[idx], f"moe {gq.name}/{dq.name} x4={x4} {isa} threads={threads} {name}")
