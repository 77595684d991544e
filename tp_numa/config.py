"""Model and parallel configuration.

``ModelConfig.from_gguf`` reads the hyperparameters llama.cpp reads for the supported
architectures (keys ``{arch}.*``) and fills in the per-architecture constants llama.cpp
hard-codes (rope style, gemma3's local rope base and sliding-window pattern). Every value
is validated as it is read (``tp_numa/hparams.py``): a bad one fails with one line naming
the file, the key and the value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import hparams as hp
from .errors import ModelFormatError, UnsupportedError
from .gguf_loader import GGUFFile
from .moe_config import MoEConfig

# llama.cpp's rope type per architecture: NORM rotates adjacent pairs (x[2i], x[2i+1]),
# NEOX rotates halves (x[i], x[i + d/2]). The llama converter permutes q/k so that NORM
# applies; qwen2/qwen3/gemma3 keep the HF layout and use NEOX.
ROPE_STYLE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox", "gemma3": "neox",
              "qwen2moe": "neox", "qwen3moe": "neox", "olmoe": "neox"}

# gemma3: local (sliding-window) layers use rope base 10000, and every 6th layer
# (il % 6 == 5) is global (llama.cpp: set_swa_pattern(6), rope_freq_base_train_swa).
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_SWA_PATTERN = 6

# Architectures whose llama.cpp graph applies {arch}.final_logit_softcapping (gemma3 reads it,
# default off; llama, qwen2 and qwen3 never read it). No supported architecture applies
# {arch}.attn_logit_softcapping (llama.cpp: gemma2 and grok only); one listed here would be
# refused, as tp_numa's attention has no soft-capping.
FINAL_LOGIT_SOFTCAP_ARCHS = frozenset({"gemma3"})
ATTN_LOGIT_SOFTCAP_ARCHS: frozenset = frozenset()


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
    qk_norm_full: bool = False       # olmoe: q/k RMSNorm over all heads at once, not per head
    o_bias: bool = False             # attn_output.bias (llama)
    ffn_bias: bool = False           # ffn_{gate,up,down}.bias of dense FFNs (llama)
    sandwich_norms: bool = False     # gemma3: post-attention and pre/post-FFN norms
    ffn_act: str = "silu"            # "silu" | "gelu_tanh"
    embed_scale: float = 1.0
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    moe: MoEConfig | None = None     # mixture-of-experts layers (moe_config.py)

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

        def count(key: str, default=None, minimum: int = 1) -> int:
            """An integer >= minimum; required when there is no default."""
            return hp.count(f, f"{arch}.{key}", req(key) if default is None else opt(key, default), minimum=minimum)

        def bad(what: str) -> ModelFormatError:
            return ModelFormatError(f"{f.path}: metadata {what}")

        layout = hp.LAYOUTS.get(arch)
        n_layers = count("block_count")
        d_model = count("embedding_length")
        n_heads = count("attention.head_count")
        n_kv = count("attention.head_count_kv", n_heads)
        if opt("attention.key_length") is None and d_model % n_heads:
            raise bad(f"'{arch}.embedding_length' = {d_model} is not a multiple of '{arch}.attention.head_count' = "
                      f"{n_heads} (and there is no '{arch}.attention.key_length')")
        head_dim = count("attention.key_length", d_model // n_heads)
        value_dim = count("attention.value_length", head_dim)
        if value_dim != head_dim:
            raise bad(f"'{arch}.attention.value_length' = {value_dim} differs from '{arch}.attention.key_length' = "
                      f"{head_dim}")
        if n_heads % n_kv != 0:
            raise bad(f"'{arch}.attention.head_count' = {n_heads} is not a multiple of "
                      f"'{arch}.attention.head_count_kv' = {n_kv}")
        rope_dim = count("rope.dimension_count", head_dim)
        if layout is not None and layout.full_rope and rope_dim != head_dim:
            raise bad(f"'{arch}.rope.dimension_count' = {rope_dim} must equal '{arch}.attention.key_length' = "
                      f"{head_dim} in {arch} models")
        if rope_dim > head_dim or rope_dim % 2:
            raise bad(f"'{arch}.rope.dimension_count' = {rope_dim} must be even and at most "
                      f"'{arch}.attention.key_length' = {head_dim}")
        emb = f.info("token_embd.weight")
        if len(emb.shape) != 2 or emb.shape[0] < 1:
            raise ModelFormatError(f"{f.path}: tensor 'token_embd.weight' has shape {list(emb.shape)}, "
                                   f"expected [vocabulary, {d_model}] ('{arch}.embedding_length')")
        vocab = emb.shape[0]
        final_softcap = attn_softcap = None
        if arch in FINAL_LOGIT_SOFTCAP_ARCHS:
            final_softcap = hp.softcap(f, f"{arch}.final_logit_softcapping", opt("final_logit_softcapping"))
        if arch in ATTN_LOGIT_SOFTCAP_ARCHS and hp.softcap(f, f"{arch}.attn_logit_softcapping",
                                                           opt("attn_logit_softcapping")) is not None:
            raise UnsupportedError(f"{f.path}: metadata '{arch}.attn_logit_softcapping': attention logit "
                                   f"soft-capping is not supported")
        cfg = cls(
            arch=arch,
            n_layers=n_layers,
            d_model=d_model,
            ffn_dim=count("feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=vocab,
            context_length=count("context_length", 4096),
            norm_eps=hp.real(f, f"{arch}.attention.layer_norm_rms_epsilon", req("attention.layer_norm_rms_epsilon"),
                             high=1.0),
            rope_base=hp.real(f, f"{arch}.rope.freq_base", opt("rope.freq_base", 10000.0)),
            rope_style=ROPE_STYLE[arch],
            rope_dim=rope_dim,
            rope_scale=hp.rope_scale(f, arch),
            attn_scale=1.0 / math.sqrt(head_dim),
            tied_output=not f.has("output.weight"),
            qkv_bias=f.has("blk.0.attn_q.bias"),
            qk_norm=layout.qk_norm if layout is not None else f.has("blk.0.attn_q_norm.weight"),
            final_logit_softcap=final_softcap,
            attn_logit_softcap=attn_softcap,
        )
        if arch == "gemma3":
            cfg.sandwich_norms = True
            cfg.ffn_act = "gelu_tanh"
            cfg.embed_scale = math.sqrt(d_model)
            cfg.rope_base_local = hp.real(f, f"{arch}.rope.freq_base_swa",
                                          opt("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))
            # llama.cpp: sliding-window layers only when the window is present and > 0
            cfg.sliding_window = count("attention.sliding_window", 0, minimum=0) or None
            sliding = hp.gemma3_sliding_layers(f, f"{arch}.attention.sliding_window_pattern",
                                               opt("attention.sliding_window_pattern"), n_layers)
            if sliding is None:
                sliding = [i % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1 for i in range(n_layers)]
            cfg.layer_sliding = sliding
            if cfg.sliding_window is None:
                cfg.layer_sliding = [False] * n_layers
            if n_layers == 62:
                # gemma3-27B scales queries by 1/sqrt(d_model / n_heads) (llama.cpp does the same)
                cfg.attn_scale = 1.0 / math.sqrt(d_model / n_heads)
        cfg.qk_norm_full = arch == "olmoe"
        cfg.o_bias = f.has("blk.0.attn_output.bias")
        cfg.ffn_bias = f.has("blk.0.ffn_gate.bias")
        cfg.moe = MoEConfig.from_gguf(f, arch, n_layers)
        hp.check_tensors(f, cfg)
        return cfg


@dataclass
class ParallelConfig:
    """Tensor-parallel shape of the run: this rank's index and the number of ranks."""

    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def from_state(cls, state) -> "ParallelConfig":
        return cls(tp_rank=state.tp_rank, tp_size=state.tp_size)
