"""Writes small synthetic GGUF files (random weights) with gguf.GGUFWriter.

``write_tiny_llama(path, ...)`` makes a complete, loadable 1-layer llama model with a
tiny SentencePiece-style vocabulary; its knobs break it in exactly one way each (drop a
tensor, give one tensor an unsupported type, name an unknown architecture) for the
error-path tests.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

D, HEADS, KV, FFN, LAYERS = 64, 2, 1, 128, 1
HEAD_DIM = D // HEADS


def _vocab() -> tuple[list[str], list[float], list[int]]:
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
) -> Path:
    """Write the model; ``drop`` omits tensors by name, ``unsupported`` stores that tensor
    as Q8_1 (a GGML type tp_numa does not run), ``arch`` sets general.architecture."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
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
    for i in range(LAYERS):
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
    for name, t in tensors.items():
        if name in drop:
            continue
        if name == unsupported:
            # Q8_1 (blocks of 32 values): a real GGML type that tp_numa does not run.
            # All-zero blocks are valid (every value 0); the loader refuses the type first.
            qtype = gguf.GGMLQuantizationType.Q8_1
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n, k = t.shape
            w.add_tensor(name, np.zeros((n, k // block * type_size), dtype=np.uint8), raw_dtype=qtype)
            continue
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
