"""The native decode step (tp_numa.layers.native_decode, csrc/decode/decode_plan.cpp) against
the nn.Module path it replaces: bitwise the same logits, on synthetic models of every
architecture (x4 and row-layout weights, a two-run qkv with an F16 v, biases, q/k norms,
sandwich norms, sliding windows whose ring wraps) and on the two shipped models; rebuilt
when the caches are reallocated; errors for bad use. Batched decode (continuous batching:
M sequences' next tokens in one step, ``layers.batch.SeqBatch``): bitwise the module path
for M = 1..4 and bitwise each sequence decoded alone. Under tensor parallelism the same
identity is checked by tests/test_tp.py (np = 2, shm all-reduce from C++)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from synthetic_gguf import Spec, gemma3_spec, write_model
from synthetic_moe import moe_spec, write_moe_model
from tp_numa.errors import TpNumaError
from tp_numa.layers import native_decode
from tp_numa.layers.batch import SeqBatch, Span
from tp_numa.models import load_model

pytestmark = pytest.mark.skipif(not native_decode.enabled(), reason="native decode not built or switched off")

TOKENS = [5, 17, 3, 250, 42, 42, 7, 300, 1, 99, 128, 64, 9, 11, 200, 13]
SPECS = {
    "llama": lambda: Spec(arch="llama", seed=3),
    "qwen2": lambda: Spec(arch="qwen2", seed=1),
    "qwen3": lambda: Spec(arch="qwen3", seed=2, down_type=QT.Q8_0, n_heads=8, n_kv=4),
    "gemma3": lambda: gemma3_spec(seed=4, n_layers=6),                 # window 4: the rings wrap
    "llama_f32": lambda: Spec(arch="llama", seed=5, weight_type=QT.F32, embed_type=QT.F32, down_type=QT.F32,
                              v_type=QT.F32),
}


def _decode(model, tokens: list[int], prefill: int, native: bool, cache: str = "f16") -> torch.Tensor:
    """Prefill tokens[:prefill], then one token per step -> logits [len - prefill, vocab]."""
    native_decode.set_enabled(native)
    try:
        model.setup_cache(64, cache)
        ids = torch.tensor(tokens)
        model(ids[:prefill], 0)
        return torch.cat([model(ids[t:t + 1], t) for t in range(prefill, len(tokens))])
    finally:
        native_decode.set_enabled(True)


@pytest.mark.parametrize("arch", list(SPECS))
@pytest.mark.parametrize("cache", ["f16", "f32", "q8_0"])
def test_native_step_is_bitwise_the_module_path(tmp_path, arch, cache):
    model, _ = load_model(write_model(tmp_path / f"{arch}.gguf", SPECS[arch]()))
    modules = _decode(model, TOKENS, 3, native=False, cache=cache)
    assert native_decode.why_not(model.model) is None
    native = _decode(model, TOKENS, 3, native=True, cache=cache)
    assert native_decode.plan_for(model.model) is not None
    assert torch.equal(native, modules), (native - modules).abs().max()


def test_plan_covers_every_layer_and_weight_layout(tmp_path):
    # Q8_0 (x4), Q4_0 down (x4), F16 v: qkv runs [q|k in x4, v in rows]
    model, _ = load_model(write_model(tmp_path / "q.gguf", SPECS["qwen2"]()))
    model.setup_cache(32)
    nd = native_decode.plan_for(model.model)
    assert nd.plan.n_layers() == len(model.model.layers)
    qkv = model.model.layers[0].self_attn.qkv_proj
    kinds = {type(qkv.__dict__[n + "_method"]).__name__ for n in qkv._runs}
    assert kinds == {"X4LinearMethod", "GGUFLinearMethod"}


def test_plan_is_rebuilt_after_setup_cache(tmp_path):
    model, _ = load_model(write_model(tmp_path / "l.gguf", SPECS["llama"]()))
    first = _decode(model, TOKENS, 4, native=True)
    plan = native_decode.plan_for(model.model)
    # new caches: a stale plan would write into the old ones and attend to garbage
    again = _decode(model, TOKENS, 4, native=True)
    assert native_decode.plan_for(model.model) is not plan
    assert torch.equal(first, again)


def test_positions_past_the_context_raise(tmp_path):
    model, _ = load_model(write_model(tmp_path / "l.gguf", SPECS["llama"]()))
    model.setup_cache(8)
    with torch.inference_mode():
        model(torch.tensor(TOKENS[:8]), 0)
        assert native_decode.plan_for(model.model) is not None
        with pytest.raises(TpNumaError, match=r"positions 8..8 exceed the context size 8"):
            model(torch.tensor([1]), 8)


def test_why_not_names_the_reason(tmp_path):
    model, _ = load_model(write_model(tmp_path / "l.gguf", SPECS["llama"]()))
    assert "no CPU KV cache" in native_decode.why_not(model.model)
    model.setup_cache(8)
    assert native_decode.why_not(model.model) is None
    native_decode.set_enabled(False)
    try:
        assert "switched off" in native_decode.why_not(model.model)
        assert native_decode.plan_for(model.model) is None
    finally:
        native_decode.set_enabled(True)
    with pytest.raises(TpNumaError, match="no CPU KV cache"):
        model.setup_cache(8)
        model.model.layers[1].self_attn.attn.k_cache = None
        native_decode.build_plan(model.model)


def test_decode_plan_rejects_bad_tensors():
    Plan = torch.classes.tp_numa.DecodePlan
    plan = Plan(8, 1e-6, -1)
    norm = torch.ones(8)
    cache = torch.zeros(3, 4, 1, 4, dtype=torch.float16)     # 3 sequences of 4 slots, 1 KV head of 4
    with pytest.raises(RuntimeError, match="2 \\(pre-norm\\) or 4 \\(sandwich\\) norms"):
        plan.add_layer([norm], [], [2, 1, 4], 0, True, 0.5, cache, cache, False)
    with pytest.raises(RuntimeError, match="layer norm weight must be a contiguous float32 CPU tensor \\[8\\]"):
        plan.add_layer([norm, torch.ones(7)], [], [2, 1, 4], 0, True, 0.5, cache, cache, False)
    with pytest.raises(RuntimeError, match="KV cache must be a contiguous CPU tensor \\[n_seqs, slots, 1, 4\\]"):
        plan.add_layer([norm, norm], [], [2, 1, 4], 0, True, 0.5, torch.zeros(3, 4, 2, 4), torch.zeros(3, 4, 2, 4),
                       False)
    with pytest.raises(RuntimeError, match="KV cache must be a contiguous CPU tensor \\[n_seqs, slots, 1, 4\\]"):
        plan.add_layer([norm, norm], [], [2, 1, 4], 0, True, 0.5, cache[0], cache[0], False)   # 3-D
    with pytest.raises(RuntimeError, match="set_linear before add_layer"):
        plan.set_linear(0, [torch.zeros(16, 34, dtype=torch.uint8)], [8], [16], [0], None, True, False)
    assert plan.n_seqs() == 0
    plan.add_layer([norm, norm], [], [2, 1, 4], 0, True, 0.5, cache, cache, False)
    assert plan.n_seqs() == 3
    with pytest.raises(RuntimeError, match="layer 1's KV cache holds 2 sequences, the layers before it 3"):
        other = torch.zeros(2, 4, 1, 4, dtype=torch.float16)
        plan.add_layer([norm, norm], [], [2, 1, 4], 0, True, 0.5, other, other, False)
    with pytest.raises(RuntimeError, match="qkv has 12 output rows, expected 16"):
        plan.set_linear(0, [torch.zeros(12, 34, dtype=torch.uint8)], [8], [12], [0], None, True, False)
    with pytest.raises(RuntimeError, match="reduces over ranks but the plan has no shm group"):
        plan.set_linear(1, [torch.zeros(8, 34, dtype=torch.uint8)], [8], [8], [0], None, True, True)
    tab = [torch.zeros(2, 2)]
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 CPU tensor \\[M, 8\\] with M >= 1"):
        plan.forward(torch.zeros(2, 7), [0, 1], [0, 1], tab, tab)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 CPU tensor"):
        plan.forward(torch.zeros(0, 8), [], [], [torch.zeros(0, 2)], [torch.zeros(0, 2)])
    with pytest.raises(RuntimeError, match="2 rows need 2 positions and sequences, got 2 and 1"):
        plan.forward(torch.zeros(2, 8), [0, 1], [0], tab, tab)
    with pytest.raises(RuntimeError, match="row 1: negative position -1"):
        plan.forward(torch.zeros(2, 8), [0, -1], [0, 1], tab, tab)
    with pytest.raises(RuntimeError, match="row 1: KV sequence 3 does not exist \\(the caches hold 3\\)"):
        plan.forward(torch.zeros(2, 8), [0, 1], [0, 3], tab, tab)
    with pytest.raises(RuntimeError, match="rows 0 and 1 are both of KV sequence 2"):
        plan.forward(torch.zeros(2, 8), [0, 1], [2, 2], tab, tab)
    with pytest.raises(RuntimeError, match="rope 0: cos/sin must be \\[2, rope_dim/2\\]"):
        plan.forward(torch.zeros(2, 8), [0, 1], [0, 1], [torch.zeros(1, 2)], [torch.zeros(1, 2)])


# ---- batched decode: M sequences' next tokens in one step ----

N_SEQS, CTX = 4, 32
PROMPT_LENS = [5, 9, 3, 12]          # sequence s's prompt; gemma3's window-4 rings wrap in prefill or decode
# the sequences that step together, in span order: M = 1..4, rows not in sequence order
SCHEDULE = [[0], [1, 0], [2, 3, 0], [3, 1, 2, 0], [2], [0, 2, 1, 3], [1, 3], [3, 2, 1, 0], [2, 0, 3], [2, 1]]
BATCH_SPECS = {
    **SPECS,
    "qwen3moe": lambda: moe_spec("qwen3moe", kquant=True),     # Q4_K / Q6_K experts, no shared expert
    "qwen2moe": lambda: moe_spec("qwen2moe"),                  # shared expert with its sigmoid gate
}


def _token(seq: int, pos: int) -> int:
    """The (teacher-forced) token of sequence seq at position pos: every run feeds the same."""
    return TOKENS[(3 * seq + pos) % len(TOKENS)]


def _load(tmp_path, arch: str):
    spec = BATCH_SPECS[arch]()
    path = tmp_path / f"{arch}.gguf"
    model, _ = load_model(write_moe_model(path, spec) if arch.endswith("moe") else write_model(path, spec))
    return model


def _decode_batched(model, native: bool, cache: str) -> dict[tuple[int, int], torch.Tensor]:
    """Prefill every sequence's prompt (one span per forward, into its own KV sequence),
    then the SCHEDULE's steps, each a SeqBatch of one-token spans -> {(seq, pos): logits
    [vocab]} (empty on ranks other than 0); with native, the steps ran the plan."""
    native_decode.set_enabled(native)
    try:
        model.setup_cache(CTX, cache, n_seqs=N_SEQS)
        pos = list(PROMPT_LENS)
        for s, n in enumerate(PROMPT_LENS):
            model(torch.tensor([_token(s, p) for p in range(n)]), SeqBatch.one(0, n, seq=s))
        out = {}
        for seqs in SCHEDULE:
            batch = SeqBatch([Span(s, pos[s], 1) for s in seqs])
            logits = model(torch.tensor([_token(s, pos[s]) for s in seqs]), batch)
            for row, s in enumerate(seqs):
                if logits is not None:
                    out[(s, pos[s])] = logits[row]
                pos[s] += 1
        if native and native_decode.plan_for(model.model) is None:
            raise AssertionError(f"no native decode plan: {native_decode.why_not(model.model)}")
        return out
    finally:
        native_decode.set_enabled(True)


def _decode_alone(model, seq: int, steps: int, cache: str) -> dict[tuple[int, int], torch.Tensor]:
    """Sequence seq's prompt and `steps` decode steps on its own (a one-sequence cache,
    int positions: the ``tp-numa generate`` path) -> {(seq, pos): logits [vocab]}."""
    model.setup_cache(CTX, cache)
    n = PROMPT_LENS[seq]
    model(torch.tensor([_token(seq, p) for p in range(n)]), 0)
    return {(seq, p): model(torch.tensor([_token(seq, p)]), p)[0] for p in range(n, n + steps)}


@pytest.mark.parametrize("arch", list(BATCH_SPECS))
@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_batched_step_is_bitwise_the_module_path_and_each_sequence_alone(tmp_path, arch, cache):
    model = _load(tmp_path, arch)
    modules = _decode_batched(model, native=False, cache=cache)
    native = _decode_batched(model, native=True, cache=cache)
    assert native.keys() == modules.keys()
    for key in modules:
        assert torch.equal(native[key], modules[key]), ("plan vs module path", key,
                                                        (native[key] - modules[key]).abs().max())
    # batch invariance: a row's result does not depend on the other rows of its step
    # (row-independent matmul kernels, norms and RoPE; attention per sequence)
    steps = [sum(s in seqs for seqs in SCHEDULE) for s in range(N_SEQS)]
    for s in range(N_SEQS):
        alone = _decode_alone(model, s, steps[s], cache)
        for key, want in alone.items():
            assert torch.equal(native[key], want), ("batched vs alone", key, (native[key] - want).abs().max())


def test_batched_step_checks_every_span(tmp_path):
    model = _load(tmp_path, "llama")
    model.setup_cache(8, n_seqs=2)
    with torch.inference_mode():
        model(torch.tensor(TOKENS[:8]), SeqBatch.one(0, 8, seq=0))
        model(torch.tensor(TOKENS[:3]), SeqBatch.one(0, 3, seq=1))
        assert native_decode.plan_for(model.model) is not None
        with pytest.raises(TpNumaError, match=r"positions 8..8 exceed the context size 8"):
            model(torch.tensor([1, 2]), SeqBatch([Span(1, 3, 1), Span(0, 8, 1)]))
        with pytest.raises(TpNumaError, match=r"KV sequence 2 does not exist \(the cache holds 2\)"):
            model(torch.tensor([1, 2]), SeqBatch([Span(1, 3, 1), Span(2, 0, 1)]))
        nd = native_decode.plan_for(model.model)
        with pytest.raises(ValueError, match="one token per span"):
            nd.forward(torch.zeros(2, model.config.d_model), SeqBatch([Span(0, 3, 2)]), [])


TP_ARCHS = ["qwen2", "gemma3", "qwen3moe"]     # split heads, a replicated KV head + windows, split experts


@pytest.mark.mpi
def test_batched_step_under_tp_is_the_module_path_and_tp1(tmp_path):
    """np = 2 (shm all-reduce of [M, d] from C++): the batched plan's logits are bitwise the
    module path's at np = 2 and the plan's at np = 1 (this process)."""
    import subprocess
    import sys

    from mpi_util import mpirun_or_skip

    mpirun = mpirun_or_skip()
    models = {}
    for arch in TP_ARCHS:
        spec, path = BATCH_SPECS[arch](), tmp_path / f"{arch}.gguf"
        models[arch] = write_moe_model(path, spec) if arch.endswith("moe") else write_model(path, spec)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    cmd = [mpirun, "--oversubscribe", "-np", "2", sys.executable, __file__, str(tmp_path)] + TP_ARCHS
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    for arch in TP_ARCHS:
        model, _ = load_model(models[arch])
        one = _decode_batched(model, native=True, cache="f16")
        got = torch.load(tmp_path / f"{arch}_tp2.pt")
        assert got["native"].keys() == one.keys()
        for key in one:
            assert torch.equal(got["native"][key], got["modules"][key]), (arch, key, "np=2 plan vs modules")
            assert torch.equal(got["native"][key], one[key]), (arch, key, "np=2 vs np=1")


def _tp_worker(out_dir: str, archs: list[str]) -> None:
    """Under mpirun: every rank runs the batched schedule with and without the plan; rank 0
    saves {native, modules} logits to OUT_DIR/ARCH_tp2.pt."""
    from tp_numa.distributed import parallel_state

    torch.set_num_threads(1)
    state = parallel_state.init()
    for arch in archs:
        model, _ = load_model(Path(out_dir) / f"{arch}.gguf", state)
        native = _decode_batched(model, native=True, cache="f16")
        modules = _decode_batched(model, native=False, cache="f16")
        if state.is_main:
            torch.save({"native": native, "modules": modules}, Path(out_dir) / f"{arch}_tp2.pt")


if __name__ == "__main__":
    import sys

    _tp_worker(sys.argv[1], sys.argv[2:])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["qwen_path", "gemma_path"])
def test_shipped_models_native_step_is_bitwise(request, which):
    model, _ = load_model(request.getfixturevalue(which))
    tokens = [2, 785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13, 576]
    modules = _decode(model, tokens, 4, native=False)
    native = _decode(model, tokens, 4, native=True)
    assert native_decode.plan_for(model.model) is not None
    assert torch.equal(native, modules), (native - modules).abs().max()


def test_plan_follows_an_attention_core_replaced_after_decoding(tmp_path):
    """offload_attention (device "cpu" standing in for a GPU) after the plan was built: the
    next decode must not run the stale plan (the new cores make the model ineligible)."""
    from tp_numa import offload
    from tp_numa.layers.attention import Attention

    model, _ = load_model(write_model(tmp_path / "l.gguf", SPECS["llama"]()))
    before = _decode(model, TOKENS, 4, native=True)
    assert native_decode.plan_for(model.model) is not None
    offload.offload_attention(model, {n: "cpu" for n, m in model.named_modules() if isinstance(m, Attention)})
    after = _decode(model, TOKENS, 4, native=True)
    assert native_decode.plan_for(model.model) is None
    assert "not the native CPU attention" in native_decode.why_not(model.model)
    assert torch.allclose(after, before, rtol=1e-3, atol=1e-3)
