"""Every metadata value ModelConfig.from_gguf reads is validated, and read as llama.cpp reads it.

Each bad value gets a tiny synthetic GGUF (tests/synthetic_gguf.py, ``meta`` overrides)
and must fail in ``ModelConfig.from_gguf`` with a ModelFormatError (UnsupportedError for
what llama.cpp accepts but tp_numa does not implement) naming the file and the key; a few
go through the real CLI (one line on stderr, non-zero exit, no traceback). The behaviour
tests check what llama.cpp does with the values: a RoPE scaling factor of 0 means no
scaling, type 'none' never scales, final-logit soft-capping only where the architecture's
llama.cpp graph applies it, and tensors the model would not use are refused by name.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from synthetic_gguf import Spec, gemma3_spec, write_model, write_tiny_llama
from test_errors_cli import assert_one_line_error, generate
from tp_numa.config import ModelConfig
from tp_numa.errors import ModelFormatError, UnsupportedError
from tp_numa.gguf_loader import open_gguf, read_header
from tp_numa.models import load_model

TOKENS = [5, 17, 3, 250, 42, 42, 7, 300, 1, 99]


def _spec(arch: str, **kw) -> Spec:
    if arch == "gemma3":
        return gemma3_spec(**kw)
    return Spec(**({"arch": arch, "n_layers": 1} | kw))


def _cfg(path) -> ModelConfig:
    return ModelConfig.from_gguf(read_header(path))


def _fails(tmp_path, arch: str, exc=ModelFormatError, **kw) -> str:
    """from_gguf of a file built from ``_spec(arch, **kw)`` raises ``exc``; its message."""
    path = write_model(tmp_path / "bad.gguf", _spec(arch, **kw))
    with pytest.raises(exc) as e:
        _cfg(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def _logits(path) -> np.ndarray:
    model, _ = load_model(path)
    model.setup_cache(32, torch.float32)
    return model(torch.tensor(TOKENS), 0).numpy()


# ---- bad values: (arch, key, value, words of the reason) ------------------------------------

BAD = [
    ("llama", "block_count", 0, "at least 1"),
    ("llama", "block_count", -2, "at least 1"),
    ("llama", "block_count", 2.5, "not an integer"),
    ("llama", "embedding_length", 0, "at least 1"),
    ("llama", "attention.head_count", 0, "at least 1"),          # was a ZeroDivisionError
    ("llama", "attention.head_count", "six", "not an integer"),
    ("llama", "attention.head_count_kv", 0, "at least 1"),
    ("qwen2", "feed_forward_length", 0, "at least 1"),
    ("qwen3", "attention.key_length", 0, "at least 1"),
    ("qwen3", "attention.value_length", -32, "at least 1"),
    ("llama", "context_length", 0, "at least 1"),
    ("llama", "rope.freq_base", 0.0, "> 0"),
    ("llama", "rope.freq_base", -10000.0, "> 0"),
    ("qwen2", "rope.freq_base", math.nan, "not finite"),
    ("qwen2", "rope.freq_base", math.inf, "not finite"),
    ("llama", "attention.layer_norm_rms_epsilon", 0.0, "> 0"),
    ("llama", "attention.layer_norm_rms_epsilon", -1e-5, "> 0"),
    ("qwen3", "attention.layer_norm_rms_epsilon", math.nan, "not finite"),
    ("gemma3", "attention.layer_norm_rms_epsilon", 1.0, "< 1"),
    ("gemma3", "attention.layer_norm_rms_epsilon", 1e6, "< 1"),
    ("llama", "rope.scaling.factor", -2.0, ">= 0"),
    ("llama", "rope.scaling.factor", math.nan, "not finite"),
    ("gemma3", "rope.scaling.factor", math.inf, "not finite"),
    ("llama", "rope.scale_linear", -1.0, ">= 0"),
    ("llama", "rope.scaling.type", "quadratic", "not a RoPE scaling type"),
    ("gemma3", "attention.sliding_window", -1, "at least 0"),
    ("gemma3", "attention.sliding_window_pattern", [1, 1, 0], "3 entries for 6 layers"),
    ("gemma3", "attention.sliding_window_pattern", -6, "at least 0"),
    ("gemma3", "rope.freq_base_swa", 0.0, "> 0"),
    ("gemma3", "final_logit_softcapping", -30.0, ">= 0"),
    ("gemma3", "final_logit_softcapping", math.nan, "not finite"),
]


@pytest.mark.parametrize("arch, key, value, why", BAD, ids=[f"{a}-{k}={v!r}" for a, k, v, _ in BAD])
def test_bad_value(tmp_path, arch, key, value, why):
    msg = _fails(tmp_path, arch, meta={key: value})
    assert f"'{arch}.{key}'" in msg and why in msg, msg
    if not isinstance(value, float):
        assert f"= {value!r}" in msg, msg


@pytest.mark.parametrize("arch, key, value, needles", [
    # no key_length: the head size is embedding_length / head_count, which must divide
    ("llama", "embedding_length", 130, ["'llama.embedding_length' = 130", "'llama.attention.head_count' = 6"]),
    ("llama", "attention.head_count_kv", 4, ["'llama.attention.head_count' = 6", "head_count_kv' = 4"]),
    ("qwen3", "attention.value_length", 64, ["'qwen3.attention.value_length' = 64", "key_length' = 32"]),
    ("gemma3", "rope.dimension_count", 48, ["'gemma3.rope.dimension_count' = 48", "at most", "key_length' = 32"]),
    ("gemma3", "rope.dimension_count", 31, ["'gemma3.rope.dimension_count' = 31", "even"]),
    # llama.cpp: llama throws "invalid n_rot", the qwen graphs assert n_rot == head dim
    ("llama", "rope.dimension_count", 16, ["'llama.rope.dimension_count' = 16", "must equal", "key_length' = 32"]),
    ("qwen2", "rope.dimension_count", 16, ["'qwen2.rope.dimension_count' = 16", "must equal"]),
])
def test_inconsistent_values(tmp_path, arch, key, value, needles):
    meta = {key: value}
    if key == "embedding_length":
        meta.update({"attention.key_length": None, "attention.value_length": None})
    msg = _fails(tmp_path, arch, meta=meta)
    for n in needles:
        assert n in msg, msg


def test_per_layer_arrays(tmp_path):
    """An array with one value per layer (llama.cpp's get_key_or_arr) is fine when the
    layers agree; per-layer shapes are not supported."""
    path = write_model(tmp_path / "same.gguf", _spec("llama", n_layers=2, meta={"attention.head_count_kv": [2, 2]}))
    assert _cfg(path).n_kv_heads == 2
    msg = _fails(tmp_path, "llama", UnsupportedError, n_layers=2, meta={"attention.head_count_kv": [2, 1]})
    assert "'llama.attention.head_count_kv'" in msg and "per-layer" in msg


def test_missing_required_key(tmp_path):
    msg = _fails(tmp_path, "qwen2", meta={"attention.layer_norm_rms_epsilon": None})
    assert "'qwen2.attention.layer_norm_rms_epsilon' is missing" in msg


def test_yarn_is_refused(tmp_path):
    msg = _fails(tmp_path, "qwen2", UnsupportedError, meta={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})
    assert "'qwen2.rope.scaling.type'" in msg and "yarn" in msg


def test_empty_vocabulary(tmp_path):
    msg = _fails(tmp_path, "llama", vocab=0, weight_type=QT.F32, embed_type=QT.F32)
    assert "'token_embd.weight'" in msg and "[0, 128]" in msg


def test_bad_alignment(tmp_path):
    import gguf

    path = tmp_path / "align.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", 0)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="'general.alignment' = 0 is not a power of 2"):
        open_gguf(path)


# ---- tensor shapes against the metadata ---------------------------------------------------

@pytest.mark.parametrize("arch, meta, tensor, shape", [
    # the token embedding's width is not embedding_length (key_length keeps the heads valid)
    ("llama", {"embedding_length": 64}, "token_embd.weight", "[301, 64]"),
    ("qwen2", {"feed_forward_length": 128}, "blk.0.ffn_gate.weight", "[128, 128]"),
    ("qwen3", {"attention.head_count_kv": 1}, "blk.0.attn_k.weight", "[32, 128]"),
    ("gemma3", {"attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16},
     "blk.0.attn_q.weight", "[64, 128]"),
])
def test_tensor_shape_mismatch(tmp_path, arch, meta, tensor, shape):
    msg = _fails(tmp_path, arch, meta=meta)
    assert f"tensor '{tensor}'" in msg and f"gives {shape}" in msg, msg


def test_rope_freqs_length(tmp_path):
    msg = _fails(tmp_path, "llama", tensors={"rope_freqs.weight": np.ones(8)})
    assert "'rope_freqs.weight'" in msg and "[16]" in msg and "rope.dimension_count" in msg


# ---- tensors llama.cpp accepts but tp_numa would not use: refused by name -------------------

@pytest.mark.parametrize("arch, tensor, exc", [
    ("qwen3", "output.bias", ModelFormatError),                  # applied for qwen2 only (output_b)
    ("qwen2", "blk.0.attn_output.bias", ModelFormatError),       # applied for llama only (wo_b)
    ("qwen3", "blk.0.attn_qkv.weight", UnsupportedError),        # fused q/k/v
    ("gemma3", "blk.0.attn_q.scale", UnsupportedError),          # per-tensor weight scale
    ("llama", "blk.0.attn_q_norm.weight", ModelFormatError),     # llama.cpp refuses the file
    ("qwen2", "rope_freqs.weight", ModelFormatError),            # llama only
    ("llama", "output_norm.bias", ModelFormatError),
    ("qwen2", "blk.1.attn_norm.weight", ModelFormatError),       # beyond block_count
])
def test_unused_tensor_is_refused(tmp_path, arch, tensor, exc):
    shapes = {"output.bias": (301,), "blk.0.attn_qkv.weight": (320, 128), "rope_freqs.weight": (16,),
              "blk.0.attn_q_norm.weight": (32,), "blk.0.ffn_gate.bias": (160,)}
    arr = np.zeros(shapes.get(tensor, (128,)))
    msg = _fails(tmp_path, arch, exc, tensors={tensor: arr})
    assert f"tensor '{tensor}'" in msg, msg


def test_optional_biases_are_applied(tmp_path):
    """llama's attn_output / ffn biases and qwen2's output bias load and change the logits
    (tests/test_arch_fixtures.py checks the values against llama.cpp)."""
    import torch

    def logits(arch, tensors):
        model, _ = load_model(write_model(tmp_path / f"{arch}{len(tensors)}.gguf", _spec(arch, tensors=tensors)))
        model.setup_cache(8, torch.float32)
        return model(torch.tensor([1, 2, 3]), 0)

    llama = {"blk.0.attn_output.bias": np.full(128, 0.5), "blk.0.ffn_gate.bias": np.full(160, 0.5),
             "blk.0.ffn_up.bias": np.full(160, 0.5), "blk.0.ffn_down.bias": np.full(128, 0.5)}
    assert not torch.equal(logits("llama", llama), logits("llama", {}))
    assert not torch.equal(logits("qwen2", {"output.bias": np.full(301, 0.5)}), logits("qwen2", {}))


def test_optional_tensors_llama_cpp_ignores_are_accepted(tmp_path):
    """qwen3's reranker head is used by llama.cpp only for rank pooling, not to generate."""
    path = write_model(tmp_path / "rerank.gguf", _spec("qwen3", tensors={"cls_out.weight": np.zeros((2, 128))}))
    assert _cfg(path).qk_norm


def test_required_qk_norm(tmp_path):
    """qwen3 and gemma3 need attn_q_norm / attn_k_norm (llama.cpp: required tensors)."""
    path = write_model(tmp_path / "noqn.gguf", _spec("qwen3", drop=("blk.0.attn_q_norm.weight",)))
    with pytest.raises(ModelFormatError, match="'blk.0.attn_q_norm.weight' is missing"):
        load_model(path)


# ---- values read as llama.cpp reads them ---------------------------------------------------

def test_rope_scaling_factor_zero_is_no_scaling(tmp_path):
    """llama.cpp: rope_freq_scale = factor == 0 ? 1 : 1/factor (a factor 0 gave NaN logits)."""
    plain = write_model(tmp_path / "plain.gguf", _spec("llama"))
    zero = write_model(tmp_path / "zero.gguf", _spec("llama", meta={"rope.scaling.type": "linear",
                                                                    "rope.scaling.factor": 0.0}))
    assert _cfg(zero).rope_scale == 1.0
    ref, ours = _logits(plain), _logits(zero)
    assert np.isfinite(ours).all()
    assert np.array_equal(ours, ref)


def test_rope_scaling_type_none_and_defaults(tmp_path):
    def scale(**meta):
        return _cfg(write_model(tmp_path / "s.gguf", _spec("llama", meta=meta))).rope_scale

    assert scale() == 1.0
    assert scale(**{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}) == 4.0
    # the type defaults to linear, and the old key name is read when the new one is absent
    assert scale(**{"rope.scaling.factor": 4.0}) == 4.0
    assert scale(**{"rope.scale_linear": 2.0}) == 2.0
    # 'none' never scales, whatever the factor
    assert scale(**{"rope.scaling.type": "none", "rope.scaling.factor": 4.0}) == 1.0
    none = write_model(tmp_path / "none.gguf", _spec("llama", meta={"rope.scaling.type": "none",
                                                                    "rope.scaling.factor": 4.0}))
    lin = write_model(tmp_path / "lin.gguf", _spec("llama", meta={"rope.scaling.factor": 4.0}))
    plain = write_model(tmp_path / "plain.gguf", _spec("llama"))
    ref = _logits(plain)
    assert np.array_equal(_logits(none), ref)
    assert not np.allclose(_logits(lin), ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_softcapping_ignored_where_llama_cpp_ignores_it(tmp_path, arch):
    """llama, qwen2 and qwen3 never read final/attn_logit_softcapping in llama.cpp."""
    plain = write_model(tmp_path / "plain.gguf", _spec(arch))
    capped = write_model(tmp_path / "cap.gguf", _spec(arch, meta={"final_logit_softcapping": 0.5,
                                                                  "attn_logit_softcapping": 0.5}))
    cfg = _cfg(capped)
    assert cfg.final_logit_softcap is None and cfg.attn_logit_softcap is None
    assert np.array_equal(_logits(capped), _logits(plain))


def test_gemma3_final_softcapping_applied_attn_ignored(tmp_path):
    """gemma3 (llama.cpp): final_logit_softcapping read (default off) and applied to the
    logits as tanh(x / c) * c; attn_logit_softcapping is not read (gemma2 only)."""
    plain = write_model(tmp_path / "plain.gguf", _spec("gemma3"))
    ref = _logits(plain)
    c = float(np.abs(ref).max() / 4)
    capped = write_model(tmp_path / "cap.gguf", _spec("gemma3", meta={"final_logit_softcapping": c}))
    assert _cfg(capped).final_logit_softcap == pytest.approx(c)
    np.testing.assert_allclose(_logits(capped), np.tanh(ref / c) * c, rtol=1e-5, atol=1e-5 * c)
    attn = write_model(tmp_path / "attn.gguf", _spec("gemma3", meta={"attn_logit_softcapping": 0.5,
                                                                     "final_logit_softcapping": 0.0}))
    assert _cfg(attn).attn_logit_softcap is None and _cfg(attn).final_logit_softcap is None
    assert np.array_equal(_logits(attn), ref)


def test_gemma3_window_and_pattern(tmp_path):
    """llama.cpp gemma3: sliding layers only with a window > 0; the pattern may be an array
    or an integer n (every n-th layer global); the local RoPE base is rope.freq_base_swa."""
    def cfg(**meta):
        return _cfg(write_model(tmp_path / "g.gguf", _spec("gemma3", meta=meta)))

    assert cfg().layer_sliding == [True] * 5 + [False]
    assert cfg(**{"attention.sliding_window": 0}).layer_sliding == [False] * 6
    assert cfg(**{"attention.sliding_window_pattern": 3}).layer_sliding == [True, True, False] * 2
    pattern = [True, False, True, False, True, False]
    assert cfg(**{"attention.sliding_window_pattern": pattern}).layer_sliding == pattern
    assert cfg().rope_base_local == 10000.0
    assert cfg(**{"rope.freq_base_swa": 5000.0}).rope_base_local == 5000.0


# ---- through the CLI: one line, non-zero exit, no traceback ------------------------------------

@pytest.mark.parametrize("meta, tensors, needles", [
    ({"attention.head_count": 0}, None, ["'llama.attention.head_count' = 0"]),
    ({"attention.layer_norm_rms_epsilon": math.nan}, None, ["layer_norm_rms_epsilon", "not finite"]),
    ({"rope.scaling.factor": -1.0}, None, ["'llama.rope.scaling.factor' = -1.0"]),
    ({"embedding_length": 32, "attention.key_length": 32, "attention.value_length": 32}, None,
     ["tensor 'token_embd.weight'", "llama.embedding_length"]),
    (None, {"blk.0.attn_q.scale": np.zeros(1)}, ["tensor 'blk.0.attn_q.scale'", "not supported"]),
])
def test_cli_one_line(cli_env, tmp_path, meta, tensors, needles):
    f = write_tiny_llama(tmp_path / "bad.gguf", meta=meta, extra_tensors=tensors)
    assert_one_line_error(generate(cli_env, "-m", str(f), "-p", "hi"), str(f), *needles)
