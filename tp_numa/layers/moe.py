"""Mixture-of-experts FFN, expert tensor parallel: every rank holds a slice of every expert.

Per MoE layer on each rank (T tokens, d = d_model, E experts, k chosen per token, this
rank's features ``[f0_e, f1_e)`` of expert e, see ``partition.partition_experts``):

    logits  = router(x)                                   (T, E)  replicated: same on every rank
    ids, w  = route(logits)                               (T, k)  softmax -> top-k (-> renormalise)
    y_r     = sum_j w_j down_e[:, f0_e:f1_e](act(gate_e[f0_e:f1_e] x) * up_e[f0_e:f1_e] x)
            + shared_expert_r(x) (x sigmoid(w_shexp . x) for qwen2moe)        float64 partials
    out     = float32(sum over ranks of y_r)              ONE all-reduce per MoE layer

Each chosen expert is read by all ranks at once, each from its own node's memory, so a
token's expert bytes are split over the sockets (1x RAM in total). The partials stay in
float64 until after the all-reduce, as in ``RowParallelLinear``: tp=N gives tp=1's float32.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import moe_ops, ops
from ..errors import ModelFormatError
from ..gguf_loader import GGUFFile
from ..memory import empty_weight
from ..moe_config import MoEConfig
from .linear import ColumnParallelLinear
from .partition import Range
from .quant import GGUFLinearMethod, x4_pays

_MATS = ("gate", "up", "down")


class FusedExperts(nn.Module):
    """This rank's slice of every routed expert of one layer, in three flat weight buffers.

    Expert e's slice is gate and up rows ``[f0_e, f1_e)`` of d inputs and down's input
    columns ``[f0_e, f1_e)`` of its d rows (``ff[e] = f1_e - f0_e``, 0 when this rank holds
    nothing of e). Buffers ``gate``/``up``/``down``: uint8, every expert's slice back to
    back (``offsets[m, e]`` = byte offset), in the x4 layout when the type has one
    (``layouts[m] = 1``), else raw GGUF rows. No float copy of any expert exists.
    """

    def __init__(self, n_expert: int, d_model: int, expert_ff: int, ranges: tuple[Range, ...], act: str = "silu"):
        super().__init__()
        if len(ranges) != n_expert:
            raise ValueError(f"FusedExperts: {len(ranges)} feature ranges for {n_expert} experts")
        self.n_expert, self.d_model, self.expert_ff = n_expert, d_model, expert_ff
        self.ranges = tuple(tuple(r) for r in ranges)
        self.gelu = act == "gelu_tanh"
        self.register_buffer("ff", torch.tensor([b - a for a, b in self.ranges], dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.zeros(3, n_expert, dtype=torch.int64), persistent=False)
        for m in _MATS:
            self.register_buffer(m, None, persistent=False)
        self.qtypes = [0, 0, 0]
        self.layouts = [0, 0, 0]

    def load_gguf(self, f: GGUFFile, prefix: str) -> None:
        E, d, F = self.n_expert, self.d_model, self.expert_ff
        down = prefix + "ffn_down_exps.weight"
        self._check(f, down, (E, d, F))
        if f.has(prefix + "ffn_gate_up_exps.weight"):
            # merged form: expert e's gate rows, then its up rows
            merged = prefix + "ffn_gate_up_exps.weight"
            self._check(f, merged, (E, 2 * F, d))
            gate_src = (merged, lambda e, a, b: (e * 2 * F + a, e * 2 * F + b))
            up_src = (merged, lambda e, a, b: (e * 2 * F + F + a, e * 2 * F + F + b))
        else:
            gate, up = prefix + "ffn_gate_exps.weight", prefix + "ffn_up_exps.weight"
            self._check(f, gate, (E, F, d))
            self._check(f, up, (E, F, d))
            gate_src = (gate, lambda e, a, b: (e * F + a, e * F + b))
            up_src = (up, lambda e, a, b: (e * F + a, e * F + b))
        for i, (name, rows_of) in enumerate((gate_src, up_src)):
            self._stack(i, f, name, lambda e, a, b, name=name, rows_of=rows_of: f.read_rows(name, *rows_of(e, a, b)))
        bs = f.info(down).block_size
        self._stack(2, f, down, lambda e, a, b: f.read_block_cols(down, a // bs, b // bs, e * d, (e + 1) * d))

    def _check(self, f: GGUFFile, name: str, shape: tuple[int, int, int]) -> None:
        info = f.info(name)
        if tuple(info.shape) != shape:
            raise ModelFormatError(f"{f.path}: expert tensor '{name}' has shape {list(info.shape)}, expected "
                                   f"{list(shape)} ([experts, out, in])")

    def _stack(self, m: int, f: GGUFFile, name: str, read) -> None:
        """Read every expert's slice of matrix m (``read(e, f0, f1)`` -> raw rows) into one buffer."""
        qtype = int(f.info(name).qtype)
        rows = [self.d_model if m == 2 else b - a for a, b in self.ranges]
        x4 = x4_pays(qtype) and all(r % 4 == 0 for r in rows)
        slices = [read(e, a, b) if b > a else None for e, (a, b) in enumerate(self.ranges)]
        sizes = [0 if s is None else s.numel() for s in slices]    # x4 keeps the bytes of the rows
        flat = empty_weight(max(1, sum(sizes)))
        off = 0
        for e, s in enumerate(slices):
            self.offsets[m, e] = off
            if s is None:
                continue
            packed = ops.pack_x4(s, qtype) if x4 else s
            flat[off: off + sizes[e]].copy_(packed.reshape(-1))
            off += sizes[e]
            slices[e] = None
        setattr(self, _MATS[m], flat)
        self.qtypes[m] = qtype
        self.layouts[m] = 1 if x4 else 0

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, d] float32, ids/weights [T, k] -> float64 [T, d]: this rank's partial sum."""
        return moe_ops.moe_experts(x, ids, weights, [self.gate, self.up, self.down], self.offsets, self.ff,
                                   self.qtypes, self.layouts, self.gelu)

    def slice_bytes(self) -> torch.Tensor:
        """Weight bytes this rank holds of each expert (int64 [E]): what a token choosing e reads here."""
        per = torch.zeros(self.n_expert, dtype=torch.int64)
        for m in range(3):
            buf = getattr(self, _MATS[m])
            ends = torch.cat([self.offsets[m, 1:], torch.tensor([buf.numel()])])
            per += torch.where(self.ff > 0, ends - self.offsets[m], 0)
        return per

    def extra_repr(self) -> str:
        return (f"experts={self.n_expert}, d={self.d_model}, n_ff_exp={self.expert_ff}, "
                f"local features={int(self.ff.sum())}, qtypes={self.qtypes}, x4={self.layouts}")


class MoE(nn.Module):
    """A MoE FFN block on this rank: router, routed expert slices, shared expert slice."""

    def __init__(self, moe: MoEConfig, d_model: int, experts: tuple[Range, ...], shared: Range | None,
                 shared_mlp: nn.Module | None, tp_size: int, act: str = "silu"):
        super().__init__()
        self.cfg = moe
        self.tp_size = tp_size
        self.act = act
        self.gate = ColumnParallelLinear(d_model, moe.n_expert, out_range=(0, moe.n_expert))   # router, replicated
        self.experts = FusedExperts(moe.n_expert, d_model, moe.expert_ff, experts, act)
        self.shared_expert = shared_mlp
        self.shared_expert_gate = ColumnParallelLinear(d_model, 1, out_range=(0, 1)) if moe.shared_gate else None
        self.register_buffer("expert_counts", torch.zeros(moe.n_expert, dtype=torch.int64), persistent=False)
        self.count_experts = False       # --verbose: count how often each expert is chosen

    def load_gguf(self, f: GGUFFile, prefix: str) -> None:
        self.gate.load_gguf(f, prefix + "ffn_gate_inp.weight")
        self.experts.load_gguf(f, prefix)
        if self.shared_expert is not None:
            self.shared_expert.load_gguf(f, prefix, suffix="_shexp")
        if self.shared_expert_gate is not None:
            _load_vector_row(self.shared_expert_gate, f, prefix + "ffn_gate_inp_shexp.weight")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> expert ids int64 [T, k], weights float32 [T, k] (identical on every rank)."""
        return self.route_logits(self.gate(x))

    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] float32 (CPU) -> ids int64 [T, k], weights float32 [T, k]:
        the gating, top-k and renormalisation of ``cfg`` (``moe_route``)."""
        c = self.cfg
        ids, w = moe_ops.moe_route(logits, None, c.n_expert_used, c.gating, c.norm_weights, c.weights_scale,
                                   c.n_groups, c.groups_used)
        if self.count_experts:
            self.expert_counts.index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int64))
        return ids, w

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> float64 [T, d]: this rank's routed + shared partial sum (before the all-reduce)."""
        ids, w = self.route(x)
        y = self.experts(x, ids, w)                                            # (T, d) float64
        if self.shared_expert is not None:
            s = self.shared_expert.partial(x)                                  # (T, d) float64
            if self.shared_expert_gate is not None:
                s = s * torch.sigmoid(self.shared_expert_gate(x)).double()     # (T, 1) gate per token
            y += s
        return y

    def keep_routed_only(self) -> None:
        """Drop the router, shared expert and its gate (``DeviceMoE`` holds them on a device
        now): what stays is the routed experts' slices, ``route_logits`` and the counters."""
        self.gate = None
        self.shared_expert = None
        self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] float32 -> [T, d] float32 summed over ranks (one all-reduce)."""
        y = self.partial(x)
        if self.tp_size > 1:
            from ..distributed import communicator

            communicator.all_reduce(y)
        return y.float()


def _load_vector_row(lin: ColumnParallelLinear, f: GGUFFile, name: str) -> None:
    """A 1-D weight [d] (qwen2moe's ffn_gate_inp_shexp) as the F32 row of a [1, d] linear."""
    info = f.info(name)
    if tuple(info.shape) not in ((lin.input_size,), (1, lin.input_size)):
        raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}, expected [{lin.input_size}]")
    row = f.read_float(name).reshape(1, lin.input_size).contiguous()
    rows = empty_weight(1, lin.input_size * 4)
    rows.copy_(row.view(torch.uint8))
    GGUFLinearMethod().create_weights(lin, "weight", rows, 0)
    lin._runs = ["weight"]
