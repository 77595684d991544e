"""Model architectures and ``load_model``: GGUF file -> this rank's nn.Module.

    from tp_numa.models import load_model
    model, cfg = load_model("model.gguf")          # world size 1, or this MPI rank's shard
    model.setup_cache(max_seq_len=2048, dtype=torch.float16)
    logits = model(torch.tensor(ids), 0)  # [T, vocab] float32 on rank 0, else None

Supported architectures: see ``ARCHITECTURES`` and docs/models.md.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..distributed import parallel_state
from ..gguf_loader import GGUFFile, open_gguf
from ..layers.partition import plan_model
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM, OlmoeForCausalLM
from .qwen2 import Qwen2ForCausalLM, Qwen2MoeForCausalLM
from .qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM

ARCHITECTURES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "qwen2moe": Qwen2MoeForCausalLM,
    "qwen3moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
}


def load_model(path_or_gguf, state: parallel_state.ParallelState | None = None):
    """Build this rank's model and load its weight slices -> ``(model, ModelConfig)``.

    Call after the rank is bound to its NUMA node: the slices are copied out of the mmap
    here, so their pages are first touched (and placed) on the rank's node. Raises
    TpNumaError subclasses for unusable files (missing tensor, unsupported type or
    architecture, a tensor that cannot be split over tp ranks).
    """
    state = state or parallel_state.get()
    f = path_or_gguf if isinstance(path_or_gguf, GGUFFile) else open_gguf(path_or_gguf)
    cfg = ModelConfig.from_gguf(f)
    part = plan_model(f, cfg, state.tp_rank, state.tp_size)
    freq_factors = f.read_float("rope_freqs.weight") if f.has("rope_freqs.weight") else None
    model = ARCHITECTURES[cfg.arch](cfg, part, freq_factors)
    model.load_gguf(f)
    model.eval()
    return model, cfg


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's weights (every buffer/parameter once, KV cache excluded)."""
    total = 0
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        if name.endswith(("k_cache", "v_cache")) or t is None:
            continue
        total += t.numel() * t.element_size()
    return total
