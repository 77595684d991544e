"""Validated reads of the GGUF metadata and tensor shapes behind ``ModelConfig``.

``ModelConfig.from_gguf`` reads every hyperparameter through these helpers, so that a
malformed file fails at load with one line naming the file, the key and the bad value
(``ModelFormatError``) instead of a ZeroDivisionError, NaN logits or a shape error deep in
a kernel. The rules follow what llama.cpp reads for the same keys
(``llama_model_base::load_hparams`` in ``src/llama-model.cpp`` and each architecture's
``load_arch_hparams`` in ``src/models/<arch>.cpp``); what llama.cpp accepts but tp_numa
does not implement is refused by name (``UnsupportedError``), never silently ignored.

``check_tensors`` then compares the tensor infos with the metadata (cheap: the header
only) and, for the dense llama / qwen2 / qwen3 / gemma3 layouts, refuses every tensor the
model would not use: llama.cpp refuses such a file too (``wrong number of tensors``), and
a tensor tp_numa skipped would silently change the results (e.g. ``attn_output.bias``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelFormatError, UnsupportedError


def _bad(f, key: str, value: Any, why: str) -> ModelFormatError:
    return ModelFormatError(f"{f.path}: metadata '{key}' = {value!r} {why}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def count(f, key: str, value: Any, *, minimum: int = 1) -> int:
    """An integer count or size (``block_count``, ``head_count``, ...), at least ``minimum``.

    A per-layer array whose entries are all equal is that value (llama.cpp reads these keys
    with ``get_key_or_arr``); differing entries are a model tp_numa cannot build."""
    if isinstance(value, list):
        if not value:
            raise _bad(f, key, value, "is an empty array")
        if any(v != value[0] for v in value):
            shown = value if len(value) <= 8 else value[:8] + ["..."]
            raise UnsupportedError(f"{f.path}: metadata '{key}' differs between layers {shown}; "
                                   f"per-layer values are not supported")
        value = value[0]
    if not _is_int(value):
        raise _bad(f, key, value, "is not an integer")
    if value < minimum:
        raise _bad(f, key, value, f"must be at least {minimum}")
    return int(value)


def real(f, key: str, value: Any, *, low: float = 0.0, high: float = math.inf,
         low_ok: bool = False) -> float:
    """A finite float with ``low < value < high`` (``low <= value`` when ``low_ok``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _bad(f, key, value, "is not a number")
    x = float(value)
    if not math.isfinite(x):
        raise _bad(f, key, value, "is not finite")
    if x < low or (x == low and not low_ok):
        raise _bad(f, key, value, f"must be {'>=' if low_ok else '>'} {low:g}")
    if x >= high:
        raise _bad(f, key, value, f"must be < {high:g}")
    return x


def rope_scale(f, arch: str) -> float:
    """Linear RoPE position scale (positions / factor), read as llama.cpp reads it.

    ``rope.scaling.type`` defaults to ``linear``; the factor is ``rope.scaling.factor``,
    else the older ``rope.scale_linear``; a factor of 0 or none means 1 (llama.cpp:
    ``rope_freq_scale_train = ropescale == 0 ? 1 : 1/ropescale``), and type ``none``
    never scales (llama-context.cpp). ``yarn`` and ``longrope`` change every rotation
    angle and are not implemented: refused rather than run unscaled."""
    tkey = f"{arch}.rope.scaling.type"
    kind = f.metadata(tkey, "linear")
    if kind not in ("none", "linear", "yarn", "longrope"):
        raise _bad(f, tkey, kind, "is not a RoPE scaling type (none, linear, yarn, longrope)")
    fkey = f"{arch}.rope.scaling.factor"
    factor = f.metadata(fkey)
    if factor is None:
        fkey = f"{arch}.rope.scale_linear"
        factor = f.metadata(fkey, 0.0)
    factor = real(f, fkey, factor, low_ok=True)
    if kind in ("yarn", "longrope"):
        raise UnsupportedError(f"{f.path}: metadata '{tkey}' = {kind!r}: {kind} RoPE scaling is not supported "
                               f"(supported: none, linear)")
    if kind == "none" or factor == 0.0:
        return 1.0
    return factor


def softcap(f, key: str, value: Any) -> float | None:
    """A logit soft-capping value: ``None`` when absent or 0 (llama.cpp: off), else > 0."""
    if value is None:
        return None
    x = real(f, key, value, low_ok=True)
    return x or None


def gemma3_sliding_layers(f, key: str, value: Any, n_layers: int) -> list[bool] | None:
    """Which layers use the sliding window, from ``attention.sliding_window_pattern``.

    As llama.cpp's ``load_swa_pattern``: an array gives one flag per layer, an integer n
    makes layer i sliding when ``i % n < n - 1`` (every n-th layer global; n = 0: all
    sliding); ``None`` when the key is absent (the caller's default applies)."""
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) != n_layers:
            raise _bad(f, key, value[:8], f"has {len(value)} entries for {n_layers} layers")
        return [bool(v) for v in value]
    n = count(f, key, value, minimum=0)
    return [n == 0 or i % n < n - 1 for i in range(n_layers)]


# ---- tensors -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The tensors llama.cpp builds a dense model of this architecture from."""

    qk_norm: bool            # attn_q_norm / attn_k_norm (required when True, refused when False)
    sandwich_norms: bool     # post_attention_norm / post_ffw_norm
    rope_freqs: bool         # optional llama3 frequency factors
    full_rope: bool          # rope.dimension_count must equal key_length
    ignored: frozenset = frozenset()   # optional tensors llama.cpp loads but does not use to generate


# llama.cpp src/models/{llama,qwen2,qwen3,gemma3}.cpp load_arch_tensors. full_rope: llama's
# load_hparams throws "invalid n_rot" and the qwen2/qwen3 graphs assert n_rot == head dim;
# gemma3 rotates rope.dimension_count dims.
LAYOUTS = {
    "llama": Layout(qk_norm=False, sandwich_norms=False, rope_freqs=True, full_rope=True),
    "qwen2": Layout(qk_norm=False, sandwich_norms=False, rope_freqs=False, full_rope=True),
    # cls_out: the reranker head, used only for rank pooling
    "qwen3": Layout(qk_norm=True, sandwich_norms=False, rope_freqs=False, full_rope=True,
                    ignored=frozenset({"cls_out.weight", "cls.output.weight"})),
    # dense_2/3_out: sentence-transformer projections, used only for embeddings
    "gemma3": Layout(qk_norm=True, sandwich_norms=True, rope_freqs=False, full_rope=False,
                     ignored=frozenset({"dense_2_out.weight", "dense_3_out.weight", "dense_2.weight",
                                        "dense_3.weight"})),
    # mixture of experts (src/models/{qwen2moe,qwen3moe,olmoe}.cpp); llama with experts is "llama"
    "qwen2moe": Layout(qk_norm=False, sandwich_norms=False, rope_freqs=False, full_rope=True),
    "qwen3moe": Layout(qk_norm=True, sandwich_norms=False, rope_freqs=False, full_rope=True),
    "olmoe": Layout(qk_norm=True, sandwich_norms=False, rope_freqs=False, full_rope=True),
}
# per-tensor activation scales (NVFP4 exports) llama.cpp loads but does not need for these types
_IGNORED_SUFFIXES = (".input_scale",)

# Optional tensors llama.cpp applies when present but tp_numa does not implement, per
# architecture ("*" = every one of the four): a file with one is refused by name.
_LLAMA_CPP_OPTIONAL = {
    "*": ("attn_qkv.weight", "attn_qkv.bias", "attn_q.scale", "attn_k.scale", "attn_v.scale",
          "attn_output.scale", "attn_qkv.scale", "ffn_gate.scale", "ffn_up.scale", "ffn_down.scale",
          "ffn_gate_exps.scale", "ffn_up_exps.scale", "ffn_down_exps.scale", "ffn_gate_up_exps.scale",
          "ffn_gate_shexp.scale", "ffn_up_shexp.scale", "ffn_down_shexp.scale", "ffn_gate_inp.scale"),
}
# Optional biases llama.cpp applies per architecture, which tp_numa applies too; in any other
# architecture they are refused (llama.cpp does not load them there either).
_OPTIONAL_BIASES = {
    "llama": ("attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"),
    "qwen2": ("output.bias",),
}

_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def _expected_shapes(cfg, dense: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape in torch order, where it comes from) for what the model reads
    (without the dense FFN of a mixture-of-experts file, whose layout is not this one)."""
    a, d, hd, V = cfg.arch, cfg.d_model, cfg.head_dim, cfg.vocab_size
    q, kv, ff = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.ffn_dim
    E, H, K, F = (f"{a}.embedding_length", f"{a}.attention.head_count", f"{a}.attention.head_count_kv",
                  f"{a}.feed_forward_length")
    hdk = f"{a}.attention.key_length"
    qs, kvs = f"{H} x {hdk}", f"{K} x {hdk}"
    out = {
        "token_embd.weight": ((V, d), f"(vocabulary, {E})"),
        "output_norm.weight": ((d,), E),
        "output.weight": ((V, d), f"(token_embd rows, {E})"),
        "rope_freqs.weight": ((cfg.rope_dim // 2,), f"{a}.rope.dimension_count / 2"),
    }
    layer = {
        "attn_norm.weight": ((d,), E),
        "attn_q.weight": ((q, d), f"({qs}, {E})"),
        "attn_k.weight": ((kv, d), f"({kvs}, {E})"),
        "attn_v.weight": ((kv, d), f"({kvs}, {E})"),
        "attn_output.weight": ((d, q), f"({E}, {qs})"),
        "ffn_norm.weight": ((d,), E),
        "ffn_gate.weight": ((ff, d), f"({F}, {E})"),
        "ffn_up.weight": ((ff, d), f"({F}, {E})"),
        "ffn_down.weight": ((d, ff), f"({E}, {F})"),
    }
    allowed = _OPTIONAL_BIASES.get(a, ())
    if "attn_output.bias" in allowed:
        layer["attn_output.bias"] = ((d,), E)
    if "ffn_gate.bias" in allowed:
        layer.update({"ffn_gate.bias": ((ff,), F), "ffn_up.bias": ((ff,), F), "ffn_down.bias": ((d,), E)})
    if "output.bias" in allowed:
        out["output.bias"] = ((V,), "vocabulary")
    moe_layer = dict(layer)
    if not dense and cfg.moe is not None:
        # a MoE layer: router, experts [E, out, in] (gate/up separate or merged), shared expert
        m = cfg.moe
        n_e, fe, fs = m.n_expert, m.expert_ff, m.shared_ff
        Ek, EF, SF = f"{a}.expert_count", f"{a}.expert_feed_forward_length", f"{a}.expert_shared_feed_forward_length"
        moe_layer = {n: v for n, v in layer.items() if not n.startswith("ffn_")}
        moe_layer.update({
            "ffn_norm.weight": ((d,), E),
            "ffn_gate_inp.weight": ((n_e, d), f"({Ek}, {E})"),
            "ffn_gate_exps.weight": ((n_e, fe, d), f"({Ek}, {EF}, {E})"),
            "ffn_up_exps.weight": ((n_e, fe, d), f"({Ek}, {EF}, {E})"),
            "ffn_gate_up_exps.weight": ((n_e, 2 * fe, d), f"({Ek}, 2 x {EF}, {E})"),
            "ffn_down_exps.weight": ((n_e, d, fe), f"({Ek}, {E}, {EF})"),
        })
        if fs:
            moe_layer.update({"ffn_gate_shexp.weight": ((fs, d), f"({SF}, {E})"),
                              "ffn_up_shexp.weight": ((fs, d), f"({SF}, {E})"),
                              "ffn_down_shexp.weight": ((d, fs), f"({E}, {SF})")})
            if m.shared_gate:
                moe_layer["ffn_gate_inp_shexp.weight"] = ((d,), E)
    elif not dense:
        layer = moe_layer = {n: v for n, v in layer.items() if not n.startswith("ffn_")}
    if cfg.qkv_bias:
        layer.update({"attn_q.bias": ((q,), qs), "attn_k.bias": ((kv,), kvs), "attn_v.bias": ((kv,), kvs)})
    if cfg.qk_norm and getattr(cfg, "qk_norm_full", False):
        # olmoe: one norm over all heads
        layer.update({"attn_q_norm.weight": ((q,), qs), "attn_k_norm.weight": ((kv,), kvs)})
    elif cfg.qk_norm:
        layer.update({"attn_q_norm.weight": ((hd,), hdk), "attn_k_norm.weight": ((hd,), hdk)})
    if cfg.sandwich_norms:
        layer.update({"post_attention_norm.weight": ((d,), E), "post_ffw_norm.weight": ((d,), E)})
    for part in (layer, moe_layer):
        part.update({n: v for n, v in layer.items() if not n.startswith("ffn_") or n == "ffn_norm.weight"})
    for i in range(cfg.n_layers):
        moe = cfg.moe is not None and cfg.moe.is_moe_layer(i)
        out.update({f"blk.{i}.{n}": v for n, v in (moe_layer if moe else layer).items()})
    return out


def check_tensors(f, cfg) -> None:
    """Tensor shapes against the metadata, and (dense files of the four known layouts)
    no tensor that the model would not use. Missing tensors are left to the loader,
    which names them when it reads them."""
    dense = not f.metadata(f"{cfg.arch}.expert_count", 0)
    expected = _expected_shapes(cfg, dense)
    layout = LAYOUTS.get(cfg.arch)
    for name, info in f.tensors.items():
        exp = expected.get(name)
        if exp is not None:
            if name == "rope_freqs.weight" and layout is not None and not layout.rope_freqs:
                exp = None      # refused below: llama.cpp uses it only for llama
            elif tuple(info.shape) != exp[0]:
                raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}, but the metadata "
                                       f"gives {list(exp[0])} = {exp[1]}")
            else:
                continue
        if layout is None or name in layout.ignored or name.endswith(_IGNORED_SUFFIXES):
            continue
        m = _BLK.fullmatch(name)
        if m and int(m.group(1)) >= cfg.n_layers:
            raise ModelFormatError(f"{f.path}: tensor '{name}' belongs to layer {m.group(1)}, but "
                                   f"'{cfg.arch}.block_count' = {cfg.n_layers}")
        base = m.group(2) if m else name
        if base in _LLAMA_CPP_OPTIONAL["*"] or base in _LLAMA_CPP_OPTIONAL.get(cfg.arch, ()):
            raise UnsupportedError(f"{f.path}: tensor '{name}' is not supported: llama.cpp applies it in "
                                   f"'{cfg.arch}' models, tp_numa does not")
        raise ModelFormatError(f"{f.path}: tensor '{name}' is not part of a '{cfg.arch}' model "
                               f"(llama.cpp refuses such a file too)")
