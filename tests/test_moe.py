"""Mixture-of-experts: the routing and expert ops against numpy / gguf-py oracles on every
kernel ISA the CPU has, the qwen3moe / qwen2moe / Mixtral (llama + experts) models against
a float64 reference, the native decode step against the module path, and tp = 2, 3, 4
bitwise tp = 1 (uneven expert splits, ranks holding nothing of some experts)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from synthetic_gguf import _F16_SCALE_OFFSETS, Spec
from synthetic_moe import moe_spec, read_float_weights, reference_moe_logits, write_moe_model
from test_tp import _run
from tp_numa import moe_ops, ops
from tp_numa.layers import native_decode
from tp_numa.models import load_model

ALL_ISAS = ["scalar", "avx2", "avx512", "avx512vnni"]
F32 = dict(weight_type=QT.F32, embed_type=QT.F32, down_type=QT.F32, v_type=QT.F32)
TOKENS = [5, 17, 3, 250, 42, 42, 7, 300, 1, 99]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    try:
        ops.set_kernel_isa(request.param)
    except RuntimeError:
        pytest.skip(f"this CPU or build has no {request.param} kernels")
    yield request.param
    ops.set_kernel_isa("auto")


# ---------------------------------------------------------------- routing


def _route_ref(logits, k, gating, norm, scale, bias=None, groups=1, used=1):
    logits = logits.astype(np.float64)
    if gating == 1:
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    elif gating == 2:
        p = 1 / (1 + np.exp(-logits))
    else:
        p = logits.copy()
    sel = p + (0 if bias is None else bias)
    T, E = p.shape
    if groups > 1:
        gs = E // groups
        score = np.sort(sel.reshape(T, groups, gs), -1)[..., -2:].sum(-1)
        keep = np.argsort(-score, -1, kind="stable")[:, :used]
        mask = np.full((T, groups), -np.inf)
        np.put_along_axis(mask, keep, 0.0, -1)
        sel = sel + np.repeat(mask, gs, -1)
    ids = np.argsort(-sel, -1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, -1)
    if gating == 3:
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    if norm:
        w /= w.sum(-1, keepdims=True)
    if scale not in (0, 1):
        w *= scale
    return ids, w


@pytest.mark.parametrize("gating,norm,scale,bias,groups", [
    (1, True, 1.0, False, 1),      # qwen3moe / Mixtral
    (1, False, 1.0, False, 1),     # qwen2moe / OLMoE
    (2, True, 2.5, True, 4),       # DeepSeek V3: sigmoid + selection bias + groups + scale
    (3, False, 1.0, False, 1),     # gpt-oss: softmax over the top-k logits
])
def test_route_matches_reference(gating, norm, scale, bias, groups):
    g = torch.Generator().manual_seed(gating)
    logits = torch.randn(7, 16, generator=g) * 3
    b = torch.randn(16, generator=g) * 0.1 if bias else None
    ids, w = moe_ops.moe_route(logits, b, 4, gating, norm, scale, groups, 2)
    rid, rw = _route_ref(logits.numpy(), 4, gating, norm, scale, None if b is None else b.numpy(), groups, 2)
    np.testing.assert_array_equal(ids.numpy(), rid)
    np.testing.assert_allclose(w.numpy(), rw, rtol=2e-6, atol=1e-7)


def test_route_bad_arguments():
    logits = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="k=9"):
        moe_ops.moe_route(logits, None, 9, 1, True, 1.0)
    with pytest.raises(RuntimeError, match="gating"):
        moe_ops.moe_route(logits, None, 2, 7, True, 1.0)
    with pytest.raises(RuntimeError, match="groups"):
        moe_ops.moe_route(logits, None, 2, 1, True, 1.0, 3, 1)


# ---------------------------------------------------------------- experts op


def _random_rows(rng, n, k, qtype):
    """[n, k] weights of qtype as raw GGUF rows (gguf-py quantizes the types it can;
    the others are random blocks with small finite scales)."""
    if qtype == QT.F32:
        return rng.standard_normal((n, k)).astype(np.float32).view(np.uint8)
    if qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_1, QT.Q5_1):
        return quantize((rng.standard_normal((n, k)) / math.sqrt(k)).astype(np.float32), qtype)
    block, tsize = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, tsize), dtype=np.uint8)
    for off in _F16_SCALE_OFFSETS.get(qtype, ()):
        raw[:, :, off:off + 2] = (rng.random(raw.shape[:2]) * 0.01).astype(np.float16).view(np.uint8).reshape(
            *raw.shape[:2], 2)
    return raw.reshape(n, -1)


def _flat(rows_per_expert, qtype, x4):
    ts = [None if r is None else torch.from_numpy(np.ascontiguousarray(r)) for r in rows_per_expert]
    ts = [None if t is None else (ops.pack_x4(t, int(qtype)) if x4 else t) for t in ts]
    offs, off, parts = [], 0, []
    for t in ts:
        offs.append(off)
        if t is not None:
            parts.append(t.reshape(-1))
            off += t.numel()
    return torch.cat(parts), torch.tensor(offs)


CASES = [  # gate/up type, down type, d, expert slice widths (0: no slice on this rank)
    (QT.Q8_0, QT.Q4_0, 128, [64, 32, 0, 96, 32]),
    (QT.Q5_0, QT.Q8_0, 96, [32, 64, 32, 32, 0]),
    (QT.Q4_K, QT.Q6_K, 256, [512, 256, 0, 256, 256]),
    (QT.Q5_K, QT.Q4_K, 256, [256, 256, 512, 0, 256]),
    (QT.IQ4_XS, QT.IQ4_NL, 256, [256, 0, 256, 256, 256]),     # row layout (no x4)
    (QT.F32, QT.F32, 64, [16, 8, 0, 24, 8]),
]


@pytest.mark.parametrize("gq,dq,d,ff", CASES, ids=lambda v: v.name if hasattr(v, "name") else None)
@pytest.mark.parametrize("T", [1, 6])
def test_experts_match_oracle(isa, gq, dq, d, ff, T):
    rng = np.random.default_rng(len(ff) * d + T)
    E, k = len(ff), 3
    gate = [_random_rows(rng, f, d, gq) if f else None for f in ff]
    up = [_random_rows(rng, f, d, gq) if f else None for f in ff]
    down = [_random_rows(rng, d, f, dq) if f else None for f in ff]
    x = torch.from_numpy(rng.standard_normal((T, d)).astype(np.float32))
    ids, w = moe_ops.moe_route(torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)), None, k, 1, True,
                               1.0)
    ref = np.zeros((T, d))
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if not ff[e]:
                continue
            G = dequantize(gate[e], gq).astype(np.float64).reshape(ff[e], d)
            U = dequantize(up[e], gq).astype(np.float64).reshape(ff[e], d)
            D = dequantize(down[e], dq).astype(np.float64).reshape(d, ff[e])
            g, u = G @ x[t].double().numpy(), U @ x[t].double().numpy()
            ref[t] += float(w[t, j]) * (D @ (g / (1 + np.exp(-g)) * u))
    # 8-bit activation blocks twice (x, then the hidden state): a few % of the output scale
    tol = 1e-5 if gq == QT.F32 else 0.06
    for x4 in (False, True):
        if x4 and (gq not in [QT(q) for q in ops.X4_QTYPES] or dq not in [QT(q) for q in ops.X4_QTYPES]):
            continue
        mats, offs = zip(*(_flat(m, q, x4) for m, q in ((gate, gq), (up, gq), (down, dq))))
        y = moe_ops.moe_experts(x, ids, w, list(mats), torch.stack(offs).contiguous(),
                                torch.tensor(ff, dtype=torch.int64), [int(gq), int(gq), int(dq)], [int(x4)] * 3,
                                False)
        assert y.dtype == torch.float64 and y.shape == (T, d)
        err = np.abs(y.numpy() - ref).max() / (np.abs(ref).max() + 1e-30)
        assert err < tol, f"x4={x4}: relative error {err:.3g}"


def test_experts_decode_thread_and_isa_invariant():
    """The decode pass (T = 1) gives the same float64 bits at 1 and 2 threads."""
    rng = np.random.default_rng(7)
    ff = [256, 512, 256, 0]
    d = 256
    gate = [_random_rows(rng, f, d, QT.Q4_K) if f else None for f in ff]
    down = [_random_rows(rng, d, f, QT.Q6_K) if f else None for f in ff]
    mats, offs = zip(*(_flat(m, q, True) for m, q in ((gate, QT.Q4_K), (gate, QT.Q4_K), (down, QT.Q6_K))))
    args = (torch.randn(1, d), torch.tensor([[1, 0, 3]]), torch.tensor([[0.5, 0.3, 0.2]]), list(mats),
            torch.stack(offs).contiguous(), torch.tensor(ff), [12, 12, 14], [1, 1, 1], False)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = moe_ops.moe_experts(*args)
        torch.set_num_threads(2)
        b = moe_ops.moe_experts(*args)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


def test_experts_bad_arguments():
    buf = torch.zeros(64, dtype=torch.uint8)
    offs = torch.zeros(3, 2, dtype=torch.int64)
    x = torch.randn(1, 32)
    ids = torch.tensor([[0, 1]])
    w = torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="outside its buffer"):
        moe_ops.moe_experts(x, ids, w, [buf] * 3, offs, torch.tensor([32, 32]), [8, 8, 8], [0, 0, 0], False)
    with pytest.raises(RuntimeError, match="expert id 5"):
        moe_ops.moe_experts(x, torch.tensor([[0, 5]]), w, [buf] * 3, offs, torch.tensor([0, 0]), [8, 8, 8],
                            [0, 0, 0], False)


def test_opcheck():
    logits = torch.randn(3, 8)
    torch.library.opcheck(torch.ops.tp_numa.moe_route.default, (logits, None, 2, 1, True, 1.0, 1, 1))
    rng = np.random.default_rng(1)
    ff = [32, 64]
    rows = [_random_rows(rng, f, 64, QT.Q8_0) for f in ff]
    down = [_random_rows(rng, 64, f, QT.Q8_0) for f in ff]
    mats, offs = zip(*(_flat(m, QT.Q8_0, True) for m in (rows, rows, down)))
    ids, w = moe_ops.moe_route(torch.randn(2, 2), None, 1, 1, True, 1.0)
    torch.library.opcheck(torch.ops.tp_numa.moe_experts.default,
                          (torch.randn(2, 64), ids, w, list(mats), torch.stack(offs).contiguous(), torch.tensor(ff),
                           [8, 8, 8], [1, 1, 1], False))


# ---------------------------------------------------------------- models


ARCHS = ["qwen3moe", "qwen2moe", "llama"]


def _rel_err(ours, ref):
    num = np.linalg.norm(ours - ref, axis=-1)
    den = np.linalg.norm(ref - ref.mean(-1, keepdims=True), axis=-1)
    return float((num / den).max())


def _prefill_then_decode(path, tokens, split):
    model, cfg = load_model(path)
    model.setup_cache(64, torch.float32)
    ids = torch.tensor(tokens)
    out = [model(ids[:split], 0)] + [model(ids[t:t + 1], t) for t in range(split, len(tokens))]
    return torch.cat(out).double().numpy(), model, cfg


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("merged", [False, True])
def test_f32_moe_matches_float_reference(tmp_path, arch, merged):
    """All-F32 weights: the kernels multiply in float, so the MoE wiring (router, top-k,
    renormalisation, shared expert and its gate, merged gate_up) must match to float32."""
    ms = moe_spec(arch, gate_type=QT.F32, down_type=QT.F32, merged_gate_up=merged)
    ms.base = Spec(arch=arch, n_layers=2, **F32)
    path = write_moe_model(tmp_path / f"{arch}.gguf", ms)
    ref = reference_moe_logits(ms, read_float_weights(path), TOKENS)
    ours, model, cfg = _prefill_then_decode(path, TOKENS, 4)
    assert cfg.moe is not None and cfg.moe.n_expert == 8
    assert (cfg.moe.shared_ff > 0) == (arch == "qwen2moe")
    assert _rel_err(ours, ref) < 2e-4


@pytest.mark.parametrize("arch,kquant", [("qwen3moe", False), ("qwen2moe", False), ("qwen3moe", True)])
def test_quantized_moe_matches_float_reference(tmp_path, arch, kquant):
    ms = moe_spec(arch, kquant=kquant)
    path = write_moe_model(tmp_path / f"{arch}.gguf", ms)
    W = read_float_weights(path)
    ref = reference_moe_logits(ms, W, TOKENS)
    ours, _, _ = _prefill_then_decode(path, TOKENS, 4)
    # 8-bit activations in every matmul; a near-tie in the router may pick another expert
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.8
    assert np.median(np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref - ref.mean(-1, keepdims=True),
                                                                           axis=-1)) < 0.08


@pytest.mark.parametrize("arch", ARCHS)
def test_native_decode_is_the_module_path(tmp_path, arch):
    path = write_moe_model(tmp_path / f"{arch}.gguf", moe_spec(arch, kquant=arch == "qwen3moe"))
    model, _ = load_model(path)
    model.setup_cache(64, torch.float32)
    assert native_decode.why_not(model.model) is None

    def steps():
        model.setup_cache(64, torch.float32)
        model(torch.tensor(TOKENS[:3]), 0)
        return [model(torch.tensor([t]), 3 + i) for i, t in enumerate(TOKENS[3:])]

    plan = steps()
    native_decode.set_enabled(False)
    try:
        modules = steps()
    finally:
        native_decode.set_enabled(True)
    for a, b in zip(plan, modules):
        assert torch.equal(a, b)


def test_expert_slices_hold_no_float_copy(tmp_path):
    """Every expert byte stays in its GGUF blocks (x4-packed): the buffers are uint8 and
    hold exactly the file's expert bytes at tp = 1."""
    path = write_moe_model(tmp_path / "m.gguf", moe_spec("qwen3moe", kquant=True))
    model, _ = load_model(path)
    from tp_numa.gguf_loader import open_gguf

    f = open_gguf(path)
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        assert all(t.dtype == torch.uint8 for t in (ex.gate, ex.up, ex.down))
        assert ex.layouts == [1, 1, 1]
        want = sum(f.info(f"blk.{i}.ffn_{n}_exps.weight").n_bytes for n in ("gate", "up", "down"))
        assert int(ex.slice_bytes().sum()) == want


# ---------------------------------------------------------------- tensor parallel

TP_SPECS = {
    "qwen3moe": lambda: moe_spec("qwen3moe"),
    "qwen2moe": lambda: moe_spec("qwen2moe"),
    "mixtral": lambda: moe_spec("llama", merged_gate_up=True),
    "qwen3moe_kquant": lambda: moe_spec("qwen3moe", kquant=True),
}


@pytest.fixture(scope="module")
def moe_tp_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_tp")
    models = {name: write_moe_model(d / f"{name}.gguf", spec()) for name, spec in TP_SPECS.items()}
    results = {}
    for n in (1, 2, 3, 4):
        names = list(TP_SPECS) if n < 4 else ["qwen3moe", "mixtral"]   # 3 shared blocks: not 4 ranks
        outs = _run([(models[a], d / f"{a}_tp{n}.npz") for a in names], n)
        results[n] = dict(zip(names, outs))
    outs = _run([(models[a], d / f"{a}_mod.npz") for a in TP_SPECS], 2, native_decode=False)
    results["2-modules"] = dict(zip(TP_SPECS, outs))
    return results


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(TP_SPECS))
def test_moe_tp_matches_single_rank(moe_tp_results, name):
    base = moe_tp_results[1][name]
    for n in (2, 3, 4):
        if name not in moe_tp_results[n]:
            continue
        got = moe_tp_results[n][name]
        for key in ("logits", "step_logits", "greedy"):
            assert np.array_equal(got[key], base[key]), f"tp={n} {key}"
        assert got["weight_bytes"].max() < base["weight_bytes"][0]
    plan, modules = moe_tp_results[2][name], moe_tp_results["2-modules"][name]
    assert plan["native_decode"].all()
    assert np.array_equal(plan["step_logits"], modules["step_logits"])


# ---------------------------------------------------------------- plan and balance report


@pytest.mark.parametrize("arch", ["qwen2moe", "llama"])
def test_plan_expert_bytes_are_the_loaded_slices(tmp_path, arch):
    """``tp-numa plan`` (header only) gives every rank the expert and shared-expert bytes
    that loading that rank's share really holds."""
    from tp_numa.distributed.parallel_state import ParallelState
    from tp_numa.offload import load_placement, plan_for_file

    path = write_moe_model(tmp_path / "m.gguf", moe_spec(arch, merged_gate_up=arch == "llama"))
    for tp in (2, 3):
        plan = plan_for_file(path, load_placement("all-cpu", check=False, n_gpus=0), tp, n_gpus=0)
        by_name = {e.module: e for e in plan.entries}
        for r in range(tp):
            model, _ = load_model(path, ParallelState(rank=r, world_size=tp))
            for i, layer in enumerate(model.model.layers):
                assert by_name[f"model.layers.{i}.mlp.experts"].nbytes[r] == int(layer.mlp.experts.slice_bytes().sum())
                if layer.mlp.shared_expert is not None:
                    held = layer.mlp.shared_expert.down_proj.weight.numel()
                    assert by_name[f"model.layers.{i}.mlp.shared_expert.down_proj"].nbytes[r] == held


def test_expert_balance_report(tmp_path):
    from tp_numa.layers import expert_balance

    path = write_moe_model(tmp_path / "m.gguf", moe_spec("qwen3moe"))
    model, _ = load_model(path)
    model.setup_cache(64, torch.float32)
    expert_balance.set_counting(model, True)
    model(torch.tensor(TOKENS[:4]), 0)
    for i, t in enumerate(TOKENS[4:]):        # decode steps through the native plan count too
        model(torch.tensor([t]), 4 + i)
    for m in expert_balance.moe_layers(model):
        assert int(m.expert_counts.sum()) == len(TOKENS) * 3
    line = expert_balance.report(model)
    assert f"{len(TOKENS)} tokens routed" in line and "balance 1.000" in line
    expert_balance.set_counting(model, False)
    model(torch.tensor([1]), 20)
    assert all(int(m.expert_counts.sum()) == 0 for m in expert_balance.moe_layers(model))


@pytest.mark.mpi
def test_olmoe_tp_matches_single_rank(tmp_path):
    """olmoe's q/k norm over all heads under tp = 2: the sum of squares is all-reduced, so
    each rank normalises its head with the whole vector's RMS (llama.cpp's own fixture)."""
    import os

    fixture = os.path.join(os.path.dirname(__file__), "data", "arch_fixtures", "olmoe.gguf")
    if not os.path.exists(fixture):
        pytest.skip("tests/data/arch_fixtures/olmoe.gguf not present")
    prompt = [[3, 17, 99, 5, 64, 127, 0, 42]]
    one = _run([(fixture, tmp_path / "o1.npz")], 1, prompts=prompt)[0]
    two = _run([(fixture, tmp_path / "o2.npz")], 2, prompts=prompt)[0]
    for key in ("logits", "step_logits", "greedy"):
        assert np.array_equal(one[key], two[key]), key
