#!/usr/bin/env python3
"""Writes a benchmark GGUF in the shape of Qwen3-30B-A3B (qwen3moe) with fewer layers.

    .venv/bin/python scripts/make_moe_bench_model.py OUT.gguf [--layers 12] [--seed 0]

Shape per layer as Qwen3-30B-A3B: d 2048, 32 query / 4 KV heads of 128, 128 experts of
768 features, top-8, renormalised weights; vocabulary 151936 (the shipped
Qwen2.5-Coder-0.5B's tokenizer, which Qwen3 shares, so llama.cpp and tp-numa both load
it). Types follow llama.cpp's Q4_K_M mix: Q4_K for attention q/k/o, the experts' gate/up
and the token embedding; Q6_K for attention v, the output head and ffn_down_exps of the
"more bits" layers (first and last eighth, every third in between), Q4_K for the other
down projections; F32 router and norms. Weights are random blocks with small finite
scales: enough to measure speed (every byte is read as in a real model) and routing
spreads over the experts like a trained router's. Not for text.

Data is streamed to the file tensor by tensor (a 12-layer file is ~5 GB), with progress.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

D, HEADS, KV, HEAD_DIM, EXPERTS, TOPK, EXPERT_FF, VOCAB = 2048, 32, 4, 128, 128, 8, 768, 151936
# byte offsets of the f16 scale fields per block
SCALES = {QT.Q4_K: (0, 2), QT.Q6_K: (208,)}


def random_blocks(rng, shape: tuple[int, ...], qtype: QT) -> np.ndarray:
    """uint8 [..., row_bytes] of random blocks whose f16 scales are small and finite."""
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    *outer, k = shape
    raw = rng.integers(0, 256, (*outer, k // block, tsize), dtype=np.uint8)
    for off in SCALES[qtype]:
        scale = (rng.random(raw.shape[:-1], dtype=np.float32) * 2e-3 + 1e-4).astype(np.float16)
        raw[..., off:off + 2] = scale.view(np.uint8).reshape(*raw.shape[:-1], 2)
    return raw.reshape(*outer, -1)


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits(i, n): the first and last eighth and every third layer."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_plan(n_layers: int) -> list[tuple[str, tuple[int, ...], QT | None]]:
    """(name, torch-order shape, type or None for F32) of every tensor, in file order."""
    out = [("token_embd.weight", (VOCAB, D), QT.Q4_K), ("output_norm.weight", (D,), None),
           ("output.weight", (VOCAB, D), QT.Q6_K)]
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (D,), None),
            (p + "attn_q.weight", (HEADS * HEAD_DIM, D), QT.Q4_K),
            (p + "attn_k.weight", (KV * HEAD_DIM, D), QT.Q4_K),
            (p + "attn_v.weight", (KV * HEAD_DIM, D), QT.Q6_K),
            (p + "attn_q_norm.weight", (HEAD_DIM,), None),
            (p + "attn_k_norm.weight", (HEAD_DIM,), None),
            (p + "attn_output.weight", (D, HEADS * HEAD_DIM), QT.Q4_K),
            (p + "ffn_norm.weight", (D,), None),
            (p + "ffn_gate_inp.weight", (EXPERTS, D), None),
            (p + "ffn_gate_exps.weight", (EXPERTS, EXPERT_FF, D), QT.Q4_K),
            (p + "ffn_up_exps.weight", (EXPERTS, EXPERT_FF, D), QT.Q4_K),
            (p + "ffn_down_exps.weight", (EXPERTS, D, EXPERT_FF), QT.Q6_K if more_bits(i, n_layers) else QT.Q4_K),
        ]
    return out


def tensor_data(rng, name: str, shape: tuple[int, ...], qtype: QT | None) -> np.ndarray:
    if qtype is not None:
        return random_blocks(rng, shape, qtype)
    if len(shape) == 1:   # norms near 1
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(shape[-1]) * 4).astype(np.float32)   # router


def copy_tokenizer(w: gguf.GGUFWriter) -> None:
    """The shipped Qwen2.5-Coder-0.5B's tokenizer (Qwen3's vocabulary of 151936 ids)."""
    from tp_numa.gguf_loader import read_header
    from tp_numa.model_registry import resolve

    meta = read_header(resolve("qwen2.5-coder-0.5b")).meta
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta.get("tokenizer.ggml.pre", "qwen2"))
    w.add_token_list(list(meta["tokenizer.ggml.tokens"]))
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(list(meta["tokenizer.ggml.merges"]))
    for key, add in (("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
                     ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                     ("tokenizer.ggml.padding_token_id", w.add_pad_token_id)):
        if key in meta:
            add(int(meta[key]))
    w.add_add_bos_token(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--layers", type=int, default=12, help="decoder layers (Qwen3-30B-A3B has 48; default 12)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.layers < 1:
        raise SystemExit("make_moe_bench_model: --layers must be >= 1")
    rng = np.random.default_rng(args.seed)
    w = gguf.GGUFWriter(args.out, "qwen3moe")
    w.add_name(f"Qwen3-30B-A3B-shaped benchmark model ({args.layers} layers, random Q4_K_M-mix blocks)")
    w.add_block_count(args.layers)
    w.add_context_length(40960)
    w.add_embedding_length(D)
    w.add_feed_forward_length(6144)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(TOPK)
    w.add_expert_feed_forward_length(EXPERT_FF)
    copy_tokenizer(w)
    plan = tensor_plan(args.layers)
    for name, shape, qtype in plan:
        if qtype is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            block, tsize = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * tsize
            *outer, k = shape
            w.add_tensor_info(name, (*outer, k // block * tsize), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(int(np.prod(s)) for _, s, _ in plan)
    done, t0 = 0, time.time()
    for name, shape, qtype in plan:
        w.write_tensor_data(tensor_data(rng, name, shape, qtype))
        done += int(np.prod(shape))
        if name.endswith("ffn_down_exps.weight") or name == "output.weight":
            print(f"make_moe_bench_model: {done / total:6.1%} ({name}, {time.time() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    w.close()
    print(f"make_moe_bench_model: wrote {args.out} ({os.path.getsize(args.out) / 2**30:.2f} GiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
