"""Tensor-parallel linear layers (vLLM semantics) over GGUF weights.

Notation: a weight W is ``[N out, K in]``; ``y = x @ W^T + b``; tp ranks, this rank r.

- ColumnParallelLinear: rank r holds output rows ``[n0, n1)`` -> ``y_r = x @ W[n0:n1]^T``,
  its output stays split (the next row-parallel layer consumes it as is).
- MergedColumnParallelLinear: several column-parallel weights with the same input
  (ffn gate and up) run as one layer; outputs concatenated in order.
- QKVParallelLinear: q, k, v by whole heads (a HeadShard); KV heads a rank's query heads
  need are kept on that rank, replicated when tp > n_kv_heads.
- RowParallelLinear: rank r holds input columns ``[k0, k1)`` (whole quant blocks) ->
  ``y = sum_r x[:, k0:k1] @ W[:, k0:k1]^T``: the sum is the all-reduce in ``forward``.

Every layer can be used alone as a plain ``nn.Module``::

    from tp_numa.gguf_loader import open_gguf
    f = open_gguf("model.gguf")
    down = RowParallelLinear(4864, 896, in_range=(0, 2560))   # this rank's input columns
    down.load_gguf(f, "blk.0.ffn_down.weight")
    y = down(x_local)            # x_local [T, 2560] -> y [T, 896], summed over ranks

Weights keep their GGUF block format; the multiply is the linear method's job (quant.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import parallel_state
from ..errors import ModelFormatError, ShardingError
from ..gguf_loader import GGUFFile
from ..memory import cat_rows
from .partition import HeadShard, Range, split_even
from .quant import linear_method_for, method_of


def _tp() -> tuple[int, int]:
    st = parallel_state.get()
    return st.tp_rank, st.tp_size


def _check_shape(f: GGUFFile, name: str, out_features: int, in_features: int) -> None:
    info = f.info(name)
    if info.shape != (out_features, in_features):
        raise ModelFormatError(
            f"{f.path}: tensor '{name}' has shape {list(info.shape)}, expected [{out_features}, {in_features}]"
        )


class LinearBase(nn.Module):
    """Holds one or more GGUF weight pieces stacked along the output dim.

    Consecutive pieces of the same tensor type are concatenated into one buffer, so e.g.
    gate+up (both Q5_0) is a single quant_matmul; q,k (Q5_0) + v (Q8_0) is two.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.input_size = input_size        # per-rank input features
        self.output_size = output_size      # per-rank output features
        self.has_bias = bias
        self.register_buffer("bias", None, persistent=False)
        self._runs: list[str] = []          # buffer names, in output order

    def _set_weight(self, pieces: list[tuple[torch.Tensor, int]]) -> None:
        """pieces: (uint8 rows [n_i, row_bytes], qtype) in output order."""
        runs: list[tuple[list[torch.Tensor], int]] = []
        for rows, qtype in pieces:
            if runs and runs[-1][1] == qtype:
                runs[-1][0].append(rows)
            else:
                runs.append(([rows], qtype))
        self._runs = []
        for i, (chunks, qtype) in enumerate(runs):
            rows = cat_rows(chunks)
            name = "weight" if len(runs) == 1 else f"weight{i}"
            linear_method_for(qtype, repack=True).create_weights(self, name, rows, qtype)
            self._runs.append(name)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, input_size] float32 -> [T, output_size] (no bias, no communication)."""
        ys = [method_of(self, n).apply(self, n, x) for n in self._runs]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    def extra_repr(self) -> str:
        types = ",".join(str(getattr(self, n + "_qtype", "?")) for n in self._runs)
        return f"in={self.input_size}, out={self.output_size}, bias={self.has_bias}, qtypes={types}"


class MergedColumnParallelLinear(LinearBase):
    """Column-parallel over several weights sharing the input: ``y = [x W_0[r0]^T, x W_1[r1]^T, ...]``.

    ``out_ranges[i]`` is this rank's row range of weight i (full output size
    ``output_sizes[i]``); default: an even split of each.
    """

    def __init__(self, input_size: int, output_sizes: list[int], out_ranges: list[Range] | None = None,
                 bias: bool = False):
        rank, tp = _tp()
        if out_ranges is None:
            out_ranges = [split_even(n, tp)[rank] for n in output_sizes]
        self.output_sizes = list(output_sizes)
        self.out_ranges = [tuple(r) for r in out_ranges]
        self.local_sizes = [b - a for a, b in self.out_ranges]
        super().__init__(input_size, sum(self.local_sizes), bias)

    def _row_ranges(self, i: int) -> list[Range]:
        """Row ranges of weight i this rank reads (one range; QKV may need more)."""
        return [self.out_ranges[i]]

    def load_gguf(self, f: GGUFFile, weights: list[str], biases: list[str] | None = None) -> None:
        pieces = []
        for i, name in enumerate(weights):
            _check_shape(f, name, self.output_sizes[i], self.input_size)
            rows = f.read_row_list(name, self._row_ranges(i))
            pieces.append((rows, int(f.info(name).qtype)))
        self._set_weight(pieces)
        if self.has_bias != (biases is not None):
            raise ValueError(f"{weights}: layer built with bias={self.has_bias} but given biases={biases}")
        if self.has_bias:
            parts = [torch.cat([f.read_float(b, a, e) for a, e in self._row_ranges(i)]) for i, b in enumerate(biases)]
            self.register_buffer("bias", torch.cat(parts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, input_size] -> [T, sum(local_sizes)] (this rank's outputs only)."""
        y = self._matmul(x)
        if self.bias is not None:
            y.add_(self.bias)          # y is fresh (matmul output): add in place
        return y


class ColumnParallelLinear(MergedColumnParallelLinear):
    """``y_r = x @ W[n0:n1]^T (+ b[n0:n1])``: this rank's output rows ``out_range``."""

    def __init__(self, input_size: int, output_size: int, out_range: Range | None = None, bias: bool = False):
        super().__init__(input_size, [output_size], None if out_range is None else [out_range], bias)

    def load_gguf(self, f: GGUFFile, weight: str, bias: str | None = None) -> None:
        super().load_gguf(f, [weight], None if bias is None else [bias])


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q/k/v projection for this rank's heads: ``[T, d] -> [T, (n_q + 2 n_kv) * head_dim]``.

    ``shard.q`` / ``shard.kv`` are the global query / KV head ranges of this rank; KV
    heads shared with another rank are loaded on both (replication when tp > n_kv_heads).
    """

    def __init__(self, input_size: int, head_dim: int, n_heads: int, n_kv_heads: int, shard: HeadShard,
                 bias: bool = False):
        self.head_dim = head_dim
        self.shard = shard
        hd = head_dim
        super().__init__(
            input_size,
            [n_heads * hd, n_kv_heads * hd, n_kv_heads * hd],
            [(shard.q[0] * hd, shard.q[1] * hd), (shard.kv[0] * hd, shard.kv[1] * hd),
             (shard.kv[0] * hd, shard.kv[1] * hd)],
            bias,
        )
        self.local_heads = [n // hd for n in self.local_sizes]     # n_q, n_kv, n_kv

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (n_q + 2 n_kv) hd] -> q [T, n_q, hd], k [T, n_kv, hd], v [T, n_kv, hd]."""
        # one view to heads, then one split along the head dim (views of y, no copies;
        # y is the layer's fresh contiguous output)
        q, k, v = y.view(y.shape[0], -1, self.head_dim).split_with_sizes(self.local_heads, dim=1)
        return q, k, v


class RowParallelLinear(LinearBase):
    """``y = sum over ranks of x_r @ W[:, k0:k1]^T`` (+ b once, after the sum).

    ``in_range`` = this rank's input columns ``[k0, k1)``, on quant-block boundaries of the
    weight (the same range as the column-parallel layer that produced ``x_r``).

    ``exact`` (default): the rank's partial sums are float64 values that do not depend on
    where its range starts or ends (``tp_numa.ops.quant_matmul_exact``), the all-reduce adds
    them in float64 and the result is rounded to float32 once. tp=N then gives bitwise the
    float32 that tp=1 gives (see docs/launch.md, "Reproducibility"). ``exact=False`` sums
    fp32 partials instead: the last bits then depend on tp.
    """

    def __init__(self, input_size: int, output_size: int, in_range: Range | None = None, bias: bool = False,
                 reduce_results: bool = True, tp_size: int | None = None, exact: bool = True):
        rank, tp = _tp()
        self.exact = exact
        tp = tp if tp_size is None else tp_size
        self.tp_size = tp
        self.full_input_size = input_size
        self.in_range = tuple(in_range) if in_range is not None else split_even(input_size, tp)[rank]
        self.reduce_results = reduce_results
        super().__init__(self.in_range[1] - self.in_range[0], output_size, bias)

    def load_gguf(self, f: GGUFFile, weight: str, bias: str | None = None) -> None:
        _check_shape(f, weight, self.output_size, self.full_input_size)
        info = f.info(weight)
        bs = info.block_size
        k0, k1 = self.in_range
        if k0 % bs or k1 % bs:
            raise ShardingError(
                f"tensor '{weight}': input columns [{k0}, {k1}) of this rank do not fall on its "
                f"{info.qtype.name} block boundaries (block size {bs}) at tp={self.tp_size}"
            )
        self._set_weight([(f.read_block_cols(weight, k0 // bs, k1 // bs), int(info.qtype))])
        if self.has_bias != (bias is not None):
            raise ValueError(f"{weight}: layer built with bias={self.has_bias} but given bias={bias}")
        if self.has_bias:
            self.register_buffer("bias", f.read_float(bias), persistent=False)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, k1-k0] -> float64 [T, output_size]: this rank's partial sum, not reduced and
        without the bias (a MoE layer adds it to the routed experts' before its all-reduce)."""
        if self.exact and len(self._runs) == 1:
            n = self._runs[0]
            return method_of(self, n).apply_exact(self, n, x, to_float32=False)
        return self._matmul(x).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, k1-k0] (this rank's share of the inputs) -> [T, output_size] (full sum)."""
        exact = self.exact and len(self._runs) == 1
        reduce = self.reduce_results and self.tp_size > 1
        if exact:
            n = self._runs[0]
            # float64 partials; with nothing to sum across ranks the op rounds them itself
            y = method_of(self, n).apply_exact(self, n, x, to_float32=not reduce)
        else:
            y = self._matmul(x)
        if reduce:
            from ..distributed import communicator

            communicator.all_reduce(y)
        if exact and y.dtype != x.dtype:
            y = y.to(x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32)
        if self.bias is not None:
            y.add_(self.bias)          # y is fresh (matmul output): add in place
        return y
