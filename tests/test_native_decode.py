"""The native decode step (tp_numa.layers.native_decode, csrc/decode/decode_plan.cpp) against
the nn.Module path it replaces: bitwise the same logits, on synthetic models of every
architecture (x4 and row-layout weights, a two-run qkv with an F16 v, biases, q/k norms,
sandwich norms, sliding windows whose ring wraps) and on the two shipped models; rebuilt
when the caches are reallocated; errors for bad use. Under tensor parallelism the same
identity is checked by tests/test_tp.py (np = 2, shm all-reduce from C++)."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from synthetic_gguf import Spec, gemma3_spec, write_model
from tp_numa.errors import TpNumaError
from tp_numa.layers import native_decode
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
    cache = torch.zeros(4, 1, 4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="2 \\(pre-norm\\) or 4 \\(sandwich\\) norms"):
        plan.add_layer([norm], [], [2, 1, 4], 0, True, 0.5, cache, cache, False)
    with pytest.raises(RuntimeError, match="layer norm weight must be a contiguous float32 CPU tensor \\[8\\]"):
        plan.add_layer([norm, torch.ones(7)], [], [2, 1, 4], 0, True, 0.5, cache, cache, False)
    with pytest.raises(RuntimeError, match="KV cache must be a contiguous CPU tensor \\[slots, 1, 4\\]"):
        plan.add_layer([norm, norm], [], [2, 1, 4], 0, True, 0.5, torch.zeros(4, 2, 4), torch.zeros(4, 2, 4), False)
    with pytest.raises(RuntimeError, match="set_linear before add_layer"):
        plan.set_linear(0, [torch.zeros(16, 34, dtype=torch.uint8)], [8], [16], [0], None, True, False)
    plan.add_layer([norm, norm], [], [2, 1, 4], 0, True, 0.5, cache, cache, False)
    with pytest.raises(RuntimeError, match="qkv has 12 output rows, expected 16"):
        plan.set_linear(0, [torch.zeros(12, 34, dtype=torch.uint8)], [8], [12], [0], None, True, False)
    with pytest.raises(RuntimeError, match="reduces over ranks but the plan has no shm group"):
        plan.set_linear(1, [torch.zeros(8, 34, dtype=torch.uint8)], [8], [8], [0], None, True, True)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 CPU tensor \\[1, 8\\]"):
        plan.forward(torch.zeros(2, 8), 0, [torch.zeros(1, 2)], [torch.zeros(1, 2)])


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
