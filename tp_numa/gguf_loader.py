"""Memory-mapped GGUF reading, validation, and per-rank slices of tensors.

A GGUF weight of logical shape ``[N out, K in]`` is stored row-major as N rows of
``K / block_size`` quant blocks (``type_size`` bytes each); GGUF lists the dims reversed
(``ne0 = K`` first). Two kinds of slice are ever needed:

- column shard (output rows ``[r0, r1)``): one contiguous byte range of the mmap;
- row shard (input blocks ``[b0, b1)`` of every row): a strided view of the mmap.

Either way the slice is copied into a fresh contiguous ``uint8`` tensor in weight memory
(``tp_numa.memory.empty_weight``: transparent huge pages from 2 MiB on). Callers bind the
rank to its NUMA node *before* loading, so the first touch of that copy places its pages
in node-local memory; only the pages of the rank's own slice are ever read from the file.
Every copy is counted in ``GGUFFile.loaded_bytes`` (per tensor name) so tests can check
the per-rank resident weight bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .errors import ModelFormatError, UnsupportedError
from .gguf_metadata import map_gguf, parse_kv
from .memory import cat_rows, empty_weight

GGUF_MAGIC = b"GGUF"

# Tensor types the linear layers can run (the quant_matmul op's list) and that
# gguf.quants can dequantize for small replicated tensors.
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[n]
    for n in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    )
)

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen2moe", "qwen3moe", "olmoe")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in the file and how its rows are laid out.

    ``shape`` is the logical (torch-order) shape, e.g. ``(N, K)`` for a weight.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int         # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def n_rows(self) -> int:
        """Number of rows (product of all dims but the innermost)."""
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def n_cols(self) -> int:
        """Elements per row (innermost dim, K)."""
        return self.shape[-1]

    @property
    def n_blocks(self) -> int:
        """Quant blocks per row."""
        return self.n_cols // self.block_size

    @property
    def row_bytes(self) -> int:
        return self.n_blocks * self.type_size


def parse_header(buf, path: str, size: int) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Metadata and tensor infos of the GGUF header in ``buf`` (little-endian v2/v3)::

        magic | u32 version | u64 n_tensors | u64 n_kv | n_kv x (key, value)
        | n_tensors x (name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset)
        | padding to ``general.alignment`` (default 32) | tensor data

    Parsed here (the key/value section by ``gguf_metadata.parse_kv``) instead of with
    ``gguf.GGUFReader``, which builds one numpy view per array element (tens of seconds
    for a 262144-token vocabulary on a busy core). Numeric metadata arrays stay numpy
    arrays; ``GGUFHeader.metadata`` hands them out as lists. Every tensor's byte range is
    checked against the file ``size``."""
    cur, n_tensors, meta = parse_kv(buf, path)
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        raw_infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        # as llama.cpp's gguf reader: the data offset is padded to a power of 2
        raise ModelFormatError(f"{path}: metadata 'general.alignment' = {align!r} is not a power of 2")
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, TensorInfo] = {}
    for name, dims, raw_type, offset in raw_infos:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedError(f"{path}: tensor '{name}' has unknown GGML type id {raw_type}") from None
        block, tsize = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims)) if dims else 1
        if dims and dims[0] % block:
            raise ModelFormatError(
                f"{path}: tensor '{name}' rows of {dims[0]} elements are not whole {qtype.name} blocks")
        n_bytes = n_elems // block * tsize
        start = data_start + offset
        if start + n_bytes > size:
            raise ModelFormatError(
                f"{path}: file is truncated: tensor '{name}' ends at byte {start + n_bytes} "
                f"but the file has {size} bytes")
        # GGUF lists dims innermost first; TensorInfo.shape is torch order
        tensors[name] = TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start, n_bytes)
    return meta, tensors


class GGUFHeader:
    """Metadata + tensor infos of a GGUF file, read without touching tensor data.

    ``tp-numa plan`` and ``config.ModelConfig.from_gguf`` need only these (arch, metadata,
    require, has, info); ``GGUFFile`` adds the tensor reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with map_gguf(self.path) as (mm, size):
            self.meta, self.tensors = parse_header(mm, self.path, size)

    # ---- metadata ----
    @property
    def arch(self) -> str:
        return self.require("general.architecture")

    def check_arch(self) -> str:
        arch = self.arch
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedError(
                f"{self.path}: architecture '{arch}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        return arch

    def metadata(self, key: str, default: Any = None) -> Any:
        """Value of a metadata key (str, number, bool or list), ``default`` if absent."""
        value = self.meta.get(key, default)
        return value.tolist() if isinstance(value, np.ndarray) else value

    def require(self, key: str) -> Any:
        value = self.metadata(key)
        if value is None:
            raise ModelFormatError(f"{self.path}: metadata key '{key}' is missing")
        return value

    # ---- tensor infos ----
    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """Tensor info; ModelFormatError / UnsupportedError if missing or of an unusable type."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: tensor '{name}' is missing")
        if info.qtype not in SUPPORTED_TYPES:
            raise UnsupportedError(
                f"{self.path}: tensor '{name}' has type {info.qtype.name}, which is not supported "
                f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
            )
        return info


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file, no tensor data (cheap on any model size)."""
    return GGUFHeader(path)


class GGUFFile(GGUFHeader):
    """An opened, validated GGUF file. Reads metadata and per-rank tensor slices."""

    def __init__(self, path: str | os.PathLike):
        path = str(path)
        if not os.path.exists(path):
            raise ModelFormatError(f"model file not found: {path}")
        if not os.path.isfile(path):
            raise ModelFormatError(f"model path is not a file: {path}")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file (bad magic {magic!r})")
        super().__init__(path)
        self._mm: np.memmap = np.memmap(self.path, mode="r")
        # bytes copied out of the file per tensor name (this process only)
        self.loaded_bytes: dict[str, int] = {}

    def _rows_view(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a [n_rows, row_bytes] view of the mmap (no copy)."""
        return self._mm[info.offset: info.offset + info.n_bytes].reshape(info.n_rows, info.row_bytes)

    def _count(self, name: str, nbytes: int) -> None:
        self.loaded_bytes[name] = self.loaded_bytes.get(name, 0) + nbytes

    def read_rows(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Raw rows ``[r0, r1)`` (a column-parallel shard) as uint8 ``[r1-r0, row_bytes]``."""
        info = self.info(name)
        r0 = 0 if r0 is None else r0
        r1 = info.n_rows if r1 is None else r1
        if not 0 <= r0 <= r1 <= info.n_rows:
            raise ValueError(f"{name}: rows [{r0}, {r1}) outside [0, {info.n_rows})")
        out = empty_weight(r1 - r0, info.row_bytes)
        out.numpy()[...] = self._rows_view(info)[r0:r1]
        self._count(name, out.numel())
        return out

    def read_row_list(self, name: str, rows: list[tuple[int, int]]) -> torch.Tensor:
        """Several row ranges concatenated (e.g. the KV heads a rank needs)."""
        return cat_rows([self.read_rows(name, a, b) for a, b in rows])

    def read_block_cols(self, name: str, b0: int, b1: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Input blocks ``[b0, b1)`` of rows ``[r0, r1)`` (default every row: a row-parallel
        shard; one expert's rows of a 3-D expert tensor) as uint8 ``[r1-r0, (b1-b0)*type_size]``,
        copied from a strided view of the mmap."""
        info = self.info(name)
        r1 = info.n_rows if r1 is None else r1
        if not 0 <= b0 < b1 <= info.n_blocks:
            raise ValueError(f"{name}: blocks [{b0}, {b1}) outside [0, {info.n_blocks})")
        if not 0 <= r0 <= r1 <= info.n_rows:
            raise ValueError(f"{name}: rows [{r0}, {r1}) outside [0, {info.n_rows})")
        ts = info.type_size
        out = empty_weight(r1 - r0, (b1 - b0) * ts)
        out.numpy()[...] = self._rows_view(info)[r0:r1, b0 * ts: b1 * ts]
        self._count(name, out.numel())
        return out

    def read_float(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` dequantized to float32 (small tensors: norms, biases, tests).

        A 1-D tensor (norm weight, bias) is a vector: ``r0``/``r1`` then index elements,
        which is how a column-parallel layer takes its share of a bias."""
        info = self.info(name)
        if len(info.shape) == 1:
            if info.block_size != 1:
                raise UnsupportedError(f"{self.path}: vector tensor '{name}' is quantized ({info.qtype.name})")
            e0 = 0 if r0 is None else r0
            e1 = info.n_cols if r1 is None else r1
            ts = info.type_size
            raw = np.array(self._mm[info.offset + e0 * ts: info.offset + e1 * ts])
            self._count(name, raw.nbytes)
            return torch.from_numpy(dequantize(raw, info.qtype).astype(np.float32).reshape(e1 - e0))
        raw = self.read_rows(name, r0, r1)
        vals = dequantize(raw.numpy(), info.qtype).astype(np.float32)
        return torch.from_numpy(vals.reshape(raw.shape[0], info.n_cols))

    @property
    def total_loaded(self) -> int:
        return sum(self.loaded_bytes.values())


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file (existence, magic, header, tensor byte ranges)."""
    return GGUFFile(path)
