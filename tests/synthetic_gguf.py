"""Small synthetic GGUF models (random weights) for llama / qwen2 / qwen3 / gemma3, and a
plain float64 reference forward that reads them with gguf.GGUFReader (independent of
tp_numa's loader and layers).

``write_model(path, Spec)``: the dims are chosen so that every tensor splits at tp = 2, 3,
4 and most splits are uneven: 6 query heads in 2 KV groups, head_dim 32, ffn 160 (5 blocks
of 32), vocab 301. No tokenizer: the model tests feed ids.

``write_tiny_llama(path, ...)``: a complete, loadable 1-layer llama model with a tiny
SentencePiece-style vocabulary (for the engine, CLI and bench tests); its knobs break it
in exactly one way each (drop a tensor, give one tensor an unsupported type, name an
unknown architecture) for the error-path tests.

Both take ``meta``: ``{arch}.*`` metadata keys (without the ``{arch}.`` prefix) to set to
another value (its Python type picks the GGUF type, see ``_add_kv``) or, with ``None``, to
leave out. ``Spec.tensors`` / ``write_tiny_llama(extra_tensors=)`` add F32 tensors by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize


@dataclass
class Spec:
    arch: str = "llama"
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 6
    n_kv: int = 2
    head_dim: int = 32
    ffn: int = 160
    vocab: int = 301
    rope_base: float = 10000.0
    eps: float = 1e-5
    window: int = 4              # gemma3 sliding window
    weight_type: QT = QT.Q8_0    # matrices
    embed_type: QT = QT.Q8_0
    down_type: QT = QT.Q4_0
    v_type: QT = QT.F16
    tied: bool = False
    seed: int = 0
    extra_kv: dict = field(default_factory=dict)
    drop: tuple = ()                                      # tensor names left out
    types: dict = field(default_factory=dict)             # tensor name -> type override
    meta: dict = field(default_factory=dict)              # metadata key -> value (None: left out)
    tensors: dict = field(default_factory=dict)           # extra tensor name -> float array


def gemma3_spec(**kw) -> Spec:
    base = dict(arch="gemma3", n_layers=6, n_heads=4, n_kv=1, head_dim=32, tied=True)
    base.update(kw)
    return Spec(**base)


def _store_tensor(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: QT) -> None:
    arr = arr.astype(np.float32)
    if qtype not in _QUANTIZABLE:
        # a type gguf-py cannot quantize (K-quants, ...): random bytes of the right size
        block, tsize = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, (arr.shape[0], arr.shape[1] // block, tsize), dtype=np.uint8)
        for off in _F16_SCALE_OFFSETS.get(qtype, ()):
            # finite scales so the oracle's values are finite
            scale = (rng.random(raw.shape[:2]) * 0.01).astype(np.float16)
            raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
        raw = raw.reshape(arr.shape[0], -1)
        w.add_tensor(name, raw, raw_dtype=qtype)
    elif qtype == QT.F32:
        w.add_tensor(name, arr)
    elif qtype == QT.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)


# byte offsets of the f16 scale fields in a block (d, dmin) of types written as random bytes
_F16_SCALE_OFFSETS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82),
                      QT.IQ4_XS: (0,), QT.IQ4_NL: (0,)}
_QUANTIZABLE = {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}


def write_model(path: str | Path, spec: Spec, ffn_writer=None) -> Path:
    """Write a loadable GGUF for ``spec`` (no tokenizer: the model tests feed ids).

    ``ffn_writer(w, store, rng, layer)`` writes a layer's FFN tensors instead of the dense
    ones (``store(name, array, qtype)``; the MoE models of tests/synthetic_moe.py)."""
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    s = spec
    meta = ({"attention.sliding_window": s.window} if s.arch == "gemma3" else {}) | s.meta
    w = _writer(path, s.arch, s.n_layers, 512, s.d_model, s.ffn, s.n_heads, s.n_kv, s.eps, s.rope_base,
                head_dim=s.head_dim, meta=meta)
    for k, v in s.extra_kv.items():
        w.add_float32(f"{s.arch}.{k}", v)

    def mat(n: int, k: int, scale: float = 1.0) -> np.ndarray:
        return rng.standard_normal((n, k)) * scale / math.sqrt(k)

    def vec(n: int) -> np.ndarray:
        return 1.0 + 0.2 * rng.standard_normal(n)

    d, hd = s.d_model, s.head_dim

    def _store(w, name, arr, qtype):
        if name not in s.drop:
            _store_tensor(w, name, arr, s.types.get(name, qtype))

    _store(w, "token_embd.weight", rng.standard_normal((s.vocab, d)), s.embed_type)
    _store(w, "output_norm.weight", vec(d), QT.F32)
    if not s.tied:
        _store(w, "output.weight", mat(s.vocab, d, 4.0), s.weight_type)
    for i in range(s.n_layers):
        p = f"blk.{i}."
        _store(w, p + "attn_norm.weight", vec(d), QT.F32)
        _store(w, p + "attn_q.weight", mat(s.n_heads * hd, d, 2.0), s.weight_type)
        _store(w, p + "attn_k.weight", mat(s.n_kv * hd, d, 2.0), s.weight_type)
        _store(w, p + "attn_v.weight", mat(s.n_kv * hd, d), s.v_type)
        if s.arch in ("qwen2", "qwen2moe"):
            _store(w, p + "attn_q.bias", 0.1 * rng.standard_normal(s.n_heads * hd), QT.F32)
            _store(w, p + "attn_k.bias", 0.1 * rng.standard_normal(s.n_kv * hd), QT.F32)
            _store(w, p + "attn_v.bias", 0.1 * rng.standard_normal(s.n_kv * hd), QT.F32)
        if s.arch in ("qwen3", "gemma3", "qwen3moe"):
            _store(w, p + "attn_q_norm.weight", vec(hd), QT.F32)
            _store(w, p + "attn_k_norm.weight", vec(hd), QT.F32)
        _store(w, p + "attn_output.weight", mat(d, s.n_heads * hd), s.weight_type)
        _store(w, p + "ffn_norm.weight", vec(d), QT.F32)
        if ffn_writer is not None:
            ffn_writer(w, lambda name, arr, qtype: _store(w, name, arr, qtype), rng, i)
        else:
            _store(w, p + "ffn_gate.weight", mat(s.ffn, d), s.weight_type)
            _store(w, p + "ffn_up.weight", mat(s.ffn, d), s.weight_type)
            _store(w, p + "ffn_down.weight", mat(d, s.ffn), s.down_type)
        if s.arch == "gemma3":
            _store(w, p + "post_attention_norm.weight", vec(d), QT.F32)
            _store(w, p + "post_ffw_norm.weight", vec(d), QT.F32)
    for name, arr in s.tensors.items():
        _store_tensor(w, name, np.asarray(arr, dtype=np.float32), QT.F32)
    _finish(w)
    return path


def _writer(path: Path, arch: str, n_layers: int, ctx: int, d: int, ffn: int, heads: int, kv: int,
            eps: float, rope_base: float, head_dim: int | None = None, meta: dict | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter with the hyperparameters every model here has (key/value lengths
    written only when ``head_dim`` is given), changed by ``meta`` (see the module doc)."""
    kvs = {"block_count": n_layers, "context_length": ctx, "embedding_length": d, "feed_forward_length": ffn,
           "attention.head_count": heads, "attention.head_count_kv": kv}
    if head_dim is not None:
        kvs.update({"attention.key_length": head_dim, "attention.value_length": head_dim})
    kvs.update({"attention.layer_norm_rms_epsilon": float(eps), "rope.freq_base": float(rope_base)})
    for k, v in (meta or {}).items():
        if v is None:
            kvs.pop(k, None)
        else:
            kvs[k] = v
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in kvs.items():
        _add_kv(w, f"{arch}.{k}", v)
    return w


def _add_kv(w: gguf.GGUFWriter, key: str, value) -> None:
    """bool -> bool, int -> uint32 (int32 when negative), float -> float32, str -> string,
    list -> array (of the elements' type)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_uint32 if value >= 0 else w.add_int32)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: cannot write {value!r}")


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- tiny llama with a vocabulary (engine / CLI / error-path tests) ----------------------

TINY_D, TINY_HEADS, TINY_KV, TINY_FFN, TINY_LAYERS = 64, 2, 1, 128, 1
TINY_HEAD_DIM = TINY_D // TINY_HEADS


def _tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens, then a few words: a valid 'llama' vocab."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    words = ["▁", "h", "i", "e", "l", "o", "▁h", "▁hi", "▁hello", "▁the", "t"]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    return tokens, scores, types


def write_tiny_llama(
    path: str | Path,
    *,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    unsupported: str | None = None,
    seed: int = 0,
    meta: dict | None = None,
    extra_tensors: dict | None = None,
) -> Path:
    """Write the tiny llama; ``drop`` omits tensors by name, ``unsupported`` stores that
    tensor as Q8_1 (a GGML type tp_numa does not run), ``arch`` sets general.architecture,
    ``meta`` changes metadata keys and ``extra_tensors`` adds F32 tensors by name."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _tiny_vocab()
    vocab = len(tokens)
    D, HEADS, KV, FFN, HEAD_DIM = TINY_D, TINY_HEADS, TINY_KV, TINY_FFN, TINY_HEAD_DIM
    w = _writer(path, arch, TINY_LAYERS, 256, D, FFN, HEADS, KV, 1e-5, 10000.0, meta=meta)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def mat(n: int, k: int) -> np.ndarray:
        return (rng.standard_normal((n, k)) * 0.05).astype(np.float32)

    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": mat(vocab, D),
        "output_norm.weight": np.ones(D, dtype=np.float32),
        "output.weight": mat(vocab, D),
    }
    for i in range(TINY_LAYERS):
        tensors.update({
            f"blk.{i}.attn_norm.weight": np.ones(D, dtype=np.float32),
            f"blk.{i}.attn_q.weight": mat(HEADS * HEAD_DIM, D),
            f"blk.{i}.attn_k.weight": mat(KV * HEAD_DIM, D),
            f"blk.{i}.attn_v.weight": mat(KV * HEAD_DIM, D),
            f"blk.{i}.attn_output.weight": mat(D, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_norm.weight": np.ones(D, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": mat(FFN, D),
            f"blk.{i}.ffn_up.weight": mat(FFN, D),
            f"blk.{i}.ffn_down.weight": mat(D, FFN),
        })
    tensors.update({k: np.asarray(v, dtype=np.float32) for k, v in (extra_tensors or {}).items()})
    for name, t in tensors.items():
        if name in drop:
            continue
        if name == unsupported:
            # Q8_1 (blocks of 32 values): a real GGML type that tp_numa does not run.
            # All-zero blocks are valid (every value 0); the loader refuses the type first.
            qtype = QT.Q8_1
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n, k = t.shape
            w.add_tensor(name, np.zeros((n, k // block * type_size), dtype=np.uint8), raw_dtype=qtype)
            continue
        w.add_tensor(name, t)
    _finish(w)
    return path


# ---- plain float64 reference -------------------------------------------------------------


def read_float_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantized to float64, in logical (torch) shape."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = dequantize(np.array(t.data), t.tensor_type).astype(np.float64).reshape(shape)
    return out


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, base, neox):
    """x [T, H, D], positions [T]."""
    D = x.shape[-1]
    inv = base ** (-np.arange(0, D, 2) / D)
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    if neox:
        a, b = x[..., : D // 2], x[..., D // 2:]
        out[..., : D // 2], out[..., D // 2:] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(spec: Spec, W: dict[str, np.ndarray], tokens: list[int], ffn=None) -> np.ndarray:
    """Logits [T, vocab] of the whole sequence from position 0 (float64, no cache).

    ``ffn(layer, h) -> [T, d]`` replaces the dense FFN of a layer (the MoE reference)."""
    s = spec
    T, hd = len(tokens), s.head_dim
    gemma = s.arch == "gemma3"
    neox = s.arch != "llama"
    pos = np.arange(T, dtype=np.float64)
    x = W["token_embd.weight"][tokens]
    if gemma:
        x = x * math.sqrt(s.d_model)
    for i in range(s.n_layers):
        p = f"blk.{i}."
        sliding = gemma and (i % 6 < 5)
        base = 10000.0 if sliding else s.rope_base
        h = _rms(x, W[p + "attn_norm.weight"], s.eps)
        q = h @ W[p + "attn_q.weight"].T
        k = h @ W[p + "attn_k.weight"].T
        v = h @ W[p + "attn_v.weight"].T
        if p + "attn_q.bias" in W:
            q, k, v = q + W[p + "attn_q.bias"], k + W[p + "attn_k.bias"], v + W[p + "attn_v.bias"]
        q, k, v = q.reshape(T, s.n_heads, hd), k.reshape(T, s.n_kv, hd), v.reshape(T, s.n_kv, hd)
        if p + "attn_q_norm.weight" in W:
            q = _rms(q, W[p + "attn_q_norm.weight"], s.eps)
            k = _rms(k, W[p + "attn_k_norm.weight"], s.eps)
        q, k = _rope(q, pos, base, neox), _rope(k, pos, base, neox)
        group = s.n_heads // s.n_kv
        att = np.zeros((T, s.n_heads, hd))
        for hh in range(s.n_heads):
            sc = q[:, hh] @ k[:, hh // group].T / math.sqrt(hd)          # (T, T)
            qi, kj = np.arange(T)[:, None], np.arange(T)[None, :]
            mask = kj <= qi
            if sliding:
                mask &= (qi - kj) < s.window
            sc = np.where(mask, sc, -np.inf)
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            att[:, hh] = pr @ v[:, hh // group]
        a = att.reshape(T, -1) @ W[p + "attn_output.weight"].T
        if gemma:
            a = _rms(a, W[p + "post_attention_norm.weight"], s.eps)
        x = x + a
        h = _rms(x, W[p + "ffn_norm.weight"], s.eps)
        if ffn is not None:
            m = ffn(i, h)
        else:
            g, u = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
            act = _gelu_tanh(g) if gemma else g / (1 + np.exp(-g))
            m = (act * u) @ W[p + "ffn_down.weight"].T
        if gemma:
            m = _rms(m, W[p + "post_ffw_norm.weight"], s.eps)
        x = x + m
    x = _rms(x, W["output_norm.weight"], s.eps)
    out_w = W["token_embd.weight"] if s.tied else W["output.weight"]
    return x @ out_w.T
