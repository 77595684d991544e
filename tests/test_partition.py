"""Partition rules for any tp: whole heads / blocks, even shares, KV groups, errors."""
from __future__ import annotations

import pytest

from tp_numa.errors import ShardingError
from tp_numa.layers.partition import head_unit, partition_blocks, partition_heads, partition_rows, split_even


def _sizes(ranges):
    return [b - a for a, b in ranges]


def _check_cover(ranges, n):
    """Contiguous, in order, covering [0, n)."""
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


@pytest.mark.parametrize("n", [1, 7, 19, 151936])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5, 8])
def test_split_even_any_tp(n, tp):
    if n < tp:
        return
    for rotate in range(tp):
        r = split_even(n, tp, rotate)
        _check_cover(r, n)
        s = _sizes(r)
        assert max(s) - min(s) <= 1


def test_qwen_ffn_down_19_blocks_tp2():
    # Qwen2.5-0.5B ffn_down: 4864 inputs = 19 Q6_K blocks -> 10 + 9 blocks
    assert partition_blocks("blk.0.ffn_down.weight", 4864, 256, 2) == [(0, 2560), (2560, 4864)]


def test_blocks_tp3_tp4_rotate():
    r3 = partition_blocks("d", 4864, 256, 3)
    assert _sizes(r3) == [7 * 256, 6 * 256, 6 * 256]
    assert _sizes(partition_blocks("d", 4864, 256, 3, rotate=1)) == [6 * 256, 7 * 256, 6 * 256]
    r4 = partition_blocks("d", 4864, 256, 4)
    assert _sizes(r4) == [5 * 256, 5 * 256, 5 * 256, 4 * 256]
    # rotating the leftovers by layer evens out the total per rank over 24 layers
    totals = [0, 0, 0]
    for layer in range(24):
        for r, (a, b) in enumerate(partition_blocks("d", 4864, 256, 3, rotate=layer)):
            totals[r] += b - a
    assert totals == [24 * 4864 // 3] * 3


def test_qwen_heads_tp4_stay_in_kv_groups():
    # 14 query heads in 2 KV groups of 7 at tp=4: 4+3+4+3, each rank inside one group
    shards = partition_heads("blk.0.attn_output.weight", 14, 2, 4)
    assert [s.q for s in shards] == [(0, 4), (4, 7), (7, 11), (11, 14)]
    assert [s.kv for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_qwen_heads_tp2_tp3():
    s2 = partition_heads("o", 14, 2, 2)
    assert [s.q for s in s2] == [(0, 7), (7, 14)] and [s.kv for s in s2] == [(0, 1), (1, 2)]
    s3 = partition_heads("o", 14, 2, 3)
    assert _sizes([s.q for s in s3]) in ([5, 5, 4], [5, 4, 5], [4, 5, 5])
    _check_cover([s.q for s in s3], 14)
    # one rank must straddle the two groups; it holds both KV heads, the others one
    assert sorted(s.n_kv for s in s3) == [1, 1, 2]


def test_gemma_single_kv_head_replicated():
    for tp in (2, 3, 4):
        shards = partition_heads("o", 4, 1, tp)
        _check_cover([s.q for s in shards], 4)
        assert all(s.kv == (0, 1) for s in shards)
        assert max(s.n_q for s in shards) - min(s.n_q for s in shards) <= 1


def test_kv_groups_minimal_when_tp_not_divisor():
    # 32 heads / 8 KV heads over 3 ranks: balanced 11/11/10, each rank touches the KV
    # heads its query heads need and no more
    shards = partition_heads("o", 32, 8, 3)
    assert sorted(s.n_q for s in shards) == [10, 11, 11]
    for s in shards:
        assert s.kv == (s.q[0] // 4, (s.q[1] - 1) // 4 + 1)
    # divisible case: no KV head replicated
    assert [s.kv for s in partition_heads("o", 32, 8, 4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_kv_index_maps_query_to_local_kv():
    s = partition_heads("o", 14, 2, 3)[1]     # straddles both groups
    idx = s.kv_index(7)
    assert idx == [h // 7 - s.kv[0] for h in range(*s.q)]
    assert set(idx) == {0, 1}


def test_head_units_follow_output_blocks():
    # head_dim 64 with a 256-element block type on attn_output: heads move in units of 4
    assert head_unit(64, 256) == 4 and head_unit(64, 32) == 1 and head_unit(256, 256) == 1
    shards = partition_heads("o", 16, 4, 3, unit=4, block_size=256)
    assert all((s.q[0] * 64) % 256 == 0 for s in shards)


def test_unsplittable_names_tensor_tp_and_block_size():
    with pytest.raises(ShardingError) as e:
        partition_heads("blk.0.attn_output.weight", 4, 1, 5)
    assert "blk.0.attn_output.weight" in str(e.value) and "tp=5" in str(e.value)
    with pytest.raises(ShardingError) as e:
        partition_blocks("blk.3.ffn_down.weight", 512, 256, 3)
    msg = str(e.value)
    assert "blk.3.ffn_down.weight" in msg and "tp=3" in msg and "256" in msg
    with pytest.raises(ShardingError):
        partition_rows("token_embd.weight", 2, 3)
