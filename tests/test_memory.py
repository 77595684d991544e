"""Weight memory (tp_numa.memory, csrc/memory): 2 MiB-aligned storage advised onto
transparent huge pages before first touch; the loader and pack_x4 put weights there."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from tp_numa import memory, ops
from tp_numa.gguf_loader import open_gguf

MiB = 1 << 20
REQUESTED = os.environ.get("TP_NUMA_HUGEPAGES", "1") != "0"
HUGE = memory.thp_mode() in ("always", "madvise") and REQUESTED


def _mapped(addr: int) -> bool:
    """Whether addr lies in one of this process's mappings (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def test_large_weight_is_2mib_aligned_and_holds_data():
    w = memory.empty_weight(3, 5 * MiB + 123)
    assert w.dtype == torch.uint8 and tuple(w.shape) == (3, 5 * MiB + 123) and w.is_contiguous()
    if REQUESTED:
        assert w.data_ptr() % (2 * MiB) == 0
    src = torch.randint(0, 256, w.shape, dtype=torch.uint8)
    w.copy_(src)
    assert torch.equal(w, src)
    assert torch.equal(w[-1, -100:], src[-1, -100:])  # the tail past the last whole huge page


def test_small_weight_is_ordinary_memory():
    w = memory.empty_weight(100, 1000)
    assert tuple(w.shape) == (100, 1000) and w.dtype == torch.uint8
    w.fill_(7)
    assert int(w.sum()) == 7 * 100 * 1000


def test_zero_size_and_bad_size():
    assert memory.empty_weight(0, 4096).numel() == 0
    with pytest.raises(RuntimeError, match="negative size"):
        memory.empty_weight(-1, 8)


@pytest.mark.skipif(not REQUESTED, reason="TP_NUMA_HUGEPAGES=0: ordinary (malloc) memory")
def test_freeing_unmaps_the_storage():
    w = memory.empty_weight(8 * MiB)
    w.fill_(1)
    addr = w.data_ptr()
    assert _mapped(addr)
    del w
    assert not _mapped(addr)


@pytest.mark.skipif(not HUGE, reason="transparent huge pages are off on this kernel (or TP_NUMA_HUGEPAGES=0)")
def test_touched_weight_lands_on_huge_pages():
    before = memory.huge_page_bytes()
    w = memory.empty_weight(16 * MiB)
    w.fill_(1)
    # 8 whole huge pages advised; the kernel may fail to find a few (fragmentation), not all
    assert memory.huge_page_bytes() - before >= 2 * MiB
    del w


@pytest.mark.skipif(memory.thp_mode() == "always", reason="THP 'always': every large region may get huge pages")
def test_hugepages_off_by_environment():
    code = ("import torch; from tp_numa import memory; b = memory.huge_page_bytes(); "
            "w = memory.empty_weight(16 << 20); w.fill_(1); print(memory.huge_page_bytes() - b)")
    env = dict(os.environ, TP_NUMA_HUGEPAGES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == 0


def test_cat_rows():
    a = torch.randint(0, 256, (3, 4096), dtype=torch.uint8)
    b = torch.randint(0, 256, (1000, 4096), dtype=torch.uint8)
    out = memory.cat_rows([a, b])
    assert torch.equal(out, torch.cat([a, b]))
    assert memory.cat_rows([a]) is a
    with pytest.raises(ValueError, match="chunks must all be"):
        memory.cat_rows([a, torch.zeros(2, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="no chunks"):
        memory.cat_rows([])


def test_loader_and_pack_x4_use_weight_memory(qwen_path):
    """The 136 MiB token embedding is copied out of the mmap into aligned weight memory,
    byte for byte, and its x4 repack lands there too."""
    f = open_gguf(qwen_path)
    info = f.info("token_embd.weight")
    rows = f.read_rows("token_embd.weight")
    assert rows.numel() == info.n_bytes and rows.numel() >= 2 * MiB
    mm = np.memmap(qwen_path, mode="r")[info.offset:info.offset + info.n_bytes]
    assert np.array_equal(rows.numpy().reshape(-1)[:: 4099], mm[:: 4099])
    assert np.array_equal(rows.numpy().reshape(-1)[-5000:], mm[-5000:])
    if REQUESTED:
        assert rows.data_ptr() % (2 * MiB) == 0
        if info.qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0):
            packed = ops.pack_x4(rows[:8192].contiguous(), int(info.qtype))
            assert packed.data_ptr() % (2 * MiB) == 0
            assert torch.equal(ops.unpack_x4(packed, int(info.qtype), 8192), rows[:8192])
