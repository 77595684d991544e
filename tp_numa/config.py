"""Model and parallel configuration.

``ModelConfig.from_gguf`` reads the hyperparameters llama.cpp reads for the supported
architectures (keys ``{arch}.*``) and fills in the per-architecture constants llama.cpp
hard-codes (rope style, gemma3's local rope base and sliding-window pattern).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ModelFormatError
from .gguf_loader import GGUFFile

# llama.cpp's rope type per architecture: NORM rotates adjacent pairs (x[2i], x[2i+1]),
# NEOX rotates halves (x[i], x[i + d/2]). The llama converter permutes q/k so that NORM
# applies; qwen2/qwen3/gemma3 keep the HF layout and use NEOX.
ROPE_STYLE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox", "gemma3": "neox"}

# gemma3: local (sliding-window) layers use rope base 10000, and every 6th layer
# (il % 6 == 5) is global (llama.cpp: set_swa_pattern(6), rope_freq_base_train_swa).
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_SWA_PATTERN = 6


@dataclass
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int               # key_length
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float            # global layers
    rope_style: str             # "norm" | "neox"
    rope_dim: int               # rotated dims per head (rope.dimension_count)
    rope_scale: float = 1.0     # linear position scaling (positions / factor) on global layers
    rope_base_local: float | None = None      # sliding-window layers (gemma3)
    sliding_window: int | None = None
    layer_sliding: list[bool] = field(default_factory=list)
    attn_scale: float = 0.0
    tied_output: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False     # gemma3: post-attention and pre/post-FFN norms
    ffn_act: str = "silu"            # "silu" | "gelu_tanh"
    embed_scale: float = 1.0
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None

    def rope_base_for(self, layer: int) -> float:
        if self.layer_sliding and self.layer_sliding[layer] and self.rope_base_local is not None:
            return self.rope_base_local
        return self.rope_base

    def rope_scale_for(self, layer: int) -> float:
        return 1.0 if (self.layer_sliding and self.layer_sliding[layer]) else self.rope_scale

    def window_for(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_sliding and self.layer_sliding[layer] else None

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelConfig":
        arch = f.check_arch()

        def req(key: str):
            return f.require(f"{arch}.{key}")

        def opt(key: str, default=None):
            return f.metadata(f"{arch}.{key}", default)

        n_layers = int(req("block_count"))
        d_model = int(req("embedding_length"))
        n_heads = int(req("attention.head_count"))
        n_kv = opt("attention.head_count_kv", n_heads)
        if isinstance(n_kv, list):
            raise ModelFormatError(f"{f.path}: per-layer head_count_kv is not supported")
        n_kv = int(n_kv)
        head_dim = int(opt("attention.key_length", d_model // n_heads))
        value_dim = int(opt("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise ModelFormatError(f"{f.path}: key_length {head_dim} != value_length {value_dim}")
        if n_heads % n_kv != 0:
            raise ModelFormatError(f"{f.path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
        vocab = f.info("token_embd.weight").shape[0]
        scaling = opt("rope.scaling.type")
        rope_scale = 1.0
        if scaling == "linear":
            rope_scale = float(opt("rope.scaling.factor", 1.0))
        cfg = cls(
            arch=arch,
            n_layers=n_layers,
            d_model=d_model,
            ffn_dim=int(req("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=vocab,
            context_length=int(opt("context_length", 4096)),
            norm_eps=float(req("attention.layer_norm_rms_epsilon")),
            rope_base=float(opt("rope.freq_base", 10000.0)),
            rope_style=ROPE_STYLE[arch],
            rope_dim=int(opt("rope.dimension_count", head_dim)),
            rope_scale=rope_scale,
            attn_scale=1.0 / math.sqrt(head_dim),
            tied_output=not f.has("output.weight"),
            qkv_bias=f.has("blk.0.attn_q.bias"),
            qk_norm=f.has("blk.0.attn_q_norm.weight"),
            final_logit_softcap=opt("final_logit_softcapping"),
            attn_logit_softcap=opt("attn_logit_softcapping"),
        )
        if cfg.final_logit_softcap is not None:
            cfg.final_logit_softcap = float(cfg.final_logit_softcap)
        if cfg.attn_logit_softcap is not None:
            cfg.attn_logit_softcap = float(cfg.attn_logit_softcap)
        if arch == "gemma3":
            cfg.sandwich_norms = True
            cfg.ffn_act = "gelu_tanh"
            cfg.embed_scale = math.sqrt(d_model)
            cfg.rope_base_local = GEMMA3_LOCAL_ROPE_BASE
            window = opt("attention.sliding_window")
            cfg.sliding_window = int(window) if window else None
            pattern = opt("attention.sliding_window_pattern")
            if isinstance(pattern, list) and len(pattern) == n_layers:
                cfg.layer_sliding = [bool(p) for p in pattern]
            else:
                cfg.layer_sliding = [i % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1 for i in range(n_layers)]
            if cfg.sliding_window is None:
                cfg.layer_sliding = [False] * n_layers
            if n_layers == 62:
                # gemma3-27B scales queries by 1/sqrt(d_model / n_heads) (llama.cpp does the same)
                cfg.attn_scale = 1.0 / math.sqrt(d_model / n_heads)
        return cfg


@dataclass
class ParallelConfig:
    """Tensor-parallel shape of the run: this rank's index and the number of ranks."""

    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def from_state(cls, state) -> "ParallelConfig":
        return cls(tp_rank=state.tp_rank, tp_size=state.tp_size)
