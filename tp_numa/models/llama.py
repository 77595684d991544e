"""Llama-family decoder (Llama 2/3, Mistral), tensor parallel over the ranks.

The same blocks serve qwen2 (qkv bias) and qwen3 (q/k RMSNorm per head), switched by the
ModelConfig flags; gemma3 reuses the attention and MLP with its own layer (gemma3.py).

Per layer, on each rank (T tokens, d = d_model, hd = head_dim, this rank's heads n_q /
n_kv and ffn features f_r):

    h   = x + o_proj(attn(rope(q), rope(k), v))      q,k,v = qkv_proj(input_layernorm(x))
    out = h + down_proj(silu(gate) * up)             gate,up = gate_up_proj(post_attention_layernorm(h))

o_proj and down_proj are row-parallel: their forward ends in the all-reduce that sums
the ranks' partial outputs. Everything else is local to the rank. In a mixture-of-experts
layer (qwen3moe, qwen2moe, Mixtral) the FFN is a ``layers.moe.MoE`` block instead: a
replicated router, this rank's slice of every expert and of the shared expert, and one
all-reduce of their summed partials.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fused_ops
from ..config import ModelConfig
from ..gguf_loader import GGUFFile
from ..layers import fused_path, native_decode
from ..layers.attention import Attention
from ..layers.batch import Positions, SeqBatch
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.moe import MoE
from ..layers.norm import RMSNorm, ShardedRMSNorm
from ..layers.partition import HeadShard, LayerPartition, ModelPartition
from ..layers.rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    """This rank's query heads ``shard.q`` (and KV heads ``shard.kv``) of one layer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: HeadShard, rotary: RotaryEmbedding,
                 tp_size: int):
        super().__init__()
        hd = cfg.head_dim
        self.layer_idx = layer_idx
        self.qkv_proj = QKVParallelLinear(cfg.d_model, hd, cfg.n_heads, cfg.n_kv_heads, shard, bias=cfg.qkv_bias)
        if cfg.qk_norm and cfg.qk_norm_full:
            # olmoe: one norm over all heads; this rank normalises its heads' share, the sum
            # of squares all-reduced (each replicated KV head counted by its owner only)
            group = cfg.n_heads // cfg.n_kv_heads
            own = (max(shard.kv[0], -(-shard.q[0] // group)), min(shard.kv[1], (shard.q[1] - 1) // group + 1))
            self.q_norm = ShardedRMSNorm(cfg.n_heads * hd, (shard.q[0] * hd, shard.q[1] * hd), cfg.norm_eps,
                                         tp_size=tp_size)
            self.k_norm = ShardedRMSNorm(cfg.n_kv_heads * hd, (shard.kv[0] * hd, shard.kv[1] * hd), cfg.norm_eps,
                                         owned=((own[0] - shard.kv[0]) * hd, max(own[0], own[1]) * hd - shard.kv[0] * hd),
                                         tp_size=tp_size)
        elif cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary
        # Local KV head of each local query head. When a rank's query heads straddle KV
        # groups unevenly (e.g. 14 heads / 2 groups at tp=3: heads 5..9 = 2 of group 0 +
        # 3 of group 1) plain GQA indexing does not apply; K/V are then expanded to one
        # head per query head before the cache.
        kv_index = shard.kv_index(cfg.n_heads // cfg.n_kv_heads)
        group = shard.n_q // shard.n_kv if shard.n_q % shard.n_kv == 0 else 0
        uniform = group > 0 and kv_index == [h // group for h in range(shard.n_q)]
        self.register_buffer("kv_expand", None if uniform else torch.tensor(kv_index), persistent=False)
        n_kv_cache = shard.n_kv if uniform else shard.n_q
        self.attn = Attention(shard.n_q, n_kv_cache, hd, cfg.attn_scale, cfg.window_for(layer_idx), layer_idx)
        self.o_proj = RowParallelLinear(cfg.n_heads * hd, cfg.d_model, in_range=(shard.q[0] * hd, shard.q[1] * hd),
                                        tp_size=tp_size, bias=cfg.o_bias)

    def load_gguf(self, f: GGUFFile, prefix: str) -> None:
        bias = [prefix + n for n in ("attn_q.bias", "attn_k.bias", "attn_v.bias")] if self.qkv_proj.has_bias else None
        self.qkv_proj.load_gguf(f, [prefix + "attn_q.weight", prefix + "attn_k.weight", prefix + "attn_v.weight"], bias)
        if self.q_norm is not None:
            self.q_norm.load_gguf(f, prefix + "attn_q_norm.weight")
            self.k_norm.load_gguf(f, prefix + "attn_k_norm.weight")
        self.o_proj.load_gguf(f, prefix + "attn_output.weight", prefix + "attn_output.bias" if self.o_proj.has_bias else None)

    def forward(self, x: torch.Tensor, pos: Positions, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, d] -> [T, d] (summed over ranks by o_proj); ``pos``: the tokens' sequences
        and positions (``layers.batch``), cos_sin [T, rope_dim/2] of those positions."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))     # (T, n_q, hd), (T, n_kv, hd), (T, n_kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)             # per-head RMSNorm over hd
        # in place where possible: q and k are views of the fresh qkv output (or norm outputs)
        q = self.rotary_emb.rotate_(q, *cos_sin)
        k = self.rotary_emb.rotate_(k, *cos_sin)
        if self.kv_expand is not None:
            k, v = k[:, self.kv_expand], v[:, self.kv_expand]   # (T, n_q, hd)
        out = self.attn(q, k, v, pos)                         # (T, n_q * hd)
        return self.o_proj(out)                               # (T, d), all-reduced


class MLP(nn.Module):
    """Gated FFN on this rank's features ``[f0, f1)``: ``down(act(gate) * up)``.

    ``ffn_dim`` defaults to the model's; a MoE layer's shared expert passes its own."""

    def __init__(self, cfg: ModelConfig, ffn_range: tuple[int, int], tp_size: int, ffn_dim: int | None = None,
                 bias: bool = False):
        super().__init__()
        ffn_dim = cfg.ffn_dim if ffn_dim is None else ffn_dim
        self.gate_up_proj = MergedColumnParallelLinear(cfg.d_model, [ffn_dim, ffn_dim], [ffn_range, ffn_range],
                                                       bias=bias)
        self.down_proj = RowParallelLinear(ffn_dim, cfg.d_model, in_range=ffn_range, tp_size=tp_size, bias=bias)
        self.act = cfg.ffn_act
        # act_mul needs [gate | up] halves of equal width (always so: same range of both)
        gs, us = self.gate_up_proj.local_sizes
        self._fusable = gs == us

    def load_gguf(self, f: GGUFFile, prefix: str, suffix: str = "") -> None:
        """Tensors ``ffn_gate{suffix}`` etc. (suffix ``_shexp``: a MoE layer's shared expert)."""
        b = self.down_proj.has_bias
        self.gate_up_proj.load_gguf(f, [prefix + f"ffn_gate{suffix}.weight", prefix + f"ffn_up{suffix}.weight"],
                                    [prefix + f"ffn_gate{suffix}.bias", prefix + f"ffn_up{suffix}.bias"] if b else None)
        self.down_proj.load_gguf(f, prefix + f"ffn_down{suffix}.weight", prefix + f"ffn_down{suffix}.bias" if b else None)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> act(gate) * up [T, f_r], this rank's features."""
        gu = self.gate_up_proj(x)                                # (T, 2 f_r) = [gate | up]
        if self._fusable and fused_path.applies(gu):
            return fused_ops.act_mul(gu, self.act == "gelu_tanh")
        gate, up = torch.split(gu, self.gate_up_proj.local_sizes, dim=1)   # (T, f_r) each
        if self.act == "gelu_tanh":
            return F.gelu(gate, approximate="tanh") * up
        return F.silu(gate) * up

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> float64 [T, d]: this rank's share of the output, not yet summed."""
        return self.down_proj.partial(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d] (summed over ranks by down_proj)."""
        return self.down_proj(self.hidden(x))


def make_ffn(cfg: ModelConfig, part: LayerPartition, tp_size: int) -> nn.Module:
    """The layer's FFN on this rank: a dense MLP, or a MoE block (routed experts + shared
    expert, one all-reduce) when the partition gives the layer experts."""
    if not part.is_moe:
        return MLP(cfg, part.ffn, tp_size, bias=cfg.ffn_bias)
    moe = cfg.moe
    shared = MLP(cfg, part.shared, tp_size, ffn_dim=moe.shared_ff) if part.shared is not None else None
    return MoE(moe, cfg.d_model, part.experts, part.shared, shared, tp_size, cfg.ffn_act)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, part: LayerPartition, rotary: RotaryEmbedding,
                 tp_size: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg, layer_idx, part.heads, rotary, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = make_ffn(cfg, part, tp_size)

    def load_gguf(self, f: GGUFFile, prefix: str) -> None:
        self.input_layernorm.load_gguf(f, prefix + "attn_norm.weight")
        self.self_attn.load_gguf(f, prefix)
        self.post_attention_layernorm.load_gguf(f, prefix + "ffn_norm.weight")
        self.mlp.load_gguf(f, prefix)

    def forward(self, x: torch.Tensor, pos: Positions, cos_sin) -> torch.Tensor:
        """x [T, d] -> [T, d]; x itself is left unchanged."""
        a = self.self_attn(self.input_layernorm(x), pos, cos_sin)         # fresh (T, d)
        ln = self.post_attention_layernorm
        if fused_path.applies(a, x, ln.weight):
            y = fused_ops.add_rms_norm_(a, x, ln.weight, ln.eps)         # a <- h = x + attn, y = norm(h)
            return self.mlp(y).add_(a)
        h = x + a
        return h + self.mlp(ln(h))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm: tokens [T] -> hidden [T, d]."""

    layer_class = DecoderLayer

    def __init__(self, cfg: ModelConfig, part: ModelPartition, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, part.vocab, tp_size=part.tp)
        # one RoPE table per distinct (base, scale): layers of one kind share it, and with it
        # the cos/sin of the current positions (computed once per forward)
        ropes: dict[tuple[float, float], RotaryEmbedding] = {}
        for i in range(cfg.n_layers):
            key = (cfg.rope_base_for(i), cfg.rope_scale_for(i))
            if key not in ropes:
                ropes[key] = RotaryEmbedding(cfg.rope_dim, key[0], cfg.rope_style, key[1], freq_factors)
        self.rope_keys = [(cfg.rope_base_for(i), cfg.rope_scale_for(i)) for i in range(cfg.n_layers)]
        self.ropes = nn.ModuleList(ropes.values())
        self._rope_index = {k: j for j, k in enumerate(ropes)}
        self.layers = nn.ModuleList(
            self.layer_class(cfg, i, part.layers[i], self.ropes[self._rope_index[self.rope_keys[i]]], part.tp)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def load_gguf(self, f: GGUFFile) -> None:
        self.embed_tokens.load_gguf(f, "token_embd.weight")
        for i, layer in enumerate(self.layers):
            layer.load_gguf(f, f"blk.{i}.")
        self.norm.load_gguf(f, "output_norm.weight")
        native_decode.reset(self)          # a plan holds the previous weights

    def forward(self, tokens: torch.Tensor, pos: Positions, last_only: bool = False) -> torch.Tensor:
        """tokens [T] -> normed hidden [T, d].

        ``pos``: an int start (positions pos..pos+T-1 of KV sequence 0) or a ``SeqBatch``
        (several sequences' spans in one forward: every linear layer runs on all T rows at
        once, attention per span over its own sequence). ``last_only``: only the rows that
        predict a next token: the last row, or each span's last row (``[n_spans, d]``)."""
        T = tokens.shape[0]
        x = self.embed_tokens(tokens)                             # (T, d)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        batch = pos if isinstance(pos, SeqBatch) else None
        if batch is None:
            tables = [rope.cos_sin(pos, T) for rope in self.ropes]     # (T, rope_dim/2) each
        else:
            if batch.n_tokens != T:
                raise ValueError(f"{T} tokens for a batch of {batch.n_tokens}")
            tables = [rope.cos_sin_for(batch) for rope in self.ropes]
        decode = T == 1 if batch is None else batch.is_decode
        plan = native_decode.plan_for(self) if decode else None
        if plan is not None and x.dtype is torch.float32 and x.is_cpu and x.is_contiguous():
            # one native call for every layer (bitwise the loop below; see native_decode.py)
            h = plan.forward(x, batch if batch is not None else SeqBatch.one(pos, 1), tables)
            return self._final(h, last_only, batch)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, tables[self._rope_index[self.rope_keys[i]]])
        return self._final(x, last_only, batch)

    def _final(self, x: torch.Tensor, last_only: bool, batch: SeqBatch | None = None) -> torch.Tensor:
        """Final norm of the last layer's output [T, d] (with last_only: of the last row, or
        of each span's last row)."""
        if last_only:
            x = x[-1:] if batch is None or len(batch.spans) == 1 else x[batch.last_rows()]
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """tokens [T] -> logits float32 [T, vocab] on rank 0 (None on other ranks)."""

    model_class = DecoderModel

    def __init__(self, cfg: ModelConfig, part: ModelPartition, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.partition = part
        self.model = self.model_class(cfg, part, freq_factors)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.d_model, part.vocab, tp_size=part.tp)
        self.lm_head.softcap = cfg.final_logit_softcap

    def load_gguf(self, f: GGUFFile) -> None:
        self.model.load_gguf(f)
        if self.config.tied_output:
            self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head.load_gguf(f, "output.weight")
        if f.has("output.bias"):
            self.lm_head.load_bias(f, "output.bias")

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype | str = torch.float16, n_seqs: int = 1) -> None:
        """Preallocate every layer's K/V cache (this rank's KV heads only): ``max_seq_len``
        positions for each of ``n_seqs`` sequences (server slots)."""
        for layer in self.model.layers:
            layer.self_attn.attn.setup_cache(max_seq_len, dtype, n_seqs=n_seqs)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: Positions, last_only: bool = False) -> torch.Tensor | None:
        """Run tokens [T] at ``pos`` (an int start position of sequence 0, or a ``SeqBatch``).

        Returns logits [T, vocab] on rank 0, None elsewhere; with last_only [1, vocab] (int
        ``pos``) or [n_spans, vocab] (each span's last token).
        """
        h = self.model(tokens, pos, last_only)                    # (T, d)
        return self.lm_head(h)



class OlmoeForCausalLM(LlamaForCausalLM):
    """olmoe (OLMoE-1B-7B): llama's block with RoPE NEOX, q and k each RMS-normalised over
    all heads at once (``ShardedRMSNorm``: the ranks' sums of squares all-reduced), and a
    MoE FFN: softmax router, top-k weights not renormalised, no shared expert."""
