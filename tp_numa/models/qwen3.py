"""Qwen3 (dense): the llama decoder with per-head RMSNorm on q and k.

Differences from llama.py, carried by ModelConfig:
- ``qk_norm``: ``self_attn.q_norm`` / ``k_norm`` (``attn_q_norm`` / ``attn_k_norm``,
  weight [head_dim], replicated) normalise each head before RoPE;
- no qkv bias; head_dim from ``qwen3.attention.key_length`` (may differ from d/heads);
- RoPE in the NEOX layout.
"""
from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Same modules and forward as LlamaForCausalLM (see its docstring)."""


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """qwen3moe (Qwen3-30B-A3B, 235B-A22B, Qwen3-Coder-480B): qwen3's attention, and in every
    layer a MoE FFN (``layers.moe.MoE``): softmax router, top-k, the k weights renormalised,
    no shared expert (ModelConfig.moe)."""
