"""Placement config -> plan (module -> device, bytes per device, per rank) -> loaded model.

Three steps, in the order the engine runs them:

1. ``load_placement(spec)`` parses ``--offload FILE|PRESET`` (see ``tp_numa.placement``)
   and, unless told not to, checks the named GPUs exist on this host: a config that names
   a GPU on a machine without CUDA fails here, before any weight is read.
2. ``resolve_plan(config, placement, tp_size, tensors=...)`` walks the model's modules as
   the GGUF describes them (hyperparameters + tensor infos; no weight is read), gives each
   module a device per rank, and counts the bytes each rank would hold on each device:
   its slice of every weight plus its KV cache. ``format_plan`` prints it.
3. ``apply_placement(model, placement_or_plan, state)`` swaps every decoder layer placed
   on a GPU for a ``DeviceDecoderLayer`` there (weights dequantized once to fp16), and the
   attention core of every other layer placed on a GPU for a ``DeviceAttention``, before
   ``model.setup_cache`` allocates the caches.

What can move:
- an attention core alone (``model.layers.{i}.self_attn.attn``: scores, softmax,
  weighted sum, and the KV cache); the layer's weights stay on the CPU ranks, quantized;
- a whole decoder layer (every module of ``model.layers.{i}``: norms, q/k/v projection,
  q/k norms, attention core + KV cache, output projection, FFN): this rank's slice of
  each weight is dequantized once to fp16 on the GPU and the layer runs there.
A weight-bearing module on a GPU whose whole layer is not on the same device is refused
by name, and so is the token embedding, the final norm or the LM head on a GPU.

Matching: a module matches a rule when the rule's regex is found in the module's name or
in the name of any GGUF tensor it owns (``blk.3.attn_q.weight`` belongs to
``model.layers.3.self_attn.qkv_proj``). The attention core owns no tensor, so only its
module name can select it.

Per-rank bytes follow the sharding of the parallel layers (DESIGN.md): q/k/v columns by
whole heads (KV heads replicated when tp > n_kv_heads), the output projection rows by the
same heads, FFN gate/up columns and down rows by the same range of down's quant blocks,
embedding and LM head by vocabulary rows, norms replicated. A GPU holds a matrix slice as
fp16 (2 bytes per element) and norms / biases as float32 (4 bytes per element, as on the
CPU), whatever the GGUF type.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

from .distributed.numa import format_cpulist
from .errors import ModelFormatError, TpNumaError
from .placement import (PRESETS, Device, Placement, PlacementError, Rule, load_placement_spec,
                        parse_placement)

__all__ = [
    "PRESETS", "Placement", "PlacementError", "PlacementWarning", "Plan", "PlanEntry",
    "apply_placement", "check_devices", "check_gpu_modules", "cuda_device_count", "format_plan",
    "gpu_targets", "load_placement", "offload_attention", "offload_layers", "parse_placement",
    "plan_for_file", "resolve_plan",
]

ATTN_CORE_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn$")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")

# what a GPU holds per element of a weight: matrices dequantized to fp16, vectors float32
_GPU_MATRIX_BYTES = 2
_GPU_VECTOR_BYTES = 4

# KV cache bytes per value by the engine's --cache-type names (the CLI's choices; torch-free,
# unlike layers/attention.py's KV_CACHE_DTYPES). q8_0: CPU caches only.
KV_CACHE_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "q8_0": 34 / 32}

# context the KV cache is sized for when none is given: the engine's default
DEFAULT_CONTEXT = 4096


class PlacementWarning(UserWarning):
    """A placement config that works but probably does not do what was meant."""


# ---------------------------------------------------------------- devices on this host

def cuda_device_count() -> int:
    """GPUs torch can use here (0 on a CPU-only build; never initialises CUDA otherwise)."""
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver counts as no GPU: the check below says so
        return 0


def check_devices(placement: Placement, n_gpus: int | None = None) -> None:
    """Raise PlacementError when a rule names a GPU this host does not have.

    Called before loading, so the user learns about a missing GPU in one line instead of
    after minutes of reading weights. ``n_gpus`` None: count the visible CUDA devices.
    """
    gpu_rules = placement.gpu_rules
    if not gpu_rules:
        return
    if n_gpus is None:
        n_gpus = cuda_device_count()
    if n_gpus == 0:
        import torch

        first = gpu_rules[0]
        raise PlacementError(
            f"{placement.source}: {first.describe()} needs a CUDA GPU, but none is available "
            f"(torch {torch.__version__}, CUDA {'not built in' if torch.version.cuda is None else 'found no device'}); "
            "use --offload all-cpu or a CUDA build of torch")
    for rule in gpu_rules:
        if rule.device.index is not None and rule.device.index >= n_gpus:
            raise PlacementError(f"{placement.source}: {rule.describe()} names GPU {rule.device.index}, "
                                 f"but this host has {n_gpus} (cuda:0..cuda:{n_gpus - 1})")


def load_placement(spec, *, check: bool = True, n_gpus: int | None = None) -> Placement:
    """``--offload`` value (preset name, TOML path, or None = all-cpu) -> Placement.

    ``check`` (default) also verifies that the GPUs it names exist here; ``tp-numa plan``
    turns it off to plan for another machine.
    """
    placement = load_placement_spec(spec)
    if check:
        check_devices(placement, n_gpus)
    return placement


# ---------------------------------------------------------------- modules of a model

# GGUF tensor base name inside ``blk.{i}.`` -> (module suffix inside model.layers.{i}, split)
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm", "replicated"),
    "attn_q": ("self_attn.qkv_proj", "q_heads"),
    "attn_k": ("self_attn.qkv_proj", "kv_heads"),
    "attn_v": ("self_attn.qkv_proj", "kv_heads"),
    "attn_q_norm": ("self_attn.q_norm", "replicated"),
    "attn_k_norm": ("self_attn.k_norm", "replicated"),
    "attn_output": ("self_attn.o_proj", "o_rows"),
    "post_attention_norm": ("post_attention_layernorm", "replicated"),
    "ffn_norm": ("post_attention_layernorm", "replicated"),   # gemma3: pre_feedforward_layernorm
    "post_ffw_norm": ("post_feedforward_layernorm", "replicated"),
    "ffn_gate": ("mlp.gate_up_proj", "ffn_cols"),
    "ffn_up": ("mlp.gate_up_proj", "ffn_cols"),
    "ffn_down": ("mlp.down_proj", "ffn_rows"),
    # mixture-of-experts layers (layers/moe.py): a slice of every expert on every rank
    "ffn_gate_inp": ("mlp.gate", "replicated"),
    "ffn_gate_exps": ("mlp.experts", "expert_cols"),
    "ffn_up_exps": ("mlp.experts", "expert_cols"),
    "ffn_gate_up_exps": ("mlp.experts", "expert_cols"),
    "ffn_down_exps": ("mlp.experts", "expert_rows"),
    "ffn_gate_shexp": ("mlp.shared_expert.gate_up_proj", "shared_cols"),
    "ffn_up_shexp": ("mlp.shared_expert.gate_up_proj", "shared_cols"),
    "ffn_down_shexp": ("mlp.shared_expert.down_proj", "shared_rows"),
    "ffn_gate_inp_shexp": ("mlp.shared_expert_gate", "replicated"),
}
_TOP_TENSORS = {
    "token_embd": ("model.embed_tokens", "vocab"),
    "output_norm": ("model.norm", "replicated"),
    "output": ("lm_head", "vocab"),
    "rope_freqs": ("model.ropes", "replicated"),
}
_MOE_SPLITS = ("expert_cols", "expert_rows", "shared_cols", "shared_rows")
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")


@dataclass
class ModuleInfo:
    """One module of the model as the plan sees it (``tensors``: (gguf name, split) pairs)."""

    name: str
    kind: str            # "weights" | "attention" (the core; holds the KV cache)
    layer: int | None
    tensors: list[tuple[str, str]] = field(default_factory=list)


def model_modules(config, tensors: dict) -> list[ModuleInfo]:
    """The model's modules in forward order, with the GGUF tensors each one owns.

    Tensors no module of tp_numa reads are left out, as the loader leaves them in the file.
    """
    top: dict[str, ModuleInfo] = {}
    layers: list[dict[str, ModuleInfo]] = [{} for _ in range(config.n_layers)]
    for name in tensors:
        m = _BLK_RE.match(name)
        if m:
            i, base = int(m.group(1)), m.group(2)
            if i >= config.n_layers or base not in _LAYER_TENSORS:
                continue  # not read by tp_numa's models (the loader ignores it too)
            suffix, split = _LAYER_TENSORS[base]
            if base == "ffn_norm" and getattr(config, "sandwich_norms", False):
                suffix = "pre_feedforward_layernorm"
            mod = layers[i].setdefault(suffix, ModuleInfo(f"model.layers.{i}.{suffix}", "weights", i))
            mod.tensors.append((name, split))
            continue
        base = name.rsplit(".", 1)[0]
        if base not in _TOP_TENSORS:
            continue
        mod_name, split = _TOP_TENSORS[base]
        top.setdefault(mod_name, ModuleInfo(mod_name, "weights", None)).tensors.append((name, split))
    if "lm_head" not in top and "model.embed_tokens" in top:
        # tied output: the LM head reads the embedding's vocabulary slice (no bytes of its own)
        top["lm_head"] = ModuleInfo("lm_head", "weights", None, [("token_embd.weight", "tied")])
    order = ["input_layernorm", "self_attn.qkv_proj", "self_attn.q_norm", "self_attn.k_norm",
             "self_attn.attn", "self_attn.o_proj", "post_attention_layernorm",
             "pre_feedforward_layernorm", "mlp.gate_up_proj", "mlp.down_proj", "mlp.gate", "mlp.experts",
             "mlp.shared_expert_gate", "mlp.shared_expert.gate_up_proj", "mlp.shared_expert.down_proj",
             "post_feedforward_layernorm"]
    out = [top[n] for n in ("model.embed_tokens", "model.ropes") if n in top]
    for i, mods in enumerate(layers):
        mods["self_attn.attn"] = ModuleInfo(f"model.layers.{i}.self_attn.attn", "attention", i)
        out.extend(mods[s] for s in order if s in mods)
    out.extend(top[n] for n in ("model.norm", "lm_head") if n in top)
    return out


# ---------------------------------------------------------------- per-rank shares

class _TensorTable:
    """``info(name)`` over a dict of TensorInfo: what ``partition.plan_model`` asks of a file."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def info(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"tensor '{name}' is missing from the model") from None


def _kv_heads_cached(config, shard) -> int:
    """KV heads a rank's cache holds for one layer: its KV heads, or one per query head
    when its query heads straddle KV groups unevenly (the model then expands K/V before
    the cache; see models/llama.py SelfAttention)."""
    kv_index = shard.kv_index(config.n_heads // config.n_kv_heads)
    group = shard.n_q // shard.n_kv if shard.n_q % shard.n_kv == 0 else 0
    uniform = group > 0 and kv_index == [h // group for h in range(shard.n_q)]
    return shard.n_kv if uniform else shard.n_q


def _moe_share(info, split: str, layer_part, config, elements: bool) -> int:
    """Bytes (or values) one rank holds of a MoE layer tensor: ``expert_cols`` = every
    expert's feature slice as rows of gate/up [E, F or 2F (merged gate_up), d];
    ``expert_rows`` = those features as input columns of down [E, d, F];
    ``shared_cols`` / ``shared_rows`` = the shared expert's slice, like a dense FFN."""
    if split.startswith("shared"):
        a, b = layer_part.shared
        if split == "shared_cols":
            return (b - a) * (info.n_cols if elements else info.n_bytes // info.n_rows)
        return info.n_rows * (b - a if elements else (b - a) // info.block_size * info.type_size)
    feats = sum(b - a for a, b in layer_part.experts)
    if split == "expert_cols":
        rows = feats * (info.shape[1] // config.moe.expert_ff)
        return rows * (info.n_cols if elements else info.n_bytes // info.n_rows)
    d = info.shape[1]
    if elements:
        return d * feats
    return d * sum((b - a) // info.block_size for a, b in layer_part.experts) * info.type_size


def _tensor_bytes(info, split: str, layer_part, vocab, config) -> int:
    """Bytes of tensor ``info`` that one rank holds under ``split`` (layer_part: its
    LayerPartition for this tensor's layer, vocab: its vocabulary rows)."""
    if split == "replicated":
        return info.n_bytes
    if split == "tied":
        return 0
    if split in _MOE_SPLITS:
        return _moe_share(info, split, layer_part, config, elements=False)
    hd = config.head_dim
    if split in ("q_heads", "kv_heads", "ffn_cols", "vocab"):
        # a column split takes whole rows (a bias takes the matching elements)
        if split == "q_heads":
            n = layer_part.heads.n_q * hd
        elif split == "kv_heads":
            n = layer_part.heads.n_kv * hd
        elif split == "ffn_cols":
            n = layer_part.ffn[1] - layer_part.ffn[0]
        else:
            n = vocab[1] - vocab[0]
        if len(info.shape) == 1:
            return n * info.n_bytes // info.n_cols
        return n * (info.n_bytes // info.n_rows)
    # a row split takes the same whole blocks of every row
    cols = layer_part.heads.n_q * hd if split == "o_rows" else layer_part.ffn[1] - layer_part.ffn[0]
    return info.n_rows * (cols // info.block_size) * info.type_size


def _tensor_elements(info, split: str, layer_part, config) -> int:
    """Elements of a decoder-layer tensor that one rank holds under ``split`` (the slice
    ``_tensor_bytes`` counts in bytes, counted in values)."""
    hd = config.head_dim
    if split == "replicated":
        return math.prod(info.shape)
    if split in _MOE_SPLITS:
        return _moe_share(info, split, layer_part, config, elements=True)
    if split in ("q_heads", "kv_heads", "ffn_cols"):
        if split == "q_heads":
            n = layer_part.heads.n_q * hd
        elif split == "kv_heads":
            n = layer_part.heads.n_kv * hd
        else:
            n = layer_part.ffn[1] - layer_part.ffn[0]
        return n if len(info.shape) == 1 else n * info.n_cols     # bias entries / whole rows
    cols = layer_part.heads.n_q * hd if split == "o_rows" else layer_part.ffn[1] - layer_part.ffn[0]
    return info.n_rows * cols


def gpu_weight_bytes(info, split: str, layer_part, config, float32: bool = False) -> int:
    """Bytes of one rank's slice of a decoder-layer tensor on a GPU: fp16 matrices, float32
    vectors; ``float32``: a matrix kept in float32 (a MoE router, layers/device_layer.py)."""
    per = _GPU_MATRIX_BYTES if len(info.shape) > 1 and not float32 else _GPU_VECTOR_BYTES
    return per * _tensor_elements(info, split, layer_part, config)


def kv_cache_bytes(config, layer: int, kv_heads: int, max_seq_len: int, kv_type: str, on_gpu: bool) -> int:
    """K + V bytes of one layer on one rank. The CPU cache of a sliding-window layer is a
    ring of ``min(window, max_seq_len)`` slots; the GPU cache keeps every position."""
    window = config.window_for(layer)
    slots = max_seq_len if (on_gpu or window is None) else min(window, max_seq_len)
    return int(2 * slots * kv_heads * config.head_dim * KV_CACHE_BYTES[kv_type])


# ---------------------------------------------------------------- the plan

@dataclass
class PlanEntry:
    module: str
    kind: str                 # "weights" | "attention"
    layer: int | None
    devices: list[str]        # per rank, concrete ("cpu", "cuda:1")
    nbytes: list[int]         # per rank: weight slice bytes, or KV cache bytes for attention
    rule: Rule | None         # the rule that decided (None: default cpu)
    tensors: list[str]
    note: str = ""            # shown next to the module name ("KV cache", "tied to ...")


@dataclass
class Plan:
    source: str               # placement source (file path / preset)
    model: str                # model file or name, for the header
    arch: str
    n_layers: int
    tp_size: int
    n_gpus: int
    max_seq_len: int
    kv_type: str
    entries: list[PlanEntry]
    warnings: list[str]

    def totals(self) -> list[dict[str, int]]:
        """Per rank: device -> bytes (weights + KV cache)."""
        out = [dict() for _ in range(self.tp_size)]
        for e in self.entries:
            for r in range(self.tp_size):
                out[r][e.devices[r]] = out[r].get(e.devices[r], 0) + e.nbytes[r]
        return out

    def device_of(self, module: str, rank: int) -> str:
        for e in self.entries:
            if e.module == module:
                return e.devices[rank]
        raise KeyError(module)


def resolve_plan(config, placement: Placement, tp_size: int, *, tensors: dict,
                 max_seq_len: int | None = None, kv_type: str = "f16", n_gpus: int | None = None,
                 local_ranks: list[int] | None = None, model_name: str = "", warn: bool = True) -> Plan:
    """Resolve ``placement`` for a model described by ``config`` (tp_numa.config.ModelConfig)
    and ``tensors`` (GGUF name -> tp_numa.gguf_loader.TensorInfo); reads no weight data.

    ``n_gpus``: GPUs per host (None: count them here; 0 with a GPU rule is an error).
    ``local_ranks``: each rank's index on its host (default: all ranks on one host).
    Rules matching no module give a PlacementWarning (``warn``) and are listed in the plan.
    """
    if tp_size < 1:
        raise TpNumaError(f"tp size must be >= 1, got {tp_size}")
    kv_type = kv_type.lower()
    if kv_type not in KV_CACHE_BYTES:
        raise TpNumaError(f"KV cache type {kv_type!r} is not supported (use {', '.join(KV_CACHE_BYTES)})")
    if n_gpus is None:
        n_gpus = cuda_device_count()
    check_devices(placement, n_gpus)
    local_ranks = list(range(tp_size)) if local_ranks is None else list(local_ranks)
    if len(local_ranks) != tp_size:
        raise TpNumaError(f"local_ranks has {len(local_ranks)} entries for tp={tp_size}")
    max_seq_len = int(max_seq_len or min(config.context_length, DEFAULT_CONTEXT))
    from .layers.partition import plan_model

    table = _TensorTable(tensors)
    parts = [plan_model(table, config, r, tp_size) for r in range(tp_size)]
    used: set[int] = set()      # rules that decided some module
    matched: set[int] = set()   # rules whose pattern matched some name
    entries = []
    for mod in model_modules(config, tensors):
        names = (mod.name,) + tuple(t for t, _ in mod.tensors)
        rule = placement.rule_for(names)
        device = rule.device if rule is not None else Device("cpu")
        if rule is not None:
            used.add(rule.number)
        matched.update(r.number for r in placement.rules if r.matches(names))
        devices = [device.for_rank(local_ranks[r], n_gpus) for r in range(tp_size)]
        if mod.kind == "attention":
            nbytes = [kv_cache_bytes(config, mod.layer, _kv_heads_cached(config, p.layers[mod.layer].heads),
                                     max_seq_len, kv_type, device.is_gpu) for p in parts]
        elif device.is_gpu and mod.layer is not None:
            nbytes = [sum(gpu_weight_bytes(tensors[t], split, p.layers[mod.layer], config,
                                           float32=mod.name.endswith(ROUTER))
                          for t, split in mod.tensors) for p in parts]
        else:
            nbytes = [sum(_tensor_bytes(tensors[t], split, None if mod.layer is None else p.layers[mod.layer],
                                        p.vocab, config) for t, split in mod.tensors) for p in parts]
        note = "KV cache" if mod.kind == "attention" else ""
        if device.is_gpu and mod.kind == "weights" and any(len(tensors[t].shape) > 1 for t, _ in mod.tensors):
            note = "float32" if mod.name.endswith(ROUTER) else "fp16"
        if any(split == "tied" for _, split in mod.tensors):
            note = "tied to model.embed_tokens"
        entries.append(PlanEntry(mod.name, mod.kind, mod.layer, devices, nbytes, rule,
                                 [t for t, _ in mod.tensors], note))
    check_gpu_modules(placement.source, entries, tp_size)
    notes = []
    for r in placement.rules:
        if r.number not in matched:
            notes.append(f"{placement.source}: {r.describe()} matches no module or tensor of this model")
        elif r.number not in used:
            notes.append(f"{placement.source}: {r.describe()} is never used: earlier rules take every module it matches")
    if warn:
        for note in notes:
            warnings.warn(note, PlacementWarning, stacklevel=2)
    return Plan(placement.source, model_name, config.arch, config.n_layers, tp_size, n_gpus,
                max_seq_len, kv_type, entries, notes)


def plan_for_file(path, placement: Placement, tp_size: int, **kwargs) -> Plan:
    """``resolve_plan`` for a GGUF file: reads its header and tensor infos, not its weights."""
    import os

    from .config import ModelConfig
    from .gguf_loader import read_header

    f = read_header(path)
    kwargs.setdefault("model_name", os.path.basename(str(path)))
    return resolve_plan(ModelConfig.from_gguf(f), placement, tp_size, tensors=f.tensors, **kwargs)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan) -> str:
    """Human-readable plan: one row per module (layers with the same placement grouped),
    the device and bytes of every rank, then per-rank totals per device."""
    groups: dict[tuple, list[PlanEntry]] = {}
    for e in plan.entries:
        template = re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", e.module)
        groups.setdefault((template, tuple(e.devices)), []).append(e)
    header = ["module", "layers"] + [f"rank {r}" for r in range(plan.tp_size)]
    rows = []
    for (template, devices), entries in groups.items():
        layers = [e.layer for e in entries if e.layer is not None]
        label = template + (f"  ({entries[0].note})" if entries[0].note else "")
        cells = [f"{devices[r]} {_human(sum(e.nbytes[r] for e in entries))}" for r in range(plan.tp_size)]
        rows.append([label, format_cpulist(layers) if layers else "-"] + cells)  # "0-2,5,7-8"
    widths = [max(len(str(row[c])) for row in rows + [header]) for c in range(len(header))]

    def line(row):
        return "  ".join(str(v).ljust(widths[c]) for c, v in enumerate(row)).rstrip()

    lines = [
        f"placement {plan.source} for {plan.model or plan.arch} ({plan.arch}, {plan.n_layers} layers), "
        f"tp={plan.tp_size}, context {plan.max_seq_len}, KV cache {plan.kv_type}"
        + (f", {plan.n_gpus} GPU(s) per host" if any(d.startswith("cuda") for e in plan.entries for d in e.devices) else ""),
        line(header),
    ]
    lines += [line(r) for r in rows]
    lines.append("total per rank:")
    for r, per_device in enumerate(plan.totals()):
        parts = ", ".join(f"{dev} {_human(n)}" for dev, n in sorted(per_device.items()))
        lines.append(f"  rank {r}: {parts}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------- what may be on a GPU

ROUTED_EXPERTS = ".mlp.experts"     # a MoE layer's routed experts (layers/moe.py FusedExperts)
ROUTER = ".mlp.gate"                # a MoE layer's router (float32 on a GPU)
_CPU_ONLY = "the token embedding, the RoPE factors, the final norm and the LM head stay on the CPU ranks"


def check_gpu_modules(source: str, entries: list[PlanEntry], tp_size: int) -> None:
    """Raise PlacementError unless every rank's GPU holds attention cores alone or whole layers.

    ``entries``: every module of the model with its per-rank devices (a plan's entries).
    A weight-bearing module on a GPU needs every module of its layer (attention core
    included) on the same device of that rank; modules outside the layers never move.
    """
    by_layer: dict[int, list[PlanEntry]] = {}
    for e in entries:
        if e.layer is None:
            gpu = [d for d in e.devices if d != "cpu"]
            if gpu:
                raise PlacementError(
                    f"{source}: {e.rule.describe()} places '{e.module}' on {gpu[0]}, but {_CPU_ONLY}; "
                    "only decoder layers and attention cores can move (anchor the pattern, e.g. "
                    "'^model\\.layers\\.')")
            continue
        if e.module.endswith(ROUTED_EXPERTS) and any(d != "cpu" for d in e.devices):
            gpu = next(d for d in e.devices if d != "cpu")
            raise PlacementError(
                f"{source}: {e.rule.describe()} places the routed experts '{e.module}' on {gpu}, but routed "
                "experts run on the CPU ranks only; put a rule '\\.mlp\\.experts$' -> \"cpu\" before the "
                "layer rule (the preset experts-on-cpu does)")
        by_layer.setdefault(e.layer, []).append(e)
    for layer, mods in sorted(by_layer.items()):
        for r in range(tp_size):
            on_gpu = [e for e in mods if e.kind == "weights" and e.devices[r] != "cpu"]
            if not on_gpu:
                continue
            first = on_gpu[0]
            # a GPU layer's routed experts stay on the CPU (DeviceMoE)
            elsewhere = [e for e in mods if e.devices[r] != first.devices[r] and not e.module.endswith(ROUTED_EXPERTS)]
            if elsewhere:
                other = elsewhere[0]
                rank = f" (rank {r})" if tp_size > 1 else ""
                raise PlacementError(
                    f"{source}: {first.rule.describe()} places '{first.module}' on {first.devices[r]}{rank}, "
                    f"but '{other.module}' of the same layer is on {other.devices[r]}: a GPU takes whole "
                    f"decoder layers (every module of model.layers.{layer}, its attention core included) or "
                    f"attention cores alone; match the whole layer, e.g. pattern '^model\\.layers\\.{layer}\\.', "
                    "or only the attention core, '\\.self_attn\\.attn$'")


# ---------------------------------------------------------------- applying to a model

def apply_placement(model, placement: Placement | Plan, state=None, *, n_gpus: int | None = None) -> list[str]:
    """Move what the placement puts on a GPU there: whole decoder layers (``DeviceDecoderLayer``,
    weights dequantized once to fp16) and attention cores of the other layers (``DeviceAttention``).

    Call after the model is built and before ``model.setup_cache``. ``placement`` is a
    Plan from ``resolve_plan`` (decided per rank as printed; rules matched module and
    tensor names) or a Placement (rules matched against the model's module names only).
    Returns the names of the replaced modules (``model.layers.N``, ``...self_attn.attn``).
    """
    from .distributed import parallel_state

    state = state if state is not None else parallel_state.get()
    gpus = cuda_device_count() if n_gpus is None else n_gpus
    if isinstance(placement, Plan):
        entries, rank = placement.entries, state.tp_rank
        for e in entries:
            device = e.devices[rank]
            if device != "cpu" and int(device.split(":")[1]) >= gpus:
                raise PlacementError(f"{placement.source}: the plan puts {e.module} on {device}, "
                                     f"but this host has {gpus} CUDA GPU(s)")
    else:
        check_devices(placement, n_gpus)
        if not placement.uses_gpu:
            return []
        entries, rank = _model_entries(model, placement, state.local_rank, gpus), 0
        check_gpu_modules(placement.source, entries, 1)
    layers, cores = gpu_targets(entries, rank)
    replaced = offload_layers(model, layers) + offload_attention(model, cores)
    from .layers import native_decode

    native_decode.reset(model.model)     # a native decode plan holds the replaced modules' tensors
    return replaced


def gpu_targets(entries: list[PlanEntry], rank: int) -> tuple[dict[int, str], dict[str, str]]:
    """(whole layers -> device, attention cores of the other layers -> device) of one rank."""
    layers = {e.layer: e.devices[rank] for e in entries
              if e.kind == "weights" and e.layer is not None and e.devices[rank] != "cpu"}
    cores = {e.module: e.devices[rank] for e in entries
             if e.kind == "attention" and e.devices[rank] != "cpu" and e.layer not in layers}
    return layers, cores


def _model_entries(model, placement: Placement, local_rank: int, gpus: int) -> list[PlanEntry]:
    """Every placeable module of a built model with the device the rules give it by name."""
    from .layers.attention import Attention
    from .layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from .layers.linear import LinearBase
    from .layers.moe import FusedExperts
    from .layers.norm import RMSNorm

    kinds = (Attention, LinearBase, RMSNorm, VocabParallelEmbedding, ParallelLMHead, FusedExperts)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        m = LAYER_RE.match(name)
        rule = placement.rule_for(name)
        device = rule.device.for_rank(local_rank, gpus) if rule is not None else "cpu"
        kind = "attention" if isinstance(module, Attention) else "weights"
        out.append(PlanEntry(name, kind, int(m.group(1)) if m else None, [device], [0], rule, []))
    return out


def _attention_cores(model):
    from .layers.attention import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and ATTN_CORE_RE.match(n)]


def offload_layers(model, devices: dict[int, str]) -> list[str]:
    """Replace decoder layer i by a ``DeviceDecoderLayer`` on ``devices[i]`` (``"cuda:0"``;
    ``"cpu"`` runs the same code path on the CPU, which is how CPU-only machines test it).

    Each layer's quantized weights are dequantized to fp16 on the device and the CPU
    layer is dropped, so its quantized buffers are freed. Then every device layer is told
    where the residual stream goes next: the next layer's device when that layer is on a
    device too (consecutive device layers keep it there), else the CPU.
    """
    import torch

    from .layers.device_layer import DeviceDecoderLayer, DeviceTables

    if not devices:
        return []
    layers = model.get_submodule("model.layers")
    bad = sorted(i for i in devices if not 0 <= i < len(layers))
    if bad:
        raise TpNumaError(f"placement names decoder layer(s) the model does not have: "
                          f"{', '.join(f'model.layers.{i}' for i in bad)} (it has {len(layers)})")
    shared = [m.tables for m in layers if isinstance(m, DeviceDecoderLayer)]
    tables = shared[0] if shared else DeviceTables()
    for i in sorted(devices):
        if isinstance(layers[i], DeviceDecoderLayer):
            raise TpNumaError(f"model.layers.{i} is already on {layers[i].device}")
        layers[i] = DeviceDecoderLayer.from_layer(layers[i], devices[i], tables)  # the CPU layer is dropped
    for i, layer in enumerate(layers):
        if isinstance(layer, DeviceDecoderLayer):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            layer.exit_device = nxt.device if isinstance(nxt, DeviceDecoderLayer) else torch.device("cpu")
    return [f"model.layers.{i}" for i in sorted(devices)]


def offload_attention(model, devices: dict[str, str]) -> list[str]:
    """Swap the named attention cores for DeviceAttention on the given devices.

    ``devices``: module name -> device string (``"cuda:0"``; ``"cpu"`` runs the same
    offload code path on the CPU, which is how CPU-only machines test it).
    """
    from .layers.device_attention import DeviceAttention

    cores = dict(_attention_cores(model))
    missing = sorted(set(devices) - set(cores))
    if missing:
        raise TpNumaError(f"placement names attention module(s) the model does not have: {', '.join(missing)}")
    for name, device in devices.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, DeviceAttention.from_attention(cores[name], device))
    return sorted(devices)
