"""GGUF loader: validation errors name the file/tensor; rank slices equal the oracle
(gguf.quants.dequantize of the whole tensor, then sliced)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from synthetic_gguf import Spec, read_float_weights, write_model
from tp_numa.config import ModelConfig
from tp_numa.errors import ModelFormatError, TpNumaError, UnsupportedError
from tp_numa.gguf_loader import open_gguf
from tp_numa.models import load_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    spec = Spec(arch="qwen2", types={"blk.1.ffn_down.weight": QT.Q6_K, "blk.0.attn_q.weight": QT.Q4_0},
                ffn=512, down_type=QT.Q4_0)
    return write_model(tmp_path_factory.mktemp("loader") / "m.gguf", spec)


def test_metadata_and_tensor_infos(model_file):
    f = open_gguf(model_file)
    assert f.arch == "qwen2"
    assert f.metadata("qwen2.embedding_length") == 128
    info = f.info("blk.0.ffn_gate.weight")
    assert info.shape == (512, 128) and info.qtype == QT.Q8_0
    assert info.row_bytes == 128 // 32 * 34
    cfg = ModelConfig.from_gguf(f)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size) == (6, 2, 32, 512, 301)
    assert cfg.qkv_bias and not cfg.tied_output and cfg.rope_style == "neox"


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_down.weight",
                                  "token_embd.weight", "blk.0.attn_v.weight"])
def test_row_and_block_slices_equal_oracle(model_file, name):
    f = open_gguf(model_file)
    info = f.info(name)
    full = read_float_weights(model_file)[name]
    r0, r1 = 3, info.n_rows - 5
    rows = f.read_rows(name, r0, r1)
    assert rows.dtype == torch.uint8 and rows.is_contiguous()
    np.testing.assert_array_equal(dequantize(rows.numpy(), info.qtype).reshape(r1 - r0, -1), full[r0:r1])
    bs = info.block_size if info.block_size > 1 else 32
    nb = info.n_cols // bs
    b0, b1 = nb // 3, nb
    cols = f.read_block_cols(name, b0 * bs // info.block_size, b1 * bs // info.block_size)
    assert cols.is_contiguous() and cols.shape[0] == info.n_rows
    np.testing.assert_array_equal(dequantize(cols.numpy(), info.qtype).reshape(info.n_rows, -1),
                                  full[:, b0 * bs: b1 * bs])
    # only the slices were copied out of the file
    assert f.loaded_bytes[name] == rows.numel() + cols.numel()


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="not found.*nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFormatError, match=r"x.gguf: not a GGUF file \(bad magic"):
        open_gguf(p)


def test_truncated_file_names_tensor(tmp_path, model_file):
    data = model_file.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFormatError) as e:
        open_gguf(p)
    assert "cut.gguf" in str(e.value) and "truncated" in str(e.value) and "tensor '" in str(e.value)
    # cut inside the header
    p.write_bytes(data[:200])
    with pytest.raises(ModelFormatError, match="truncated"):
        open_gguf(p)


def test_unknown_architecture(tmp_path):
    p = write_model(tmp_path / "mamba.gguf", Spec(arch="mamba"))
    with pytest.raises(UnsupportedError, match="architecture 'mamba' is not supported"):
        load_model(p)


def test_missing_tensor(tmp_path):
    p = write_model(tmp_path / "m.gguf", Spec(drop=("blk.1.ffn_up.weight",)))
    with pytest.raises(ModelFormatError, match=r"m.gguf: tensor 'blk.1.ffn_up.weight' is missing"):
        load_model(p)


def test_unsupported_tensor_type(tmp_path):
    p = write_model(tmp_path / "m.gguf", Spec(types={"blk.0.attn_k.weight": QT.Q2_K}, d_model=256))
    with pytest.raises(UnsupportedError, match=r"tensor 'blk.0.attn_k.weight' has type Q2_K"):
        load_model(p)


def test_errors_are_tp_numa_errors():
    assert issubclass(ModelFormatError, TpNumaError) and issubclass(UnsupportedError, TpNumaError)
