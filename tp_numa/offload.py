"""Placement config -> plan (module -> device, bytes per device, per rank) -> loaded model.

Three steps, in the order the engine runs them:

1. ``load_placement(spec)`` parses ``--offload FILE|PRESET`` (see ``tp_numa.placement``)
   and, unless told not to, checks the named GPUs exist on this host: a config that names
   a GPU on a machine without CUDA fails here, before any weight is read.
2. ``resolve_plan(config, placement, tp_size, tensors=...)`` walks the model's modules as
   the GGUF describes them (hyperparameters + tensor infos; no weight is read), gives each
   module a device per rank, and counts the bytes each rank would hold on each device:
   its slice of every weight plus its KV cache. ``format_plan`` prints it.
3. ``apply_placement(model, placement_or_plan, state)`` swaps the attention core of every
   layer placed on a GPU for a ``DeviceAttention`` on this rank's GPU, before
   ``model.setup_cache`` allocates the caches.

What can move: the attention core (``model.layers.{i}.self_attn.attn``: scores, softmax,
weighted sum, and the KV cache). Every weight stays on the CPU ranks in its quantized
form; a rule that sends a weight-bearing module to a GPU is refused by name.

Matching: a module matches a rule when the rule's regex is found in the module's name or
in the name of any GGUF tensor it owns (``blk.3.attn_q.weight`` belongs to
``model.layers.3.self_attn.qkv_proj``). The attention core owns no tensor, so only its
module name can select it.

Per-rank bytes follow the sharding of the parallel layers (DESIGN.md): q/k/v columns by
whole heads (KV heads replicated when tp > n_kv_heads), the output projection rows by the
same heads, FFN gate/up columns and down rows by the same range of down's quant blocks,
embedding and LM head by vocabulary rows, norms replicated.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from .distributed.numa import format_cpulist
from .errors import ModelFormatError, TpNumaError, UnsupportedError
from .placement import (PRESETS, Device, Placement, PlacementError, Rule, load_placement_spec,
                        parse_placement)

__all__ = [
    "PRESETS", "Placement", "PlacementError", "PlacementWarning", "Plan", "PlanEntry",
    "apply_placement", "check_devices", "cuda_device_count", "format_plan", "load_placement",
    "parse_placement", "plan_for_file", "resolve_plan",
]

ATTN_CORE_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn$")

# KV cache element sizes by the engine's --cache-type names
_KV_BYTES = {"f16": 2, "bf16": 2, "f32": 4}

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
}
_TOP_TENSORS = {
    "token_embd": ("model.embed_tokens", "vocab"),
    "output_norm": ("model.norm", "replicated"),
    "output": ("lm_head", "vocab"),
    "rope_freqs": ("model.ropes", "replicated"),
}
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
             "pre_feedforward_layernorm", "mlp.gate_up_proj", "mlp.down_proj", "post_feedforward_layernorm"]
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


def _tensor_bytes(info, split: str, layer_part, vocab, config) -> int:
    """Bytes of tensor ``info`` that one rank holds under ``split`` (layer_part: its
    LayerPartition for this tensor's layer, vocab: its vocabulary rows)."""
    if split == "replicated":
        return info.n_bytes
    if split == "tied":
        return 0
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


def kv_cache_bytes(config, layer: int, kv_heads: int, max_seq_len: int, kv_type: str, on_gpu: bool) -> int:
    """K + V bytes of one layer on one rank. The CPU cache of a sliding-window layer is a
    ring of ``min(window, max_seq_len)`` slots; the GPU cache keeps every position."""
    window = config.window_for(layer)
    slots = max_seq_len if (on_gpu or window is None) else min(window, max_seq_len)
    return 2 * slots * kv_heads * config.head_dim * _KV_BYTES[kv_type]


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
    if kv_type not in _KV_BYTES:
        raise TpNumaError(f"KV cache type {kv_type!r} is not supported (use {', '.join(_KV_BYTES)})")
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
        if device.is_gpu and mod.kind != "attention":
            raise UnsupportedError(
                f"{placement.source}: {rule.describe()} places '{mod.name}' on {device}, but only attention "
                "cores (model.layers.N.self_attn.attn) can run on a GPU; weights stay on the CPU ranks "
                "(anchor the pattern, e.g. '\\.self_attn\\.attn$')")
        devices = [device.for_rank(local_ranks[r], n_gpus) for r in range(tp_size)]
        if mod.kind == "attention":
            nbytes = [kv_cache_bytes(config, mod.layer, _kv_heads_cached(config, p.layers[mod.layer].heads),
                                     max_seq_len, kv_type, device.is_gpu) for p in parts]
        else:
            nbytes = [sum(_tensor_bytes(tensors[t], split, None if mod.layer is None else p.layers[mod.layer],
                                        p.vocab, config) for t, split in mod.tensors) for p in parts]
        note = "KV cache" if mod.kind == "attention" else ""
        if any(split == "tied" for _, split in mod.tensors):
            note = "tied to model.embed_tokens"
        entries.append(PlanEntry(mod.name, mod.kind, mod.layer, devices, nbytes, rule,
                                 [t for t, _ in mod.tensors], note))
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


# ---------------------------------------------------------------- applying to a model

def apply_placement(model, placement: Placement | Plan, state=None, *, n_gpus: int | None = None) -> list[str]:
    """Replace every attention core placed on a GPU by a DeviceAttention on this rank's GPU.

    Call after the model is built and before ``model.setup_cache``. ``placement`` is a
    Placement (decided by module name) or a Plan from ``resolve_plan`` (decided per rank as
    printed). Returns the names of the replaced modules.
    """
    from .distributed import parallel_state

    state = state if state is not None else parallel_state.get()
    if isinstance(placement, Plan):
        targets = {e.module: e.devices[state.tp_rank] for e in placement.entries
                   if e.kind == "attention" and e.devices[state.tp_rank] != "cpu"}
        gpus = cuda_device_count() if n_gpus is None else n_gpus
        for name, device in targets.items():
            index = int(device.split(":")[1])
            if index >= gpus:
                raise PlacementError(f"{placement.source}: the plan puts {name} on {device}, "
                                     f"but this host has {gpus} CUDA GPU(s)")
        return offload_attention(model, targets)
    check_devices(placement, n_gpus)
    if not placement.uses_gpu:
        return []
    gpus = cuda_device_count() if n_gpus is None else n_gpus
    targets = {}
    for name, _module in _attention_cores(model):
        rule = placement.rule_for(name)
        if rule is not None and rule.device.is_gpu:
            targets[name] = rule.device.for_rank(state.local_rank, gpus)
    return offload_attention(model, targets)


def _attention_cores(model):
    from .layers.attention import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and ATTN_CORE_RE.match(n)]


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
