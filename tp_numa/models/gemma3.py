"""Gemma 3 (text): llama's attention and MLP inside a "sandwich" block.

Differences from llama.py:
- embeddings scaled by sqrt(d_model);
- four norms per layer, each after or before a sub-block:
      h   = x + post_attention_layernorm(attn(input_layernorm(x)))
      out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
  (GGUF stores gemma's ``1 + w`` norm weights already added, so RMSNorm is plain);
- q/k per-head RMSNorm, RoPE NEOX;
- sliding-window layers (window ``gemma3.attention.sliding_window``, rope base 10000)
  with every 6th layer global (rope base ``gemma3.rope.freq_base``);
- GELU (tanh approximation) gated FFN; output tied to the token embedding;
- queries scaled by 1/sqrt(head_dim).
All of these come from ModelConfig.from_gguf.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import fused_ops
from ..config import ModelConfig
from ..gguf_loader import GGUFFile
from ..layers import fused_path
from ..layers.norm import RMSNorm
from ..layers.partition import LayerPartition
from ..layers.rotary import RotaryEmbedding
from .llama import MLP, DecoderModel, LlamaForCausalLM, SelfAttention


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, part: LayerPartition, rotary: RotaryEmbedding,
                 tp_size: int):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = SelfAttention(cfg, layer_idx, part.heads, rotary, tp_size)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(cfg, part.ffn, tp_size)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def load_gguf(self, f: GGUFFile, prefix: str) -> None:
        self.input_layernorm.load_gguf(f, prefix + "attn_norm.weight")
        self.self_attn.load_gguf(f, prefix)
        self.post_attention_layernorm.load_gguf(f, prefix + "post_attention_norm.weight")
        self.pre_feedforward_layernorm.load_gguf(f, prefix + "ffn_norm.weight")
        self.mlp.load_gguf(f, prefix)
        self.post_feedforward_layernorm.load_gguf(f, prefix + "post_ffw_norm.weight")

    def forward(self, x: torch.Tensor, pos, cos_sin) -> torch.Tensor:
        """x [T, d] -> [T, d]; x itself is left unchanged. ``pos``: int start or SeqBatch."""
        a = self.self_attn(self.input_layernorm(x), pos, cos_sin)         # fresh (T, d)
        post, pre, post_ff = self.post_attention_layernorm, self.pre_feedforward_layernorm, \
            self.post_feedforward_layernorm
        if fused_path.applies(a, x, post.weight, pre.weight):
            # h = x + post(a) into a fresh copy of x (x is the caller's); y = pre(h)
            h = x.clone()
            y = fused_ops.add_rms_norm_(h, a, pre.weight, pre.eps, x_weight=post.weight)
            m = self.mlp(y)
            return h.add_(post_ff(m))
        h = x + post(a)
        return h + post_ff(self.mlp(pre(h)))


class Gemma3Model(DecoderModel):
    layer_class = Gemma3DecoderLayer


class Gemma3ForCausalLM(LlamaForCausalLM):
    model_class = Gemma3Model
