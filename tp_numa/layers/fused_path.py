"""When the layers take the fused native row ops (``tp_numa.fused_ops``) instead of eager torch.

The fused ops only take contiguous float32 CPU tensors; every caller keeps its eager torch
path for anything else (GPU-placed modules, other dtypes, strided views) and for builds
without the native extension. ``set_enabled(False)`` forces the eager path in this process
(used by ``scripts/profile_decode.py --ab-fused`` to measure what the fusion buys).
"""
from __future__ import annotations

import torch

_state = {"enabled": True, "available": None}


def set_enabled(on: bool) -> None:
    _state["enabled"] = bool(on)


def enabled() -> bool:
    """Fused ops built into the extension and not switched off (the check is cached)."""
    if not _state["enabled"]:
        return False
    if _state["available"] is None:
        from .. import fused_ops

        _state["available"] = fused_ops.available()
    return _state["available"]


def applies(*ts: torch.Tensor) -> bool:
    """True if the fused ops are on and every tensor is contiguous float32 on the CPU.

    Called several times per layer and decode step: a plain loop over cheap attributes
    (``is_cpu``, not ``device.type``, which builds a device object)."""
    if not enabled():
        return False
    for t in ts:
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            return False
    return True
