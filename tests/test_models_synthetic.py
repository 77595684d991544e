"""llama / qwen2 / qwen3 / gemma3 on small synthetic GGUF files vs a plain float64 model.

Two weight settings per architecture:
- all F32: the quantized-matmul op multiplies exactly in float, so tp_numa must match the
  float64 reference to float32 rounding (checks the architecture wiring: RoPE layout,
  norms, GQA, windows, biases, tied output);
- quantized (Q8_0 / Q4_0 / F16): the op quantizes activations to 8-bit blocks, so the
  bound is looser (checks the quantized plumbing and the slicing of block rows).
The reference reads the file with gguf.GGUFReader + gguf.quants.dequantize.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from synthetic_gguf import Spec, gemma3_spec, read_float_weights, reference_logits, write_model
from tp_numa.models import load_model

TOKENS = [5, 17, 3, 250, 42, 42, 7, 300, 1, 99, 128, 64]

SPECS = {
    "llama": lambda **kw: Spec(arch="llama", **kw),
    "qwen2": lambda **kw: Spec(arch="qwen2", **kw),
    "qwen3": lambda **kw: Spec(arch="qwen3", **kw),
    "gemma3": gemma3_spec,
}
F32_TYPES = dict(weight_type=QT.F32, embed_type=QT.F32, down_type=QT.F32, v_type=QT.F32)


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """||ours - ref|| / ||ref - mean(ref)|| per row, worst row."""
    num = np.linalg.norm(ours - ref, axis=-1)
    den = np.linalg.norm(ref - ref.mean(-1, keepdims=True), axis=-1)
    return float((num / den).max())


def _run(path, tokens, cache_dtype, prefill_split: int | None = None) -> np.ndarray:
    model, _ = load_model(path)
    model.setup_cache(64, cache_dtype)
    ids = torch.tensor(tokens)
    if prefill_split is None:
        return model(ids, 0).numpy()
    # prefill part of it, then one token at a time: same logits as one pass
    out = [model(ids[:prefill_split], 0)]
    for t in range(prefill_split, len(tokens)):
        out.append(model(ids[t:t + 1], t))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("arch", list(SPECS))
def test_f32_matches_float_reference(tmp_path, arch):
    spec = SPECS[arch](**F32_TYPES)
    path = write_model(tmp_path / f"{arch}.gguf", spec)
    ref = reference_logits(spec, read_float_weights(path), TOKENS)
    ours = _run(path, TOKENS, torch.float32)
    assert ours.shape == (len(TOKENS), spec.vocab)
    assert _rel_err(ours, ref) < 2e-4
    # incremental decode with the KV cache gives the same logits
    ours_inc = _run(path, TOKENS, torch.float32, prefill_split=5)
    assert _rel_err(ours_inc, ref) < 2e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_quantized_matches_float_reference(tmp_path, arch):
    spec = SPECS[arch]()
    path = write_model(tmp_path / f"{arch}_q.gguf", spec)
    ref = reference_logits(spec, read_float_weights(path), TOKENS)
    ours = _run(path, TOKENS, torch.float16, prefill_split=7)
    # 8-bit activation blocks in every matmul + fp16 KV cache: a few % of the logit spread
    assert _rel_err(ours, ref) < 0.05
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_last_only_and_module_names(tmp_path):
    spec = SPECS["qwen2"]()
    path = write_model(tmp_path / "q.gguf", spec)
    model, cfg = load_model(path)
    names = dict(model.named_modules())
    for n in ("model.embed_tokens", "model.layers.1.input_layernorm", "model.layers.1.self_attn.qkv_proj",
              "model.layers.1.self_attn.attn", "model.layers.1.self_attn.o_proj",
              "model.layers.1.post_attention_layernorm", "model.layers.1.mlp.gate_up_proj",
              "model.layers.1.mlp.down_proj", "model.norm", "lm_head"):
        assert n in names, n
    model.setup_cache(32, torch.float32)
    full = model(torch.tensor(TOKENS), 0)
    model.setup_cache(32, torch.float32)
    last = model(torch.tensor(TOKENS), 0, last_only=True)
    assert last.shape == (1, spec.vocab) and last.dtype == torch.float32
    torch.testing.assert_close(last[0], full[-1])
    assert cfg.qkv_bias and not cfg.qk_norm


def test_gemma3_config_pattern(tmp_path):
    spec = gemma3_spec(n_layers=12)
    path = write_model(tmp_path / "g.gguf", spec)
    from tp_numa.config import ModelConfig
    from tp_numa.gguf_loader import open_gguf

    cfg = ModelConfig.from_gguf(open_gguf(path))
    assert [i for i, s in enumerate(cfg.layer_sliding) if not s] == [5, 11]
    assert cfg.window_for(0) == spec.window and cfg.window_for(5) is None
    assert cfg.rope_base_for(0) == 10000.0 and cfg.rope_base_for(5) == spec.rope_base
    assert cfg.tied_output and cfg.ffn_act == "gelu_tanh" and cfg.embed_scale == pytest.approx(128 ** 0.5)
