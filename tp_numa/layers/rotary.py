"""Rotary position embedding (RoPE) in llama.cpp's two layouts.

For head dims ``i < rope_dim/2`` the pair (a, b) is rotated by the angle
``theta_i(p) = (p / scale) * base^(-2i / rope_dim) / factor_i``:
``a' = a cos - b sin``, ``b' = a sin + b cos``.

- ``norm`` (llama): pairs are adjacent, ``(x[2i], x[2i+1])`` (the GGUF converter
  permutes llama's q/k rows so that this layout applies);
- ``neox`` (qwen2, qwen3, gemma3): pairs are halves, ``(x[i], x[i + rope_dim/2])``.

Dims ``>= rope_dim`` pass unchanged. ``factor_i`` are llama3-style frequency factors
(GGUF tensor ``rope_freqs.weight``), 1 when absent. Angles are computed in float64 and
the rotation in float32.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import fused_ops
from . import fused_path

_DECODE_ROWS = 256   # positions per cos/sin table of decode steps

class RotaryEmbedding(nn.Module):
    def __init__(self, rope_dim: int, base: float, style: str, scale: float = 1.0,
                 freq_factors: torch.Tensor | None = None):
        super().__init__()
        if style not in ("norm", "neox"):
            raise ValueError(f"rope style must be 'norm' or 'neox', got {style!r}")
        self.rope_dim = rope_dim
        self.base = base
        self.style = style
        self.scale = scale
        inv = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)   # (rope_dim/2,)
        if freq_factors is not None:
            inv = inv / freq_factors.to(torch.float64)
        self.register_buffer("inv_freq", inv / scale, persistent=False)
        self._rows_start = 0
        self._rows: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0, rope_dim // 2), torch.empty(0, rope_dim // 2))

    def cos_sin(self, start_pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rope_dim/2] for positions start_pos .. start_pos+T-1.

        A decode step (T = 1) reads its row from a table of the next ``_DECODE_ROWS``
        positions, computed when the step leaves the table (decode walks positions in
        order): the same values, one small computation per 256 steps instead of six ops each."""
        if T == 1:
            off = start_pos - self._rows_start
            if not 0 <= off < self._rows[0].shape[0]:
                self._rows_start, off = start_pos, 0
                self._rows = self._compute(start_pos, _DECODE_ROWS)
            return self._rows[0][off:off + 1], self._rows[1][off:off + 1]
        return self._compute(start_pos, T)

    def cos_sin_for(self, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rope_dim/2] for ``pos``: an int start (with ``T`` rows given by the
        caller through ``cos_sin``) or a ``SeqBatch``: every token's own position, the same
        values ``cos_sin`` gives for that position. One span uses ``cos_sin`` itself."""
        if len(pos.spans) == 1:
            s = pos.spans[0]
            return self.cos_sin(s.start, s.length)
        return self.cos_sin_at(pos.positions())

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rope_dim/2] for arbitrary int64 ``positions`` [T]."""
        ang = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        return ang.cos().float(), ang.sin().float()

    def _compute(self, start_pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_sin_at(torch.arange(start_pos, start_pos + T))

    def rotate_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Like ``forward`` but may overwrite x: float32 CPU x [T, H, D] whose heads and dims
        are contiguous (e.g. a view of the fused qkv output) is rotated in place by one
        native call and returned; anything else goes through ``forward`` (a new tensor)."""
        if (x.dim() == 3 and x.stride(2) == 1 and (x.shape[1] == 1 or x.stride(1) == x.shape[2])
                and x.dtype == torch.float32 and x.device.type == "cpu" and fused_path.applies(cos, sin)):
            return fused_ops.rope_(x, cos, sin, self.style == "neox")
        return self.forward(x, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] -> rotated [T, H, D] (a new tensor); cos/sin [T, rope_dim/2] from ``cos_sin``."""
        rd = self.rope_dim
        rot, rest = x[..., :rd], x[..., rd:]
        c, s = cos[:, None, :], sin[:, None, :]                  # (T, 1, rd/2)
        if self.style == "neox":
            a, b = rot[..., : rd // 2], rot[..., rd // 2:]
            out = torch.cat([a * c - b * s, a * s + b * c], dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    def extra_repr(self) -> str:
        return f"dim={self.rope_dim}, base={self.base}, style={self.style}, scale={self.scale}"
