"""Qwen2 / Qwen2.5: the llama decoder with a bias on q, k and v.

Differences from llama.py, all carried by ModelConfig (read from the GGUF):
- ``qkv_bias``: ``attn_q.bias`` / ``attn_k.bias`` / ``attn_v.bias`` exist; each rank
  holds the bias entries of its own heads (split like the weight rows);
- RoPE in the NEOX layout (halves), base from ``qwen2.rope.freq_base`` (1e6 for 2.5).
"""
from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Same modules and forward as LlamaForCausalLM (see its docstring)."""


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """qwen2moe (Qwen1.5-MoE, Qwen2-57B-A14B): qwen2's attention (qkv bias), and in every
    layer a MoE FFN: softmax router, top-k weights not renormalised, plus a shared expert
    whose output is scaled by ``sigmoid(ffn_gate_inp_shexp . x)`` (ModelConfig.moe)."""
