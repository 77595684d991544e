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
