"""How evenly the ranks' routed-expert work ran (``tp-numa generate --verbose``).

Each MoE layer ends in an all-reduce, so every layer runs at the pace of the rank with
the most expert bytes to read for the tokens' chosen experts. With the expert counts of
a run (``MoE.expert_counts``: how often each expert was chosen), rank r's work in layer
i is ``W[r, i] = sum_e counts_i[e] * bytes_r,i[e]`` (its slice bytes of expert e), and

    balance = sum_i mean_r W[r, i] / sum_i max_r W[r, i]

is the share of the ideal (perfectly even) expert time the run achieved: 1.0 when every
rank read the same bytes in every layer. Summed over the run's tokens, so it shows the
split's bias (uneven blocks, skewed routing), not the per-token jitter.
"""
from __future__ import annotations

import torch

from ..distributed import communicator
from .moe import MoE


def moe_layers(model) -> list[MoE]:
    """The MoE blocks of a loaded model (``LlamaForCausalLM`` or its ``DecoderModel``)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_counting(model, on: bool) -> None:
    """Start (zeroed) or stop counting chosen experts in every MoE layer."""
    from . import native_decode

    for m in moe_layers(model):
        m.count_experts = bool(on)
        m.expert_counts.zero_()
    for sub in model.modules():                 # the native decode plan reads the flag when built
        if hasattr(sub, "layers") and hasattr(sub, "embed_tokens"):
            native_decode.reset(sub)


def report(model) -> str | None:
    """A line on the expert work per rank and its balance; collective (call on every rank),
    the text on rank 0 (None elsewhere and for a dense model)."""
    layers = moe_layers(model)
    if not layers:
        return None
    work = torch.stack([(m.expert_counts * m.experts.slice_bytes()).sum().double() for m in layers])  # (L,)
    tokens = int(layers[0].expert_counts.sum()) // max(1, layers[0].cfg.n_expert_used)
    gathered = communicator.gather_to_main(work.reshape(1, -1).contiguous(), dim=0)       # (tp, L)
    if gathered is None:
        return None
    per_rank = gathered.sum(1)
    balance = float(gathered.mean(0).sum() / gathered.max(0).values.sum()) if gathered.sum() > 0 else 1.0
    per_tok = ", ".join(f"rank {r} {b / max(1, tokens) / 1e6:.1f} MB" for r, b in enumerate(per_rank.tolist()))
    return (f"experts: {tokens} tokens routed; expert bytes read per token: {per_tok}; "
            f"balance {balance:.3f} (mean / max per layer: the share of even-split expert time achieved)")
