"""A whole decoder layer on another device (a CUDA GPU), its weights dequantized once to fp16.

``DeviceDecoderLayer.from_layer(layer, device)`` turns one loaded decoder layer of this
rank (``models/llama.py`` DecoderLayer or ``models/gemma3.py`` Gemma3DecoderLayer) into
the same computation on ``device``:

- every linear layer's slice of this rank (the quantized GGUF rows ``LinearBase`` holds)
  is dequantized once with ``gguf.quants.dequantize`` and stored as fp16 ``[N_r, K_r]`` on
  the device, in row chunks so the float32 intermediate stays small; the quantized copy
  is dropped with the old layer (1x RAM: the CPU keeps no copy of a GPU layer);
- norms (and q/k/v biases) move as they are (float32 vectors: their bytes are noise,
  their precision is not);
- the attention core becomes a ``DeviceAttention`` on the device: q/k/v are produced
  there, so they are not copied through the host;
- a MoE FFN becomes a ``DeviceMoE``: router and shared expert on the device, the routed
  experts kept on this rank's CPU node as loaded (quantized), one all-reduce per layer;
- the forward is plain torch (no fused CPU op), with the model's maths:
      llama:  h = x + attn(n1(x));              out = h + mlp(n2(h))
      gemma3: h = x + n2(attn(n1(x)));           out = h + n4(mlp(n3(h)))

Tensor parallelism is unchanged: q/k/v and gate/up are this rank's column slices, o_proj
and down_proj its row slices, and a row-parallel partial result ``y_r = x_r @ W_r^T`` is
summed over the ranks through the CPU communicator: device -> pinned host buffer,
all-reduce on the host, host -> device: two small copies of ``[T, d_model]`` float32 per
row-parallel layer (o_proj, down_proj), so four per layer and forward; none at tp=1.

The residual stream ``x`` (float32) enters with ``x.to(device)`` (a no-op when the
previous layer left it there) and leaves towards ``exit_device``: the next layer's device
when that layer is on a device too, else the CPU (set by ``tp_numa.offload``).

Compute dtype: on CUDA the matmuls run in fp16 (cuBLAS accumulates in fp32) over fp16
weights, with activations rounded to fp16 at each matmul input; the residual, norms and
RoPE stay float32, attention runs in the KV cache dtype (``DeviceAttention``). Measured
activation ranges of the shipped models (max |x| at a matmul input/output: gemma3-270m
526, qwen2.5-0.5b 574) are far inside fp16. Elsewhere (``device="cpu"``, the stand-in the
tests use) the same fp16-rounded weights are multiplied in float32, like
``DeviceAttention`` does (``DeviceLinear.gemm_dtype`` can be set to fp16 there to see
what the CUDA rounding costs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TpNumaError, UnsupportedError
from .device_attention import DeviceAttention
from .linear import LinearBase, QKVParallelLinear, RowParallelLinear
from .moe import MoE
from .norm import RMSNorm
from .quant import method_of

# rows dequantized per step: bounds the float32 intermediate (rows x K x 4 bytes)
_DEQUANT_ROWS = 1024


def dequantized(layer: LinearBase, device: torch.device, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """This rank's weight slice of ``layer`` as ``dtype`` ``[output_size, input_size]`` on ``device``.

    ``LinearBase`` keeps its slice as runs of raw GGUF rows (uint8 ``[n, row_bytes]``, one
    GGML type per run, in output order); each run is dequantized (``ops.dequantize``, bitwise
    ``gguf.quants.dequantize``) and rounded to ``dtype`` (fp16: round to nearest even).
    """
    from .. import ops

    out = torch.empty((layer.output_size, layer.input_size), dtype=dtype, device=device)
    row = 0
    for name in layer._runs:
        rows = method_of(layer, name).raw_rows(layer, name)       # x4-packed weights are unpacked
        qtype = getattr(layer, name + "_qtype")
        for r0 in range(0, rows.shape[0], _DEQUANT_ROWS):
            chunk = rows[r0:r0 + _DEQUANT_ROWS]
            dense = ops.dequantize(chunk, qtype)                           # (n, K) float32
            if dense.shape[1] != layer.input_size:
                raise TpNumaError(f"dequantized rows have {dense.shape[1]} columns, layer expects {layer.input_size}")
            out[row:row + dense.shape[0]] = dense.to(device=device, dtype=dtype)
            row += dense.shape[0]
    if row != layer.output_size:
        raise TpNumaError(f"dequantized {row} rows, layer expects {layer.output_size}")
    return out


class DeviceLinear(nn.Module):
    """``y = x @ W_r^T (+ b)`` with this rank's fp16 slice ``W_r [N_r, K_r]`` on a device.

    ``reduce``: row-parallel at tp > 1, so ``y`` is a partial sum: all-reduced over the
    ranks through the host before the bias is added (once, after the sum).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce: bool):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.reduce = reduce
        self.device = weight.device
        # the GEMM's input dtype: fp16 on CUDA; float32 elsewhere (tests may set fp16 on the
        # CPU stand-in to see what rounding the activations costs)
        self.gemm_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._host: torch.Tensor | None = None       # pinned staging buffer of the all-reduce

    @classmethod
    def from_linear(cls, layer: LinearBase, device: torch.device, dtype: torch.dtype = torch.float16) -> "DeviceLinear":
        """``dtype``: of the stored weight; float32 for the small matrices whose rounding
        matters (a MoE router: a flipped expert choice is a different computation)."""
        bias = None if layer.bias is None else layer.bias.to(device=device, dtype=torch.float32)
        reduce = isinstance(layer, RowParallelLinear) and layer.reduce_results and layer.tp_size > 1
        return cls(dequantized(layer, device, dtype), bias, reduce)

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return (f"in={k}, out={n}, bias={self.bias is not None}, reduce={self.reduce}, fp16 on {self.device}, "
                f"GEMM in {self.gemm_dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K_r] float32 on the device -> y [T, N] float32 on the device."""
        if self.gemm_dtype == torch.float16 and self.weight.dtype == torch.float16:
            y = F.linear(x.to(torch.float16), self.weight).float()   # fp16 GEMM, fp32 accumulate
        else:
            y = F.linear(x, self.weight.float())                        # fp32 over the stored values
        if self.reduce:
            y = self._all_reduce(y)
        if self.bias is not None:
            y.add_(self.bias)           # y is fresh
        return y

    def _all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``y``, via the CPU communicator (the ranks meet on the host)."""
        from ..distributed import communicator

        if y.device.type == "cpu":
            return communicator.all_reduce(y.contiguous())
        if self._host is None or self._host.numel() < y.numel():
            self._host = torch.empty(y.numel(), dtype=torch.float32, pin_memory=True)
        host = self._host[:y.numel()].view(y.shape)
        host.copy_(y)                   # blocking: waits for the GEMM
        communicator.all_reduce(host)
        y.copy_(host)                   # blocking too: `host` is free for the next call
        return y


class DeviceRMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w`` over the last dim, plain torch, float32 on the device."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.eps = eps

    @classmethod
    def from_norm(cls, norm: RMSNorm, device: torch.device) -> "DeviceRMSNorm":
        return cls(norm.weight.to(device=device, dtype=torch.float32), norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DeviceSelfAttention(nn.Module):
    """q/k/v projection, q/k norms, RoPE, attention over the device KV cache, o_proj."""

    def __init__(self, attn, device: torch.device):
        super().__init__()
        qkv: QKVParallelLinear = attn.qkv_proj
        self.local_heads = list(qkv.local_heads)          # n_q, n_kv, n_kv
        self.head_dim = qkv.head_dim
        self.qkv_proj = DeviceLinear.from_linear(qkv, device)
        self.q_norm = None if attn.q_norm is None else DeviceRMSNorm.from_norm(attn.q_norm, device)
        self.k_norm = None if attn.k_norm is None else DeviceRMSNorm.from_norm(attn.k_norm, device)
        self.rotary_emb = attn.rotary_emb                 # shared with the model (cos/sin come in)
        self.register_buffer("kv_expand", None if attn.kv_expand is None else attn.kv_expand.to(device),
                             persistent=False)
        self.attn = DeviceAttention.from_attention(attn.attn, device)
        self.o_proj = DeviceLinear.from_linear(attn.o_proj, device)

    def forward(self, x: torch.Tensor, pos, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, d] (normed) -> [T, d] (summed over ranks), all on the device; ``pos``: int
        start or ``SeqBatch`` (layers/batch.py)."""
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, -1, self.head_dim)                       # (T, n_q + 2 n_kv, hd)
        q, k, v = qkv.split_with_sizes(self.local_heads, dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)                               # per-head RMSNorm
        q, k = self.rotary_emb(q, cos, sin), self.rotary_emb(k, cos, sin)
        if self.kv_expand is not None:
            k, v = k[:, self.kv_expand], v[:, self.kv_expand]                   # (T, n_q, hd)
        out = self.attn(q, k, v, pos)                                           # (T, n_q * hd), on the device
        return self.o_proj(out)


class DeviceMLP(nn.Module):
    """``down(act(gate) * up)`` on this rank's features."""

    def __init__(self, mlp, device: torch.device, reduce: bool = True):
        """``reduce=False``: leave down's output a partial sum at tp > 1 (a MoE's shared
        expert, summed in the layer's one all-reduce)."""
        super().__init__()
        self.local_sizes = list(mlp.gate_up_proj.local_sizes)
        self.act = mlp.act
        self.gate_up_proj = DeviceLinear.from_linear(mlp.gate_up_proj, device)
        self.down_proj = DeviceLinear.from_linear(mlp.down_proj, device)
        self.down_proj.reduce = self.down_proj.reduce and reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.split(self.gate_up_proj(x), self.local_sizes, dim=1)   # (T, f_r) each
        act = F.gelu(gate, approximate="tanh") if self.act == "gelu_tanh" else F.silu(gate)
        return self.down_proj(act * up)


class DeviceMoE(nn.Module):
    """A MoE FFN whose dense part is on ``device`` and whose routed experts stay on this
    rank's CPU node, quantized (llama.cpp's ``-ot exps=CPU``; the ``experts-on-cpu`` preset).

    x [T, d] float32 on the device:
      1. logits = router(x)                     device, float32 weights (routing is sensitive)
      2. x, logits -> host (one copy each, pinned staging buffers on CUDA)
      3. ids, w = route(logits)                 host, ``moe_route`` (identical on every rank)
      4. shared expert s = down(act(gate) * up)(x) * sigmoid(g . x) is launched on the device
         and runs while the host computes
      5. y = experts(x, ids, w)                 host, this rank's slice of every expert, float64
      6. y += s (copied to the host), one all-reduce of y over the ranks, y -> device float32
    One all-reduce per layer, as on the CPU path (``layers/moe.py`` MoE): the shared
    expert's down projection is a partial sum at tp > 1 and rides in the same reduce.
    """

    def __init__(self, moe, device: torch.device):
        super().__init__()
        self.device = device
        self.tp_size = moe.tp_size
        self.router = DeviceLinear.from_linear(moe.gate, device, dtype=torch.float32)
        self.shared_expert = None if moe.shared_expert is None else DeviceMLP(moe.shared_expert, device, reduce=False)
        self.shared_expert_gate = None if moe.shared_expert_gate is None else DeviceLinear.from_linear(
            moe.shared_expert_gate, device, dtype=torch.float32)
        moe.keep_routed_only()
        self.routed = moe                                   # experts + routing, CPU
        self._staging: dict[str, torch.Tensor] = {}

    def _to_host(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.contiguous()
        buf = self._staging.get(name)
        if buf is None or buf.numel() < t.numel():
            buf = self._staging[name] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
        host = buf[:t.numel()].view(t.shape)
        host.copy_(t)                   # blocking: waits for the kernels that made t
        return host

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] float32 on the device -> [T, d] float32 on the device, summed over ranks."""
        logits = self.router(x)                                                  # (T, E)
        xh, lh = self._to_host("x", x), self._to_host("logits", logits)
        s = None
        if self.shared_expert is not None:                                       # queued on the device
            s = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                s = s * torch.sigmoid(self.shared_expert_gate(x))
        ids, w = self.routed.route_logits(lh)
        y = self.routed.experts(xh, ids, w)                                      # (T, d) float64, host
        if s is not None:
            y += self._to_host("shared", s)
        if self.tp_size > 1:
            from ..distributed import communicator

            communicator.all_reduce(y)
        return y.float().to(self.device)


class DeviceTables:
    """RoPE cos/sin of the current positions copied to a device once per forward, shared by
    the device layers that use the same rotary table (keyed by table and device; a hit is
    the very host table of this forward, which the model computes once per forward)."""

    def __init__(self):
        self._last: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, rotary: nn.Module, cos_sin, device: torch.device):
        cos, sin = cos_sin
        if cos.device == device:
            return cos, sin
        key = (id(rotary), device)
        hit = self._last.get(key)
        if hit is not None and hit[0] is cos:
            return hit[1], hit[2]
        entry = (cos, cos.to(device), sin.to(device))
        self._last[key] = entry
        return entry[1], entry[2]


_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class DeviceDecoderLayer(nn.Module):
    """One decoder layer of this rank on ``device``; same module names as the CPU layer."""

    def __init__(self, layer: nn.Module, device: torch.device | str, tables: DeviceTables | None = None):
        super().__init__()
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TpNumaError(f"a decoder layer is placed on {device}, but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())   # comparable with tensors' devices
        missing = [n for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
                   if not hasattr(layer, n)]
        if missing:
            raise UnsupportedError(f"{type(layer).__name__} cannot be placed on a GPU: it has no {', '.join(missing)}")
        self.device = device
        self.exit_device = torch.device("cpu")
        # gemma3's sandwich: a norm after each sub-block, the FFN's input norm separate
        self.sandwich = hasattr(layer, "pre_feedforward_layernorm")
        for name in _NORMS:
            if hasattr(layer, name):
                setattr(self, name, DeviceRMSNorm.from_norm(getattr(layer, name), device))
        self.self_attn = DeviceSelfAttention(layer.self_attn, device)
        self.mlp = DeviceMoE(layer.mlp, device) if isinstance(layer.mlp, MoE) else DeviceMLP(layer.mlp, device)
        self.layer_idx = layer.self_attn.layer_idx
        self.tables = tables if tables is not None else DeviceTables()

    @classmethod
    def from_layer(cls, layer: nn.Module, device: torch.device | str,
                   tables: DeviceTables | None = None) -> "DeviceDecoderLayer":
        """Dequantizes ``layer``'s weights onto ``device``; the caller drops ``layer`` afterwards."""
        return cls(layer, device, tables)

    def extra_repr(self) -> str:
        return f"layer {self.layer_idx} on {self.device}, exit to {self.exit_device}"

    def forward(self, x: torch.Tensor, pos, cos_sin) -> torch.Tensor:
        """x [T, d] float32 (any device) -> [T, d] float32 on ``exit_device``; ``pos``: int
        start or ``SeqBatch``."""
        x = x.to(self.device)
        cos, sin = self.tables.get(self.self_attn.rotary_emb, cos_sin, self.device)
        a = self.self_attn(self.input_layernorm(x), pos, cos, sin)           # (T, d)
        if self.sandwich:
            h = x + self.post_attention_layernorm(a)
            out = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        else:
            h = x + a
            out = h + self.mlp(self.post_attention_layernorm(h))
        return out if out.device == self.exit_device else out.to(self.exit_device)
