"""Parallel layers at world size 1, against gguf.quants.dequantize + a float matmul.

Every rank's shard is built in this one process (tp_size=1 so nothing is reduced): the
shards' outputs concatenated (column-parallel) or summed (row-parallel) must equal the
full layer. Quantized weights multiply through the native op, which quantizes the
activations to 8-bit blocks, hence the relative tolerance below.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from synthetic_gguf import Spec, _rope, read_float_weights, write_model
from tp_numa.gguf_loader import open_gguf
from tp_numa.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tp_numa.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   RowParallelLinear)
from tp_numa.layers.norm import RMSNorm
from tp_numa.layers.partition import partition_blocks, partition_heads, partition_rows
from tp_numa.layers.rotary import RotaryEmbedding

REL_TOL = 0.02   # 8-bit activation blocks (see docs/kernels.md)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    spec = Spec(arch="qwen2", ffn=768, types={"blk.0.ffn_down.weight": QT.Q6_K, "blk.1.ffn_down.weight": QT.Q4_K,
                                              "blk.1.attn_output.weight": QT.Q5_0})
    path = write_model(tmp_path_factory.mktemp("layers") / "m.gguf", spec)
    return open_gguf(path), read_float_weights(path), spec


def _close(ours: torch.Tensor, ref: np.ndarray, tol: float = REL_TOL) -> None:
    err = np.abs(ours.double().numpy() - ref).max() / (np.abs(ref).max() + 1e-12)
    assert err < tol, err


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.1.attn_output.weight"])
def test_row_parallel_shards_sum_to_full(gguf_file, tp, name):
    f, W, _ = gguf_file
    info = f.info(name)
    x = torch.randn(3, info.n_cols)
    total = torch.zeros(3, info.shape[0], dtype=torch.float64)
    for k0, k1 in partition_blocks(name, info.n_cols, info.block_size, tp):
        layer = RowParallelLinear(info.n_cols, info.shape[0], in_range=(k0, k1), tp_size=1)
        layer.load_gguf(f, name)
        total += layer(x[:, k0:k1].contiguous()).double()
    _close(total, x.double().numpy() @ W[name].T)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_merged_column_gate_up(gguf_file, tp):
    f, W, spec = gguf_file
    names = ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"]
    x = torch.randn(2, spec.d_model)
    parts = []
    for r in partition_blocks("blk.0.ffn_down.weight", spec.ffn, 256, tp):
        layer = MergedColumnParallelLinear(spec.d_model, [spec.ffn, spec.ffn], [r, r])
        layer.load_gguf(f, names)
        assert layer._runs == ["weight"]          # same type: one fused matmul
        gate, up = layer(x).split(layer.local_sizes, dim=1)
        parts.append((gate, up))
    gate = torch.cat([g for g, _ in parts], 1)
    up = torch.cat([u for _, u in parts], 1)
    _close(gate, x.double().numpy() @ W[names[0]].T)
    _close(up, x.double().numpy() @ W[names[1]].T)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_qkv_heads_and_bias(gguf_file, tp):
    f, W, spec = gguf_file
    hd = spec.head_dim
    x = torch.randn(2, spec.d_model)
    xr = x.double().numpy()
    p = "blk.0."
    q_ref = xr @ W[p + "attn_q.weight"].T + W[p + "attn_q.bias"]
    k_ref = xr @ W[p + "attn_k.weight"].T + W[p + "attn_k.bias"]
    v_ref = xr @ W[p + "attn_v.weight"].T + W[p + "attn_v.bias"]
    for shard in partition_heads(p + "attn_output.weight", spec.n_heads, spec.n_kv, tp):
        layer = QKVParallelLinear(spec.d_model, hd, spec.n_heads, spec.n_kv, shard, bias=True)
        layer.load_gguf(f, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
                        [p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias"])
        q, k, v = layer.split(layer(x))
        assert q.shape == (2, shard.n_q, hd) and k.shape == v.shape == (2, shard.n_kv, hd)
        _close(q.reshape(2, -1), q_ref[:, shard.q[0] * hd: shard.q[1] * hd])
        _close(k.reshape(2, -1), k_ref[:, shard.kv[0] * hd: shard.kv[1] * hd])
        _close(v.reshape(2, -1), v_ref[:, shard.kv[0] * hd: shard.kv[1] * hd])


def test_column_parallel_single(gguf_file):
    f, W, spec = gguf_file
    name = "blk.1.attn_q.weight"
    layer = ColumnParallelLinear(spec.d_model, spec.n_heads * spec.head_dim, out_range=(32, 96), bias=True)
    layer.load_gguf(f, name, "blk.1.attn_q.bias")
    x = torch.randn(4, spec.d_model)
    _close(layer(x), x.double().numpy() @ W[name][32:96].T + W["blk.1.attn_q.bias"][32:96])


@pytest.mark.parametrize("tp", [1, 3])
def test_vocab_parallel_embedding_and_head(gguf_file, tp):
    f, W, spec = gguf_file
    tokens = torch.tensor([0, 5, 300, 150, 5, 77])
    emb_sum = torch.zeros(len(tokens), spec.d_model, dtype=torch.float64)
    h = torch.randn(2, spec.d_model)
    logits, tied_logits = [], []
    for r in partition_rows("token_embd.weight", spec.vocab, tp):
        emb = VocabParallelEmbedding(spec.vocab, spec.d_model, r, tp_size=1)
        emb.load_gguf(f, "token_embd.weight")
        before = emb(tokens)                      # zeros outside this rank's rows
        emb_sum += before.double()
        head = ParallelLMHead(spec.vocab, spec.d_model, r, tp_size=1)
        head.load_gguf(f, "output.weight")
        logits.append(head(h))
        tied = ParallelLMHead(spec.vocab, spec.d_model, r, tp_size=1)
        tied.tie_weights(emb)                     # Q8_0: repacks the embedding (x4 layout)
        assert emb.packed_rows == r[1] - r[0]
        assert tied.weight.data_ptr() == emb.weight.data_ptr()   # no second copy
        assert torch.equal(emb(tokens), before)   # lookups unpack the packed groups
        tied_logits.append(tied(h))
    # embedding rows are dequantized exactly
    np.testing.assert_allclose(emb_sum.numpy(), W["token_embd.weight"][tokens.numpy()], rtol=1e-6, atol=1e-6)
    _close(torch.cat(logits, 1), h.double().numpy() @ W["output.weight"].T)
    _close(torch.cat(tied_logits, 1), h.double().numpy() @ W["token_embd.weight"].T)


def test_rmsnorm(gguf_file):
    f, W, spec = gguf_file
    n = RMSNorm(spec.d_model, spec.eps)
    n.load_gguf(f, "output_norm.weight")
    x = torch.randn(3, spec.d_model)
    xr = x.double().numpy()
    ref = xr / np.sqrt((xr ** 2).mean(-1, keepdims=True) + spec.eps) * W["output_norm.weight"]
    np.testing.assert_allclose(n(x).numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["norm", "neox"])
def test_rotary_layouts(style):
    T, H, D, base = 5, 3, 16, 10000.0
    x = torch.randn(T, H, D)
    rope = RotaryEmbedding(D, base, style)
    start = 7
    cos, sin = rope.cos_sin(start, T)
    ours = rope(x, cos, sin).double().numpy()
    ref = _rope(x.double().numpy(), np.arange(start, start + T, dtype=np.float64), base, style == "neox")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # position 0 is the identity; rotation keeps each pair's norm
    c0, s0 = rope.cos_sin(0, 1)
    torch.testing.assert_close(rope(x[:1], c0, s0), x[:1])
    assert math.isclose(float(torch.linalg.norm(torch.tensor(ours))), float(torch.linalg.norm(x.double())),
                        rel_tol=1e-5)


def test_partial_rotary_and_scale():
    x = torch.randn(2, 1, 8)
    rope = RotaryEmbedding(4, 100.0, "neox", scale=2.0)
    cos, sin = rope.cos_sin(6, 2)
    y = rope(x, cos, sin)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])      # dims past rope_dim untouched
    ref = _rope(x[..., :4].double().numpy(), np.array([3.0, 3.5]), 100.0, True)   # positions / scale
    np.testing.assert_allclose(y[..., :4].numpy(), ref, rtol=1e-5, atol=1e-5)
