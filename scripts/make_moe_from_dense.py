#!/usr/bin/env python3
"""Derives mixture-of-experts GGUFs from the shipped dense Qwen2.5-Coder-0.5B (qwen2).

    .venv/bin/python scripts/make_moe_from_dense.py OUT.gguf [--arch qwen2moe|llama]
        [--source qwen2.5-coder-0.5b | PATH.gguf] [--seed 0]

Why: the MoE code paths are tested against a float reference on random models, whose
text means nothing. A MoE file whose attention, embeddings, norms, tokenizer and chat
template are a real model's, byte for byte, and whose experts are cut from that model's
own FFN, generates meaningful text with real (input-dependent) routing, so llama.cpp and
tp_numa can be compared on it as on the shipped models (tests/test_moe_golden.py).
Every weight stays in its GGUF block type: rows and blocks are copied, and where a weight
is scaled only the f16 scale fields of its blocks change (no requantization).

Notation per layer: x = the FFN input (ffn_norm output), the dense FFN
``y = sum_b f_b(x)`` over its 19 blocks b of 256 features (``f_b = D[:, b] (silu(G_b x) *
U_b x)``, G_b / U_b = rows of ffn_gate / ffn_up, D[:, b] = one 256-column block of ffn_down).

``--arch qwen2moe`` (shared expert + 8 routed experts, top-2, weights not renormalised)::

    out = sigmoid(s . x) * S(x) + sum_{j in top-2} p_j E_j(x),     p = softmax(R x)

- shared expert S = the dense FFN with every ffn_down block's f16 scale(s) x 2 (exact in
  f16: a power of two, far from overflow), so ``S = 2 y`` and ``sigmoid(s . x) S =
  y (1 + tanh(s . x / 2))``: the dense FFN within ~8 % (``s . x`` has a std of ~0.16).
  ``s`` is small and random rather than 0: llama.cpp computes the gate as ``silu(z) / z``,
  which is NaN at z = 0 exactly, and a constant gate would leave its dot product untested;
- routed expert e = 3 whole 256-feature blocks B_e of the same FFN (the same gate/up
  rows and down columns, so n_ff_exp = 768; experts may share blocks), with its down
  blocks' f16 scales x 1/2: ``E_e = 1/2 sum_{b in B_e} f_b``. Blocks are nearly
  orthogonal (one is ~0.2 |y|, three ~0.37 |y|), so the routed sum is ~10 % of |y|
  (median over tokens and layers): routing each token to the wrong experts moves the
  logits by a mean KL of ~0.06 nats and flips ~15 % of the top-1 choices, three times
  the tolerance of the llama.cpp comparison, while greedy text stays meaningful;
- router R [8, d] F32: uniform random rows of unit variance, scaled by TAU / |ffn_norm
  weight| (|x| is ~0.6-0.9 of that norm in every layer), so the logits have a std of ~2:
  the favourite expert's probability is ~0.5 (median), the top two hold ~0.75, and every
  expert is used.

``--arch llama`` (Mixtral: 4 experts, top-2, weights renormalised to sum 1, no shared
expert)::

    out = sum_{j in top-2} w_j E_j(x),     w = the two largest softmax(R x), / their sum

- every expert is the whole dense FFN (n_ff_exp = 4864: a convex combination of experts
  must itself be close to y), with ffn_down block b of expert e scaled by
  ``1 + DELTA r_eb`` (r = +-1 at random, DELTA = 1/8; the f16 scale rounds):
  ``out = y + DELTA sum_b (sum_j w_j r_jb) f_b``, a few % away from y, different for
  every expert pair and weighting (wrong routing: mean KL ~0.05 nats, ~11 % of the top-1
  choices flipped);
- llama rotates adjacent pairs (RoPE NORM) where qwen2 rotates halves (NEOX), so the
  rows of attn_q / attn_k (and their biases) are permuted inside every head: new row 2i
  = old row i, new row 2i+1 = old row i + head_dim/2. q . k is unchanged (the same
  permutation on both sides) and every rotation pair keeps its frequency, so attention is
  mathematically the qwen2 attention (only the order of the dot products' terms changes).
  Both llama.cpp's llama (optional q/k/v biases of create_tensor_qkv) and tp_numa's take
  the biases.

A ``qwen3moe`` file is not derived: qwen3 RMS-normalises q and k per head before RoPE
(``attn_q_norm`` / ``attn_k_norm`` are required), which turns every attention logit into a
scaled cosine of q and k; no choice of weights gives back the qwen2 attention, so the
text of such a file would not be the model's.

Metadata is copied key by key with its GGUF types (the ``qwen2.`` keys renamed for the
new architecture) and checked byte for byte against the source after writing; tensors
are streamed one at a time. The output is a pure function of the source file and the
seed (random numbers from PCG64 raw words, no transcendental functions, exactly rounded
sums): its SHA-256, printed at the end, is what tests/data records.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import struct
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402

from tp_numa.errors import TpNumaError  # noqa: E402
from tp_numa.gguf_loader import read_header  # noqa: E402

SOURCE_ARCH = "qwen2"
BLOCK = 256                 # features per ffn_down block (Q4_K / Q6_K super-blocks)
TAU = 3.0                   # router logit scale, in units of |x| / |ffn_norm weight|
SHARED_GATE = 0.25          # qwen2moe shared-gate dot product scale, same units

QWEN2MOE = dict(n_expert=8, k=2, blocks=3, routed_scale=0.5)
MIXTRAL = dict(n_expert=4, k=2, delta=0.125)

# byte offsets of the f16 fields that multiply a whole block (d, and dmin where the block
# subtracts d_min * m: scaling both scales every value of the block)
F16_SCALES = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q8_0: (0,), QT.Q5_0: (0,),
              QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_1: (0, 2)}

# purposes of the random streams (one PCG64 stream per (seed, layer, purpose))
_ROUTER, _SHARED_GATE, _BLOCKS, _SIGNS = range(4)


class DeriveError(Exception):
    """The source file cannot be turned into the requested MoE file."""


# ---------------------------------------------------------------- metadata (raw walk)

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def kv_entries(path: str) -> dict[str, tuple[int, int | None, bytes]]:
    """key -> (GGUF value type, array element type or None, raw value bytes), in file order.

    tp_numa's header reader gives the values; this walk adds what it drops, the exact
    types (u32 vs i32, f32 vs f64, ...), and the raw bytes used to check the copy."""
    with open(path, "rb") as fh:
        head = fh.read(24)
        if head[:4] != b"GGUF":
            raise DeriveError(f"{path}: not a GGUF file")
        n_kv = struct.unpack_from("<Q", head, 16)[0]
        buf = head + fh.read(64 << 20)      # the key/value section of these files is ~10 MB
    pos, out = 24, {}

    def skip(vtype: int, p: int) -> int:
        if vtype in _FIXED:
            return p + _FIXED[vtype]
        if vtype == _STRING:
            return p + 8 + struct.unpack_from("<Q", buf, p)[0]
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if etype in _FIXED:
                return p + count * _FIXED[etype]
            for _ in range(count):
                p = skip(etype, p)
            return p
        raise DeriveError(f"{path}: unknown GGUF value type {vtype}")

    for _ in range(n_kv):
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8: pos + 8 + n].decode("utf-8")
        pos += 8 + n
        vtype = struct.unpack_from("<I", buf, pos)[0]
        start = pos + 4
        end = skip(vtype, start)
        if end > len(buf):
            raise DeriveError(f"{path}: metadata section larger than expected")
        etype = struct.unpack_from("<I", buf, start)[0] if vtype == _ARRAY else None
        out[key] = (vtype, etype, bytes(buf[start:end]))
        pos = end
    return out


def copy_metadata(w: gguf.GGUFWriter, src, kv: dict, arch: str) -> dict[str, str]:
    """Every source key except the architecture, ``qwen2.X`` renamed ``{arch}.X``, with its
    own GGUF type. Returns {new key: source key} for the check after writing."""
    renamed = {}
    for key, (vtype, etype, _) in kv.items():
        if key == "general.architecture":
            continue
        new = arch + key[len(SOURCE_ARCH):] if key.startswith(SOURCE_ARCH + ".") else key
        value = src.h.meta[key]
        if key == "general.name":
            value = f"{value} ({arch} derived by scripts/make_moe_from_dense.py)"
        if isinstance(value, np.ndarray):
            value = value.tolist()
        w.add_key_value(new, value, VT(vtype), sub_type=None if etype is None else VT(etype))
        if key != "general.name":
            renamed[new] = key
    return renamed


def check_metadata(out_path: str, kv: dict, renamed: dict[str, str]) -> None:
    """The copied keys of the written file have the source's types and bytes exactly."""
    got = kv_entries(out_path)
    for new, old in renamed.items():
        if got.get(new) != kv[old]:
            raise DeriveError(f"{out_path}: metadata '{new}' differs from the source's '{old}' after writing "
                              f"(a value did not survive the copy)")


# ---------------------------------------------------------------- deterministic randomness


def _words(seed: int, layer: int, purpose: int, n: int) -> np.ndarray:
    """n raw uint64 words of PCG64 for (seed, layer, purpose): stable across numpy versions."""
    bg = np.random.PCG64(np.random.SeedSequence([seed, layer, purpose]))
    return bg.random_raw(n).astype(np.uint64)


def _uniform_unit_variance(seed: int, layer: int, purpose: int, shape: tuple[int, ...]) -> np.ndarray:
    """float64 uniform on [-sqrt 3, sqrt 3) (variance 1), exactly reproducible."""
    n = int(np.prod(shape))
    u = (_words(seed, layer, purpose, n) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return ((u - 0.5) * (2 * math.sqrt(3.0))).reshape(shape)


def _subsets(seed: int, layer: int, n_sets: int, n_items: int, size: int) -> list[list[int]]:
    """n_sets subsets of `size` distinct items of range(n_items) (partial Fisher-Yates on
    raw words, so no library sampling routine can change the result)."""
    words = iter(_words(seed, layer, _BLOCKS, n_sets * size).tolist())
    out = []
    for _ in range(n_sets):
        items = list(range(n_items))
        for i in range(size):
            j = i + next(words) % (n_items - i)
            items[i], items[j] = items[j], items[i]
        out.append(items[:size])
    return out


def _norm(v: np.ndarray) -> float:
    """Euclidean norm with an exactly rounded sum (no BLAS summation order)."""
    return math.sqrt(math.fsum(float(t) * float(t) for t in v.astype(np.float64)))


# ---------------------------------------------------------------- block surgery


def scale_blocks(raw: np.ndarray, qtype: QT, factor) -> np.ndarray:
    """Copy of quantized rows ``raw`` (uint8 [..., n_blocks * type_size]) with every block's
    f16 scale fields multiplied by ``factor`` (a number, or an array broadcasting against
    [..., n_blocks]); x2 and x1/2^k are exact in f16 unless they overflow or go subnormal."""
    if qtype not in F16_SCALES:
        raise DeriveError(f"cannot scale {qtype.name} blocks (no f16 block scale known)")
    ts = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = np.array(raw, dtype=np.uint8).reshape(*raw.shape[:-1], raw.shape[-1] // ts, ts)
    for off in F16_SCALES[qtype]:
        d = np.ascontiguousarray(blocks[..., off: off + 2]).view(np.float16)[..., 0]
        new = (d.astype(np.float32) * np.asarray(factor, dtype=np.float32)).astype(np.float16)
        if not np.isfinite(new).all():
            raise DeriveError(f"scaling {qtype.name} block scales by {factor} overflows f16")
        blocks[..., off: off + 2] = new[..., None].view(np.uint8)
    return blocks.reshape(raw.shape)


def neox_to_norm_rows(raw: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows (or bias entries) of attn_q / attn_k reordered inside each head from RoPE NEOX
    (pairs i, i + hd/2) to NORM (pairs 2i, 2i+1): new 2i = old i, new 2i+1 = old i + hd/2."""
    half = head_dim // 2
    perm = np.empty(head_dim, dtype=np.int64)
    perm[0::2] = np.arange(half)
    perm[1::2] = np.arange(half) + half
    n = raw.shape[0]
    if n % head_dim:
        raise DeriveError(f"{n} rows are not whole heads of {head_dim}")
    idx = (np.arange(n // head_dim)[:, None] * head_dim + perm[None, :]).reshape(-1)
    return raw[idx]


# ---------------------------------------------------------------- the derivation


class Source:
    """The dense qwen2 file: header (tp_numa's reader) and a read-only map of its bytes."""

    def __init__(self, path: str):
        self.path = path
        self.h = read_header(path)
        if self.h.arch != SOURCE_ARCH:
            raise DeriveError(f"{path}: architecture '{self.h.arch}', expected a dense '{SOURCE_ARCH}' model")
        if self.h.metadata(f"{SOURCE_ARCH}.expert_count", 0):
            raise DeriveError(f"{path}: already a mixture-of-experts model")
        self.mm = np.memmap(path, mode="r")
        self.n_layers = int(self.h.require(f"{SOURCE_ARCH}.block_count"))
        self.d = int(self.h.require(f"{SOURCE_ARCH}.embedding_length"))
        self.ff = int(self.h.require(f"{SOURCE_ARCH}.feed_forward_length"))
        self.head_dim = self.d // int(self.h.require(f"{SOURCE_ARCH}.attention.head_count"))
        if self.ff % BLOCK:
            raise DeriveError(f"{path}: feed_forward_length {self.ff} is not whole blocks of {BLOCK}")
        for i in range(self.n_layers):
            down = self.info(f"blk.{i}.ffn_down.weight")
            if down.block_size != BLOCK:
                raise DeriveError(f"{path}: '{down.name}' is {down.qtype.name}; the experts are cut on blocks of "
                                  f"{BLOCK} features, which needs a 256-element block type")

    def info(self, name: str):
        if not self.h.has(name):
            raise DeriveError(f"{self.path}: tensor '{name}' is missing")
        return self.h.tensors[name]

    def rows(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8 [n_rows, row_bytes] (a view of the map)."""
        t = self.info(name)
        return self.mm[t.offset: t.offset + t.n_bytes].reshape(t.n_rows, t.row_bytes)

    def floats(self, name: str) -> np.ndarray:
        t = self.info(name)
        if t.qtype != QT.F32:
            raise DeriveError(f"{self.path}: '{name}' is {t.qtype.name}, expected F32")
        return self.rows(name).reshape(-1).view(np.float32)


class Tensor:
    """One output tensor: name, GGUF type, logical torch-order shape, and a function that
    produces its bytes when the writer reaches it (so only one tensor is in memory)."""

    def __init__(self, name: str, qtype: QT, shape: tuple[int, ...], make):
        self.name, self.qtype, self.shape, self.make = name, qtype, tuple(shape), make

    @property
    def nbytes(self) -> int:
        block, ts = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * ts


def _copy(src: Source, name: str, new_name: str | None = None, transform=None) -> Tensor:
    t = src.info(name)
    make = (lambda: src.rows(name)) if transform is None else (lambda: transform(src.rows(name)))
    return Tensor(new_name or name, t.qtype, t.shape, make)


def _router(src: Source, seed: int, layer: int, n_expert: int) -> Tensor:
    g = _norm(src.floats(f"blk.{layer}.ffn_norm.weight"))
    w = _uniform_unit_variance(seed, layer, _ROUTER, (n_expert, src.d)) * (TAU / g)
    return Tensor(f"blk.{layer}.ffn_gate_inp.weight", QT.F32, (n_expert, src.d), lambda: w.astype(np.float32))


def qwen2moe_ffn(src: Source, seed: int, i: int) -> list[Tensor]:
    """Shared expert = the dense FFN (down x2), 8 routed experts of 3 blocks (down x1/2),
    a random router and a small random shared gate."""
    p = f"blk.{i}."
    E, nb, scale = QWEN2MOE["n_expert"], QWEN2MOE["blocks"], QWEN2MOE["routed_scale"]
    n_blocks = src.ff // BLOCK
    sets = _subsets(seed, i, E, n_blocks, nb)
    rows = [np.concatenate([np.arange(b * BLOCK, (b + 1) * BLOCK) for b in s]) for s in sets]
    down = src.info(p + "ffn_down.weight")

    def gate_up(name):
        return lambda: np.stack([src.rows(name)[r] for r in rows])          # (E, nb*256, row bytes)

    def routed_down():
        blocks = src.rows(p + "ffn_down.weight").reshape(src.d, n_blocks, down.type_size)
        return np.stack([scale_blocks(blocks[:, s].reshape(src.d, -1), down.qtype, scale) for s in sets])

    g = _norm(src.floats(p + "ffn_norm.weight"))
    s = _uniform_unit_variance(seed, i, _SHARED_GATE, (src.d,)) * (SHARED_GATE / g)
    F = nb * BLOCK
    return [
        _router(src, seed, i, E),
        Tensor(p + "ffn_gate_exps.weight", src.info(p + "ffn_gate.weight").qtype, (E, F, src.d),
               gate_up(p + "ffn_gate.weight")),
        Tensor(p + "ffn_up_exps.weight", src.info(p + "ffn_up.weight").qtype, (E, F, src.d),
               gate_up(p + "ffn_up.weight")),
        Tensor(p + "ffn_down_exps.weight", down.qtype, (E, src.d, F), routed_down),
        Tensor(p + "ffn_gate_inp_shexp.weight", QT.F32, (src.d,), lambda: s.astype(np.float32)),
        _copy(src, p + "ffn_gate.weight", p + "ffn_gate_shexp.weight"),
        _copy(src, p + "ffn_up.weight", p + "ffn_up_shexp.weight"),
        _copy(src, p + "ffn_down.weight", p + "ffn_down_shexp.weight", lambda r: scale_blocks(r, down.qtype, 2.0)),
    ]


def mixtral_ffn(src: Source, seed: int, i: int) -> list[Tensor]:
    """4 experts, each the whole dense FFN with its down blocks scaled by 1 +- DELTA."""
    p = f"blk.{i}."
    E, delta = MIXTRAL["n_expert"], MIXTRAL["delta"]
    n_blocks = src.ff // BLOCK
    signs = np.where(_words(seed, i, _SIGNS, E * n_blocks) & np.uint64(1), 1.0, -1.0).reshape(E, n_blocks)
    down = src.info(p + "ffn_down.weight")

    def experts(name):
        return lambda: np.broadcast_to(src.rows(name), (E, *src.rows(name).shape))

    def routed_down():
        r = src.rows(p + "ffn_down.weight")
        return np.stack([scale_blocks(r, down.qtype, (1.0 + delta * signs[e])[None, :]) for e in range(E)])

    return [
        _router(src, seed, i, E),
        Tensor(p + "ffn_gate_exps.weight", src.info(p + "ffn_gate.weight").qtype, (E, src.ff, src.d),
               experts(p + "ffn_gate.weight")),
        Tensor(p + "ffn_up_exps.weight", src.info(p + "ffn_up.weight").qtype, (E, src.ff, src.d),
               experts(p + "ffn_up.weight")),
        Tensor(p + "ffn_down_exps.weight", down.qtype, (E, src.d, src.ff), routed_down),
    ]


def plan(src: Source, arch: str, seed: int) -> list[Tensor]:
    """Every output tensor in the source's order, each dense FFN replaced by the MoE one."""
    out = []
    ffn_of = {"qwen2moe": qwen2moe_ffn, "llama": mixtral_ffn}[arch]
    done = set()
    for name in src.h.tensors:
        if name.startswith("blk."):
            i, base = name[4:].split(".", 1)
            i = int(i)
            if base in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"):
                if i not in done:
                    out += ffn_of(src, seed, i)
                    done.add(i)
                continue
            if arch == "llama" and base in ("attn_q.weight", "attn_k.weight"):
                out.append(_copy(src, name, transform=lambda r: neox_to_norm_rows(r, src.head_dim)))
                continue
            if arch == "llama" and base in ("attn_q.bias", "attn_k.bias"):
                out.append(_copy(src, name, transform=lambda r: neox_to_norm_rows(r.reshape(-1).view(np.float32),
                                                                                  src.head_dim)))
                continue
        out.append(_copy(src, name))
    return out


def derive(source: str, out_path: str, arch: str, seed: int = 0, log=None) -> str:
    """Write the derived file; returns its SHA-256 (hex)."""
    if arch not in ("qwen2moe", "llama"):
        raise DeriveError(f"--arch {arch!r}: derivable are 'qwen2moe' and 'llama' (Mixtral-style); qwen3moe is "
                          f"not (see this script's docstring)")
    t0 = time.time()
    src = Source(source)
    kv = kv_entries(source)
    tensors = plan(src, arch, seed)
    tmp = out_path + ".partial"
    try:
        sha = _write(src, kv, tensors, tmp, arch)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.replace(tmp, out_path)
    if log:
        log(f"make_moe_from_dense: wrote {out_path} ({arch}, {os.path.getsize(out_path) / 2**20:.0f} MiB, "
            f"{len(tensors)} tensors) in {time.time() - t0:.1f} s")
    return sha


def _write(src: Source, kv: dict, tensors: list[Tensor], tmp: str, arch: str) -> str:
    """Write the GGUF to ``tmp`` (metadata, tensor infos, then one tensor at a time), check
    the copied metadata, return the SHA-256 of the file."""
    w = gguf.GGUFWriter(tmp, arch)
    renamed = copy_metadata(w, src, kv, arch)
    if arch == "qwen2moe":
        w.add_expert_count(QWEN2MOE["n_expert"])
        w.add_expert_used_count(QWEN2MOE["k"])
        w.add_expert_feed_forward_length(QWEN2MOE["blocks"] * BLOCK)
        w.add_expert_shared_feed_forward_length(src.ff)
    else:
        w.add_expert_count(MIXTRAL["n_expert"])
        w.add_expert_used_count(MIXTRAL["k"])
    for t in tensors:
        block, ts = gguf.GGML_QUANT_SIZES[t.qtype]
        if t.qtype == QT.F32:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes)
        else:
            w.add_tensor_info(t.name, (*t.shape[:-1], t.shape[-1] // block * ts), np.dtype(np.uint8), t.nbytes,
                              raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        data = np.ascontiguousarray(t.make())
        if data.nbytes != t.nbytes:
            raise DeriveError(f"internal: tensor '{t.name}' made {data.nbytes} bytes, expected {t.nbytes}")
        w.write_tensor_data(data)
    w.close()
    check_metadata(tmp, kv, renamed)
    h = hashlib.sha256()
    with open(tmp, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_source(spec: str) -> str:
    if os.path.isfile(spec):
        return spec
    from tp_numa import model_registry

    if not model_registry.is_short_name(spec):
        raise DeriveError(f"--source {spec!r}: neither a file nor a known model name")
    return str(model_registry.resolve(spec))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--arch", default="qwen2moe", choices=["qwen2moe", "llama"],
                    help="qwen2moe (shared + routed experts) or llama (Mixtral-style experts)")
    ap.add_argument("--source", default="qwen2.5-coder-0.5b", help="the dense qwen2 GGUF (path or model name)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        sha = derive(resolve_source(args.source), args.out, args.arch, args.seed,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    except (DeriveError, TpNumaError) as e:
        print(f"make_moe_from_dense: error: {e}", file=sys.stderr)
        return 1
    print(f"sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
