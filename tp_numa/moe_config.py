"""Mixture-of-experts hyperparameters from GGUF metadata, read per architecture as llama.cpp does.

Keys ``{arch}.``: ``expert_count``, ``expert_used_count``, ``expert_feed_forward_length``,
``expert_shared_feed_forward_length``, ``expert_weights_scale``, ``expert_weights_norm``,
``expert_gating_func`` (1 softmax, 2 sigmoid), ``expert_group_count`` /
``expert_group_used_count``, ``leading_dense_block_count``. What llama.cpp hard-codes per
architecture instead of reading (its ``build_moe_ffn`` call in each graph):

| arch | gating | renormalise top-k weights | shared expert |
|---|---|---|---|
| qwen3moe | softmax | yes | none |
| qwen2moe | softmax | no | ``ffn_*_shexp``, output x sigmoid(``ffn_gate_inp_shexp`` . x) |
| llama with experts (Mixtral) | softmax | yes | none |
| olmoe | softmax | no | none |

The expert width comes from the expert tensors themselves (``ffn_down_exps`` is
``[n_expert, d, n_ff_exp]``) and must agree with the key where the file has it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelFormatError

GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_TOPK = 1, 2, 3

# arch -> (renormalise the chosen weights, shared expert gated by ffn_gate_inp_shexp)
_ARCH_RULES = {
    "qwen3moe": (True, False),
    "qwen2moe": (False, True),
    "llama": (True, False),
    "olmoe": (False, False),
}
MOE_ARCHS = ("qwen3moe", "qwen2moe", "olmoe")     # always MoE (llama is MoE when expert_count > 0)


@dataclass(frozen=True)
class MoEConfig:
    n_expert: int
    n_expert_used: int            # k: experts per token
    expert_ff: int                # n_ff_exp: hidden width of one routed expert
    shared_ff: int = 0            # hidden width of the shared expert (0: none)
    shared_gate: bool = False     # qwen2moe: shared output x sigmoid(w . x)
    gating: int = GATING_SOFTMAX
    norm_weights: bool = False    # divide the k weights by their sum
    weights_scale: float = 1.0
    n_groups: int = 1             # group-limited routing (1: none)
    groups_used: int = 1
    leading_dense: int = 0        # the first layers keep a dense FFN

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.leading_dense

    @classmethod
    def from_gguf(cls, f, arch: str, n_layers: int) -> "MoEConfig | None":
        """The file's MoE config, or None for a dense model (no ``expert_count`` > 0)."""

        def opt(key: str, default=None):
            return f.metadata(f"{arch}.{key}", default)

        def bad(msg: str) -> ModelFormatError:
            return ModelFormatError(f"{f.path}: {msg}")

        def integer(key: str, default=None) -> int:
            value = opt(key, default)
            if value is None:
                raise bad(f"metadata key '{arch}.{key}' is missing (needed by a mixture-of-experts model)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise bad(f"metadata '{arch}.{key}' = {value!r} is not an integer")
            return int(value)

        n_expert = integer("expert_count", 0)
        if n_expert == 0 and arch not in MOE_ARCHS:
            return None
        if n_expert < 1:
            raise bad(f"metadata '{arch}.expert_count' = {n_expert}: a {arch} model needs at least one expert")
        if arch not in _ARCH_RULES:
            raise bad(f"architecture '{arch}' with experts is not supported")
        k = integer("expert_used_count")
        if not 1 <= k <= n_expert:
            raise bad(f"metadata '{arch}.expert_used_count' = {k} must be in [1, '{arch}.expert_count' = {n_expert}]")
        leading = integer("leading_dense_block_count", 0)
        if not 0 <= leading < n_layers:
            raise bad(f"metadata '{arch}.leading_dense_block_count' = {leading} must be in [0, {n_layers})")
        first = f"blk.{leading}."
        down = f.info(first + "ffn_down_exps.weight")
        if len(down.shape) != 3 or down.shape[0] != n_expert:
            raise bad(f"tensor '{down.name}' has shape {list(down.shape)}, expected [{n_expert} experts, d_model, "
                      f"n_ff_exp]")
        expert_ff = down.shape[2]
        # llama (Mixtral) and olmoe size their experts by feed_forward_length (llama.cpp's n_ff),
        # the others by expert_feed_forward_length (0 or absent: not set)
        ff_key = "feed_forward_length" if arch in ("llama", "olmoe") else "expert_feed_forward_length"
        key_ff = opt(ff_key)
        if key_ff not in (None, 0) and int(key_ff) != expert_ff:
            raise bad(f"metadata '{arch}.{ff_key}' = {key_ff} but tensor '{down.name}' has {expert_ff} expert "
                      f"features")
        norm, gated_shared = _ARCH_RULES[arch]
        shared_ff = 0
        if f.has(first + "ffn_down_shexp.weight"):
            shared_ff = f.info(first + "ffn_down_shexp.weight").shape[-1]
        scale = opt("expert_weights_scale", 0.0)
        if not isinstance(scale, (int, float)) or scale != scale or scale < 0:
            raise bad(f"metadata '{arch}.expert_weights_scale' = {scale!r} must be a number >= 0")
        return cls(
            n_expert=n_expert,
            n_expert_used=k,
            expert_ff=expert_ff,
            shared_ff=shared_ff,
            shared_gate=gated_shared and shared_ff > 0,
            gating=GATING_SOFTMAX,
            norm_weights=norm,
            weights_scale=float(scale) if scale not in (0, 0.0) else 1.0,
            leading_dense=leading,
        )
