"""Shared by the offload tests (test_offload_model.py, test_offload_layers.py): all-F32
synthetic model types, a chunked forward, and the relative error they compare with."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

# every tensor F32: no activation quantization, so offloaded and CPU paths differ by
# float rounding only
F32 = dict(weight_type=QT.F32, embed_type=QT.F32, down_type=QT.F32, v_type=QT.F32)


def run(model, tokens, cache, chunks, ctx=64) -> torch.Tensor:
    """Feeds ``tokens`` in the given chunk sizes (prefill chunks, then 1-token decodes);
    returns the float32 logits of every position, [len(tokens), vocab]."""
    model.setup_cache(ctx, cache)
    ids, out, pos = torch.as_tensor(tokens), [], 0
    with torch.no_grad():
        for c in chunks:
            out.append(model(ids[pos:pos + c], pos).float())
            pos += c
    return torch.cat(out)


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref - mean(ref)|| per row, worst row."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    num = np.linalg.norm(ours - ref, axis=-1)
    den = np.linalg.norm(ref - ref.mean(-1, keepdims=True), axis=-1)
    return float((num / den).max())
