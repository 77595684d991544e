"""Small synthetic mixture-of-experts GGUFs (qwen3moe, qwen2moe, llama with experts =
Mixtral) and their float64 reference, on top of tests/synthetic_gguf.py.

Dims: 8 experts, top-3, n_ff_exp 96 = 3 blocks of 32, so tp=2 splits every expert 64+32
(the larger share rotating over the experts), tp=3 32+32+32 and tp=4 leaves some ranks
without a slice of some experts. qwen2moe adds a shared expert of 96 features (3 blocks)
gated by sigmoid(ffn_gate_inp_shexp . x). K-quant experts (``kquant=True``) use d 256 and
n_ff_exp 512 (2 blocks of 256) with random blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

from synthetic_gguf import _F16_SCALE_OFFSETS, _QUANTIZABLE, Spec, _rms, read_float_weights, reference_logits, \
    write_model


@dataclass
class MoESpec:
    base: Spec = field(default_factory=lambda: Spec(arch="qwen3moe"))
    n_expert: int = 8
    k: int = 3
    expert_ff: int = 96
    shared_ff: int = 0
    gate_type: QT = QT.Q8_0
    down_type: QT = QT.Q4_0
    router_type: QT = QT.F32
    merged_gate_up: bool = False     # ffn_gate_up_exps instead of ffn_gate_exps + ffn_up_exps
    meta: dict = field(default_factory=dict)   # extra / overridden {arch}.* keys


def moe_spec(arch: str = "qwen3moe", kquant: bool = False, **kw) -> MoESpec:
    base = dict(arch=arch, n_layers=2)
    if kquant:
        base.update(d_model=256)
        kw.setdefault("expert_ff", 512)
        kw.setdefault("gate_type", QT.Q4_K)
        kw.setdefault("down_type", QT.Q6_K)
    if arch == "qwen2moe":
        kw.setdefault("shared_ff", 96)
    return MoESpec(base=Spec(**base), **kw)


def _expert_tensor(store_raw, name: str, arr: np.ndarray, qtype: QT, rng) -> None:
    """A 3-D expert tensor [E, out, in]: quantized by gguf-py, or random blocks with finite
    scales for the types gguf-py cannot quantize (K-quants)."""
    if qtype in _QUANTIZABLE:
        raw = quantize(arr.astype(np.float32), qtype) if qtype not in (QT.F32, QT.F16) else arr.astype(
            np.float32 if qtype == QT.F32 else np.float16)
        store_raw(name, raw, None if qtype in (QT.F32, QT.F16) else qtype)
        return
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    E, n, k = arr.shape
    raw = rng.integers(0, 256, (E, n, k // block, tsize), dtype=np.uint8)
    for off in _F16_SCALE_OFFSETS.get(qtype, ()):
        scale = (rng.random(raw.shape[:3]) * 0.01).astype(np.float16)
        raw[..., off:off + 2] = scale.view(np.uint8).reshape(*raw.shape[:3], 2)
    store_raw(name, raw.reshape(E, n, -1), qtype)


def write_moe_model(path: str | Path, ms: MoESpec) -> Path:
    """Write a loadable MoE GGUF for ``ms``."""
    s = ms.base
    d = s.d_model
    meta = {"expert_count": ms.n_expert, "expert_used_count": ms.k, "expert_feed_forward_length": ms.expert_ff}
    if ms.shared_ff:
        meta["expert_shared_feed_forward_length"] = ms.shared_ff
    s.meta = meta | ms.meta
    s.ffn = ms.expert_ff

    def ffn_writer(w, store, rng, i):
        p = f"blk.{i}."

        def raw(name, arr, qtype):
            if name in s.drop:
                return
            if qtype is None:
                w.add_tensor(name, arr)
            else:
                w.add_tensor(name, arr, raw_dtype=qtype)

        store(p + "ffn_gate_inp.weight", rng.standard_normal((ms.n_expert, d)) * 2 / math.sqrt(d), ms.router_type)
        E, F = ms.n_expert, ms.expert_ff
        gate = rng.standard_normal((E, F, d)) / math.sqrt(d)
        up = rng.standard_normal((E, F, d)) / math.sqrt(d)
        down = rng.standard_normal((E, d, F)) / math.sqrt(F)
        if ms.merged_gate_up:
            _expert_tensor(raw, p + "ffn_gate_up_exps.weight", np.concatenate([gate, up], axis=1), ms.gate_type, rng)
        else:
            _expert_tensor(raw, p + "ffn_gate_exps.weight", gate, ms.gate_type, rng)
            _expert_tensor(raw, p + "ffn_up_exps.weight", up, ms.gate_type, rng)
        _expert_tensor(raw, p + "ffn_down_exps.weight", down, ms.down_type, rng)
        if ms.shared_ff:
            G = ms.shared_ff
            store(p + "ffn_gate_shexp.weight", rng.standard_normal((G, d)) / math.sqrt(d), s.weight_type)
            store(p + "ffn_up_shexp.weight", rng.standard_normal((G, d)) / math.sqrt(d), s.weight_type)
            store(p + "ffn_down_shexp.weight", rng.standard_normal((d, G)) / math.sqrt(G), s.weight_type)
            if s.arch == "qwen2moe":
                raw(p + "ffn_gate_inp_shexp.weight", (rng.standard_normal(d) / math.sqrt(d)).astype(np.float32), None)

    return write_model(path, s, ffn_writer=ffn_writer)


def _softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_moe_logits(ms: MoESpec, W: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Float64 logits [T, vocab]: the dense reference with each layer's FFN the MoE block."""
    norm = ms.base.arch in ("qwen3moe", "llama")

    def ffn(i, h):
        p = f"blk.{i}."
        probs = _softmax(h @ W[p + "ffn_gate_inp.weight"].T)              # (T, E)
        out = np.zeros_like(h)
        if p + "ffn_gate_up_exps.weight" in W:
            gu = W[p + "ffn_gate_up_exps.weight"]
            gate, up = gu[:, : ms.expert_ff], gu[:, ms.expert_ff:]
        else:
            gate, up = W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"]
        down = W[p + "ffn_down_exps.weight"]
        for t in range(h.shape[0]):
            ids = np.argsort(-probs[t], kind="stable")[: ms.k]
            w = probs[t, ids]
            if norm:
                w = w / w.sum()
            for e, we in zip(ids, w):
                g, u = gate[e] @ h[t], up[e] @ h[t]
                out[t] += we * (down[e] @ (g / (1 + np.exp(-g)) * u))
        if ms.shared_ff:
            g, u = h @ W[p + "ffn_gate_shexp.weight"].T, h @ W[p + "ffn_up_shexp.weight"].T
            sh = (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down_shexp.weight"].T
            if p + "ffn_gate_inp_shexp.weight" in W:
                sh = sh / (1 + np.exp(-(h @ W[p + "ffn_gate_inp_shexp.weight"])))[:, None]
            out += sh
        return out

    return reference_logits(ms.base, W, tokens, ffn=ffn)


__all__ = ["MoESpec", "moe_spec", "write_moe_model", "reference_moe_logits", "read_float_weights", "_rms"]
