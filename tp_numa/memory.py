"""Weight storage: every weight a rank streams per token lives on transparent huge pages.

A decode step reads every weight once. On 4 KiB pages that is one TLB miss (a page walk)
per 4 KiB of weight; on 2 MiB pages, one per 2 MiB. ``empty_weight`` gives uint8 storage
that is 2 MiB-aligned and ``madvise(MADV_HUGEPAGE)``d *before* its first touch (the native
op ``tp_numa::empty_weight``, csrc/memory/weight_memory.cpp), so the loader's copy out of
the GGUF mmap, done by the rank already bound to its NUMA node, faults in node-local huge
pages. Only whole 2 MiB pages are advised: a tensor's tail stays on 4 KiB pages and costs
no extra resident memory.

Measured gains: docs/kernels.md, "Weight memory" (``scripts/bench_weight_memory.py``).
``TP_NUMA_HUGEPAGES=0`` keeps ordinary memory (for A/B runs); a kernel
with THP set to ``never`` silently gives 4 KiB pages (``tp-numa topo`` says so).
"""
from __future__ import annotations

import torch

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def empty_weight(*size: int) -> torch.Tensor:
    """Uninitialised uint8 tensor of ``size`` for weight bytes (huge pages from 2 MiB on)."""
    from . import ops  # noqa: F401  (loads the extension that registers the op)

    return torch.ops.tp_numa.empty_weight([int(s) for s in size])


def to_weight_memory(t: torch.Tensor) -> torch.Tensor:
    """A copy of uint8 tensor ``t`` in weight memory (same shape, contiguous)."""
    out = empty_weight(*t.shape)
    out.copy_(t)
    return out


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in weight memory, for other per-step streamed state (the KV cache).

    Zeroing is its first touch: call it on the rank that will read it (node-local pages)."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    return empty_weight(n * itemsize).view(dtype).view(shape).zero_()


def cat_rows(chunks: list[torch.Tensor]) -> torch.Tensor:
    """uint8 row blocks ``[n_i, row_bytes]`` stacked into one weight-memory tensor.

    A single chunk is returned as it is (it already is a fresh copy from the loader)."""
    if not chunks:
        raise ValueError("cat_rows: no chunks")
    if len(chunks) == 1:
        return chunks[0]
    cols = chunks[0].shape[1]
    if any(c.dim() != 2 or c.shape[1] != cols for c in chunks):
        raise ValueError(f"cat_rows: chunks must all be [n, {cols}], got {[tuple(c.shape) for c in chunks]}")
    out = empty_weight(sum(c.shape[0] for c in chunks), cols)
    r = 0
    for c in chunks:
        out[r:r + c.shape[0]].copy_(c)
        r += c.shape[0]
    return out


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory that sit on huge pages (/proc/self/smaps_rollup)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
