"""How each tensor is split over tp ranks, for any tp (not only divisors of the dims).

Rules (DESIGN.md, "Sharding"):
- split by whole units (heads, quant blocks, rows), as evenly as possible: rank counts
  differ by at most one unit;
- a column split and the row split that consumes it share one range (ffn gate/up rows
  = ffn_down input columns; q heads = attn_output input columns);
- a row split falls on quant-block boundaries of the consuming weight;
- each rank's query heads lie in as few KV groups as possible; a rank holds the KV heads
  of every group its query heads touch (so KV heads are replicated when tp > n_kv_heads);
- a tensor with fewer units than ranks cannot be split: ShardingError naming it.

Example: Qwen2.5-0.5B ffn_down has 4864 inputs = 19 Q6_K blocks of 256; tp=2 gives
blocks 10+9 = inputs [0, 2560) and [2560, 4864), and the same rows of ffn_gate/ffn_up.
Its 14 query heads in 2 KV groups of 7 at tp=4 split 4+3+4+3 (each rank in one group).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ShardingError

Range = tuple[int, int]  # [start, end)


def split_even(n_units: int, tp: int, rotate: int = 0) -> list[Range]:
    """Split ``n_units`` into ``tp`` contiguous ranges whose sizes differ by at most one.

    The ``n_units % tp`` larger shares go to ranks ``rotate, rotate+1, ...`` (mod tp), so
    successive layers can hand their leftover unit to different ranks and the per-rank
    totals over the whole model even out."""
    base, extra = divmod(n_units, tp)
    bigger = {(rotate + i) % tp for i in range(extra)}
    out, start = [], 0
    for r in range(tp):
        n = base + (1 if r in bigger else 0)
        out.append((start, start + n))
        start += n
    return out


def _check_units(tensor: str, n_units: int, tp: int, what: str) -> None:
    if n_units < tp:
        raise ShardingError(
            f"tensor '{tensor}' cannot be split over tp={tp} ranks: it has only {n_units} {what}"
        )


def partition_blocks(tensor: str, n_cols: int, block_size: int, tp: int, rotate: int = 0) -> list[Range]:
    """Element ranges of a row split (input dim) on whole quant blocks of ``block_size``."""
    n_blocks = n_cols // block_size
    _check_units(tensor, n_blocks, tp, f"quant blocks of {block_size} ({n_cols} inputs)")
    return [(a * block_size, b * block_size) for a, b in split_even(n_blocks, tp, rotate)]


def partition_rows(tensor: str, n_rows: int, tp: int) -> list[Range]:
    """Row ranges of a column split with no block constraint (vocab of embedding/LM head)."""
    _check_units(tensor, n_rows, tp, "rows")
    return split_even(n_rows, tp)


@dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads ``q`` and the KV heads ``kv`` they need."""

    q: Range
    kv: Range

    @property
    def n_q(self) -> int:
        return self.q[1] - self.q[0]

    @property
    def n_kv(self) -> int:
        return self.kv[1] - self.kv[0]

    def kv_index(self, group: int) -> list[int]:
        """Local KV head used by each local query head (group = query heads per KV head)."""
        return [h // group - self.kv[0] for h in range(*self.q)]


def partition_heads(
    tensor: str, n_heads: int, n_kv_heads: int, tp: int, unit: int = 1, block_size: int = 1
) -> list[HeadShard]:
    """Query-head ranges per rank plus the KV-head ranges they touch.

    ``unit`` query heads move together (so that a head boundary times head_dim falls on a
    block boundary of the output projection, whose block size is ``block_size``).
    Per-rank counts are floor or ceil of n_units/tp; among those arrangements the one
    with the fewest (rank, KV group) pairs is chosen, ties going to larger shares first.
    """
    if n_heads % unit != 0:
        raise ShardingError(
            f"tensor '{tensor}': {n_heads} heads cannot be grouped in units of {unit} "
            f"(needed for quant blocks of {block_size})"
        )
    n_units = n_heads // unit
    _check_units(tensor, n_units, tp, f"head groups of {unit} head(s) (quant block size {block_size})")
    group = n_heads // n_kv_heads
    base, extra = divmod(n_units, tp)

    def cost(start_unit: int, n: int) -> int:
        h0, h1 = start_unit * unit, (start_unit + n) * unit
        return (h1 - 1) // group - h0 // group + 1

    # best[r][c]: fewest KV groups touched by ranks r.. given c larger shares used before r.
    inf = math.inf
    best = [[inf] * (extra + 1) for _ in range(tp + 1)]
    best[tp][extra] = 0
    for r in range(tp - 1, -1, -1):
        for c in range(min(r, extra) + 1):
            start = r * base + c
            options = [cost(start, base) + best[r + 1][c]]
            if c < extra:
                options.append(cost(start, base + 1) + best[r + 1][c + 1])
            best[r][c] = min(options)
    shards, c, start = [], 0, 0
    for r in range(tp):
        take_big = c < extra and cost(start, base + 1) + best[r + 1][c + 1] == best[r][c]
        n = base + 1 if take_big else base
        c += take_big
        h0, h1 = start * unit, (start + n) * unit
        shards.append(HeadShard(q=(h0, h1), kv=(h0 // group, (h1 - 1) // group + 1)))
        start += n
    return shards


def head_unit(head_dim: int, block_size: int) -> int:
    """Fewest query heads whose inputs to the output projection fill whole blocks."""
    return block_size // math.gcd(block_size, head_dim)


def partition_experts(tensor: str, n_expert: int, expert_ff: int, block_size: int, tp: int,
                      rotate: int = 0) -> list[tuple[Range, ...]]:
    """Per rank, the hidden-feature range of every expert (expert tensor parallel).

    Each expert's ``n_ff_exp`` features split on whole blocks of its down projection, as
    evenly as possible; expert e of a layer hands its leftover block(s) to the ranks from
    ``(rotate + e) % tp`` on. So when the blocks do not divide (Qwen3-30B: 768 = 3 blocks of
    256 at tp=2 gives 512 + 256), rank 0 holds the larger share of half the experts and
    rank 1 of the other half: the k experts a token picks are spread over both, instead of
    every layer waiting for the rank with 2/3 of every expert. A rank may hold nothing of
    an expert when it has fewer blocks than there are ranks."""
    n_blocks = expert_ff // block_size
    if n_blocks * block_size != expert_ff or n_blocks < 1:
        raise ShardingError(f"tensor '{tensor}': {expert_ff} expert features are not whole blocks of {block_size}")
    per_expert = [split_even(n_blocks, tp, rotate + e) for e in range(n_expert)]
    return [tuple((a * block_size, b * block_size) for a, b in (pe[r] for pe in per_expert)) for r in range(tp)]


@dataclass(frozen=True)
class LayerPartition:
    """One rank's share of one decoder layer."""

    heads: HeadShard    # query heads and the KV heads they need
    ffn: Range          # ffn hidden features [f0, f1): rows of gate/up = inputs of down
    experts: tuple[Range, ...] = ()   # MoE layer: every routed expert's feature range
    shared: Range | None = None       # MoE layer: the shared expert's features (like ffn)

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)


@dataclass(frozen=True)
class ModelPartition:
    """One rank's share of the whole model."""

    rank: int
    tp: int
    layers: tuple[LayerPartition, ...]
    vocab: Range        # rows of token_embd / output


def plan_model(f, cfg, rank: int, tp: int) -> ModelPartition:
    """Partition every layer of a GGUF model (``f``: GGUFFile, ``cfg``: ModelConfig).

    Heads move in units that fill whole blocks of ``attn_output``'s type; the ffn splits
    on ``ffn_down``'s blocks, and layer i hands its leftover block(s) to ranks starting at
    ``i % tp``, so the uneven remainders spread over the ranks instead of piling on rank 0.
    """
    layers = []
    moe = getattr(cfg, "moe", None)
    for i in range(cfg.n_layers):
        o_name = f"blk.{i}.attn_output.weight"
        o_bs = f.info(o_name).block_size
        heads = partition_heads(o_name, cfg.n_heads, cfg.n_kv_heads, tp, head_unit(cfg.head_dim, o_bs), o_bs)
        if moe is not None and moe.is_moe_layer(i):
            e_name = f"blk.{i}.ffn_down_exps.weight"
            experts = partition_experts(e_name, moe.n_expert, moe.expert_ff, f.info(e_name).block_size, tp, i)
            shared = None
            if moe.shared_ff:
                s_name = f"blk.{i}.ffn_down_shexp.weight"
                shared = partition_blocks(s_name, moe.shared_ff, f.info(s_name).block_size, tp, rotate=i)[rank]
            layers.append(LayerPartition(heads=heads[rank], ffn=(0, 0), experts=experts[rank], shared=shared))
            continue
        d_name = f"blk.{i}.ffn_down.weight"
        ffn = partition_blocks(d_name, cfg.ffn_dim, f.info(d_name).block_size, tp, rotate=i)
        layers.append(LayerPartition(heads=heads[rank], ffn=ffn[rank]))
    vocab = partition_rows("token_embd.weight", cfg.vocab_size, tp)[rank]
    return ModelPartition(rank=rank, tp=tp, layers=tuple(layers), vocab=vocab)
