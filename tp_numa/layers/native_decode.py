"""The decode step of all decoder layers in one native call (``torch.classes.tp_numa.DecodePlan``).

A decode step runs M tokens, each the next token of its own KV sequence (``layers.batch``:
a ``SeqBatch`` of M one-token spans; ``tp-numa generate`` is M = 1, sequence 0). A step
through the nn.Modules is ~24 layers x ~12 small native ops; calling each
from Python (module ``__call__``, attribute lookups, op dispatch, the Python glue between
them) cost 3.7-6.4 ms of a 26-28 ms Qwen2.5-0.5B step at 2 threads. ``build_plan`` walks the
loaded modules once and hands their tensors (weights, norm weights, KV caches: the same
storage, nothing copied) to a C++ ``DecodePlan`` (csrc/decode/decode_plan.h), which then runs
a step's layers with the same C++ entry points on the same tensors in the same order the
modules use (every matmul on all M rows at once, attention per row over its sequence's
cache): the result is bitwise the module path's for every M, at tp=1 and under tensor
parallelism (the plan calls the shm all-reduce itself).

The model (``DecoderModel.forward``) uses the plan for every decode step
(``SeqBatch.is_decode``) whenever ``plan_for`` returns one; everything else (prefill,
GPU-placed layers, other dtypes) runs the modules. The plan covers what the fused CPU path of the modules covers; ``why_not(model)`` says why a model
does not qualify. Switches: ``TP_NUMA_NATIVE_DECODE=0`` in the environment, or
``set_enabled(False)`` in-process (``scripts/profile_decode.py --ab-native``).
"""
from __future__ import annotations

import os

import torch

from ..errors import TpNumaError
from . import fused_path
from .attention import Attention
from .batch import SeqBatch
from .moe import MoE
from .norm import RMSNorm
from .quant import GGUFLinearMethod, X4LinearMethod, method_of

_state = {"enabled": os.environ.get("TP_NUMA_NATIVE_DECODE", "1") != "0", "available": None}

# DecodePlan.set_linear's index of each projection
_QKV, _O_PROJ, _GATE_UP, _DOWN, _ROUTER, _SHARED_GATE = range(6)


def set_enabled(on: bool) -> None:
    """Switch the native decode step on or off in this process (plans are kept)."""
    _state["enabled"] = bool(on)


def available() -> bool:
    """True when the extension is built with ``DecodePlan``."""
    if _state["available"] is None:
        from .._ext import load_extension

        try:
            load_extension()
            torch.classes.tp_numa.DecodePlan   # noqa: B018  (raises if not registered)
            _state["available"] = True
        except (TpNumaError, RuntimeError, AttributeError):
            _state["available"] = False
    return _state["available"]


def enabled() -> bool:
    """Switched on, built, and the fused row ops on (the plan reproduces the fused path)."""
    return _state["enabled"] and fused_path.enabled() and available()


class NativeDecode:
    """A built plan plus what the Python side checks before each call."""

    def __init__(self, plan, layers: list):
        self.plan = plan
        self._layers = layers
        self._attns = [layer.self_attn.attn for layer in layers]
        self._caches = [a.k_cache for a in self._attns]    # the caches the plan holds
        self._first_attn = self._attns[0]

    def current(self, model) -> bool:
        """False once a layer or its attention core was replaced (e.g. moved to a GPU) or a
        cache reallocated (``setup_cache`` again): the plan must be rebuilt. Replaced
        weights are not seen here (``load_gguf`` and ``offload.apply_placement`` call
        ``reset``). Runs every decode step: dict reads, no nn.Module attribute lookups."""
        mods = model.layers._modules.values()
        if len(mods) != len(self._layers):
            return False
        for m, layer, a, kc in zip(mods, self._layers, self._attns, self._caches):
            if m is not layer or layer._modules["self_attn"]._modules["attn"] is not a or a.k_cache is not kc:
                return False
        return True

    def forward(self, x: torch.Tensor, batch: SeqBatch,
                tables: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One decode step: x [M, d] float32 (left unchanged), row m the token of
        ``batch.spans[m]`` (M one-token spans of distinct sequences) -> [M, d] after every
        layer. ``tables[j]`` = (cos, sin) [M, rope_dim/2] of rope j at the rows' positions."""
        if not batch.is_decode or batch.n_tokens != x.shape[0]:
            raise ValueError(f"a native decode step takes one token per span: {batch} for {x.shape[0]} rows")
        attn = self._first_attn                             # every layer has the same context and sequences
        for s in batch.spans:
            attn.check_positions(s.start, 1, s.seq)
        try:
            return self.plan.forward(x, [s.start for s in batch.spans], [s.seq for s in batch.spans],
                                     [c for c, _ in tables], [s for _, s in tables])
        except RuntimeError as e:
            if "tp_numa shm" in str(e):
                from ..distributed.shm import _comm_error

                raise _comm_error(RuntimeError(str(e)[str(e).index("tp_numa shm"):])) from None
            raise


def why_not(model) -> str | None:
    """None if ``model`` (a DecoderModel) can decode through a DecodePlan, else the reason."""
    from ..models.gemma3 import Gemma3DecoderLayer
    from ..models.llama import DecoderLayer

    if not enabled():
        return "native decode switched off or not built (TP_NUMA_NATIVE_DECODE, fused ops, extension)"
    eps = {float(m.eps) for m in model.layers.modules() if isinstance(m, RMSNorm)}
    if eps - {float(model.cfg.norm_eps)}:
        return f"layer norms with eps {sorted(eps)} other than the model's {model.cfg.norm_eps}"
    for i, layer in enumerate(model.layers):
        if type(layer) not in (DecoderLayer, Gemma3DecoderLayer):
            return f"layer {i} is a {type(layer).__name__}"
        attn = layer.self_attn
        if type(attn.attn) is not Attention or attn.attn.use_native is False:
            return f"layer {i}: attention is not the native CPU attention"
        if attn.attn.k_cache is None or not attn.attn.k_cache.is_cpu:
            return f"layer {i}: no CPU KV cache (setup_cache not called?)"
        if attn.q_norm is not None and not isinstance(attn.q_norm, RMSNorm):
            return f"layer {i}: q/k norm over all heads (olmoe) runs in the module path"
        if attn.kv_expand is not None:
            return f"layer {i}: this rank's query heads straddle KV groups unevenly"
        ffn_linears = _ffn_linears(layer.mlp)
        dense = layer.mlp if not isinstance(layer.mlp, MoE) else layer.mlp.shared_expert
        if dense is not None and not dense._fusable:
            return f"layer {i}: gate and up halves differ in width"
        if isinstance(layer.mlp, MoE):
            ex = layer.mlp.experts
            if any(t is None or not t.is_cpu for t in (ex.gate, ex.up, ex.down)):
                return f"layer {i}: the routed experts are not in CPU memory"
        for lin in (attn.qkv_proj, attn.o_proj, *ffn_linears):
            for n in lin._runs:
                if not isinstance(method_of(lin, n), (GGUFLinearMethod, X4LinearMethod)) or not getattr(lin, n).is_cpu:
                    return f"layer {i}: weight {n} is not a CPU GGUF weight"
        floats = [m.weight for m in layer.modules() if isinstance(m, RMSNorm)]
        floats += [lin.bias for lin in (attn.qkv_proj, attn.o_proj) if lin.bias is not None]
        floats += [lin.bias for lin in ffn_linears if lin.bias is not None]
        for t in floats:
            if t.dtype is not torch.float32 or not t.is_cpu:
                return f"layer {i}: a {t.dtype} {t.device} norm weight or bias"
    return None


def build_plan(model) -> NativeDecode:
    """Build the plan of a DecoderModel whose ``why_not`` is None (caches set up)."""
    from ..distributed import communicator
    from ..models.gemma3 import Gemma3DecoderLayer

    reason = why_not(model)
    if reason is not None:
        raise TpNumaError(f"native decode does not apply: {reason}")
    reduce = any(layer.self_attn.o_proj.reduce_results and layer.self_attn.o_proj.tp_size > 1
                 for layer in model.layers)
    handle = communicator.shm_all_reduce_handle() if reduce else None
    if reduce and handle is None:
        raise TpNumaError("native decode does not apply: the all-reduce does not go through shared memory")
    cfg = model.cfg
    plan = torch.classes.tp_numa.DecodePlan(cfg.d_model, float(cfg.norm_eps), -1 if handle is None else handle)
    for i, layer in enumerate(model.layers):
        sa = layer.self_attn
        if isinstance(layer, Gemma3DecoderLayer):
            norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm]
        else:
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
        qk = [] if sa.q_norm is None else [sa.q_norm.weight.contiguous(), sa.k_norm.weight.contiguous()]
        a = sa.attn
        plan.add_layer([n.weight.contiguous() for n in norms], qk, [a.n_heads, a.n_kv_heads, a.head_dim],
                       model._rope_index[model.rope_keys[i]], sa.rotary_emb.style == "neox", a.scale,
                       a.k_cache, a.v_cache, layer.mlp.act == "gelu_tanh")
        _set_linear(plan, _QKV, sa.qkv_proj)
        _set_linear(plan, _O_PROJ, sa.o_proj)
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            _set_moe(plan, mlp)
            mlp = mlp.shared_expert
        if mlp is not None:
            shared = isinstance(layer.mlp, MoE)
            _set_linear(plan, _GATE_UP, mlp.gate_up_proj)
            _set_linear(plan, _DOWN, mlp.down_proj, reduce=False if shared else None)
    return NativeDecode(plan, list(model.layers))


def _ffn_linears(mlp) -> list:
    """The linear layers of a dense MLP or of a MoE block (router, shared gate, shared expert)."""
    if not isinstance(mlp, MoE):
        return [mlp.gate_up_proj, mlp.down_proj]
    out = [mlp.gate]
    if mlp.shared_expert_gate is not None:
        out.append(mlp.shared_expert_gate)
    if mlp.shared_expert is not None:
        out += [mlp.shared_expert.gate_up_proj, mlp.shared_expert.down_proj]
    return out


def _set_moe(plan, moe: MoE) -> None:
    """The MoE block's routing, expert buffers and router / shared gate (MoE.forward's calls)."""
    c, ex = moe.cfg, moe.experts
    plan.set_moe(c.n_expert_used, c.gating, c.norm_weights, float(c.weights_scale), c.n_groups, c.groups_used,
                 [ex.gate, ex.up, ex.down], ex.offsets, ex.ff, list(ex.qtypes), list(ex.layouts),
                 moe.shared_expert is not None, moe.tp_size > 1,
                 moe.expert_counts if moe.count_experts else None)
    _set_linear(plan, _ROUTER, moe.gate)
    if moe.shared_expert_gate is not None:
        _set_linear(plan, _SHARED_GATE, moe.shared_expert_gate)


def _set_linear(plan, which: int, lin, reduce: bool | None = None) -> None:
    weights, qtypes, rows, layouts = [], [], [], []
    for n in lin._runs:
        w = getattr(lin, n)
        x4 = isinstance(method_of(lin, n), X4LinearMethod)
        weights.append(w)
        qtypes.append(getattr(lin, n + "_qtype"))
        rows.append(getattr(lin, n + "_rows") if x4 else w.shape[0])
        layouts.append(1 if x4 else 0)
    row_parallel = which in (_O_PROJ, _DOWN)
    exact = bool(getattr(lin, "exact", True))
    if reduce is None:
        reduce = row_parallel and lin.reduce_results and lin.tp_size > 1
    bias = None if lin.bias is None else lin.bias.contiguous()
    plan.set_linear(which, weights, qtypes, rows, layouts, bias, exact, reduce)


def plan_for(model) -> NativeDecode | None:
    """The model's current plan (built on first use, rebuilt after ``setup_cache``), or None
    when the native step does not apply. Cheap to call every step."""
    if not enabled():
        return None
    cached = model.__dict__.get("_native_decode")
    if cached is not None:
        if cached is not False and cached.current(model):
            return cached
        if cached is False and model.__dict__.get("_native_decode_caches") == _cache_ids(model):
            return None
    if why_not(model) is not None:
        model.__dict__["_native_decode"] = False
        model.__dict__["_native_decode_caches"] = _cache_ids(model)
        return None
    nd = build_plan(model)
    model.__dict__["_native_decode"] = nd
    return nd


def reset(model) -> None:
    """Forget the model's plan (call after replacing weights or layers)."""
    model.__dict__.pop("_native_decode", None)
    model.__dict__.pop("_native_decode_caches", None)


def _cache_ids(model) -> tuple:
    return tuple(id(getattr(layer.self_attn.attn, "k_cache", None)) if hasattr(layer, "self_attn") else None
                 for layer in model.layers)
