"""A GGUF file's header only: metadata and tensor infos, no tensor data.

``tp-numa plan`` and the engine's plan print need the hyperparameters and every tensor's
type and shape, but ``gguf.GGUFReader`` takes tens of seconds on a 262k-token vocabulary
(one numpy view per array element). This parses the header directly with the metadata
reader of ``tp_numa.gguf_metadata`` and then the tensor-info section::

    tensor info = u64 name_len + name | u32 n_dims | n_dims x u64 ne | u32 type | u64 offset
    data start  = end of the infos rounded up to general.alignment (default 32)

``GGUFHeader`` answers the same questions as ``gguf_loader.GGUFFile`` that
``config.ModelConfig.from_gguf`` asks (arch, metadata, require, has, info), so a config
can be built from it; it cannot read tensor data.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFormatError, UnsupportedError
from .gguf_loader import SUPPORTED_ARCHS, SUPPORTED_TYPES, TensorInfo
from .gguf_metadata import _MAGIC, _Cursor


class GGUFHeader:
    """Metadata + tensor infos of a GGUF file, read without touching tensor data."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise ModelFormatError(f"{self.path}: cannot open GGUF file ({e.strerror})") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelFormatError(f"{self.path}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                self._meta, self.tensors = self._parse(mm, size)

    def _parse(self, mm, size: int):
        if mm[:4] != _MAGIC:
            raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic {bytes(mm[:4])!r})")
        cur = _Cursor(mm, self.path)
        cur.take(4)
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ModelFormatError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            type_id = cur.unpack("<I")
            offset = cur.unpack("<Q")
            raw.append((name, dims, type_id, offset))
        align = int(meta.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        tensors = {}
        for name, dims, type_id, offset in raw:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedError(f"{self.path}: tensor '{name}' has unknown GGML type id {type_id}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims)) * type_size // block
            start = data_start + offset
            if start + n_bytes > size:
                raise ModelFormatError(f"{self.path}: file is truncated: tensor '{name}' ends at byte "
                                       f"{start + n_bytes} but the file has {size} bytes")
            # GGUF lists dims innermost first; TensorInfo.shape is torch order
            tensors[name] = TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start, n_bytes)
        return meta, tensors

    # ---- the GGUFFile questions ModelConfig.from_gguf asks ----
    @property
    def arch(self) -> str:
        return self.require("general.architecture")

    def check_arch(self) -> str:
        arch = self.arch
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedError(f"{self.path}: architecture '{arch}' is not supported "
                                   f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        return arch

    def metadata(self, key: str, default=None):
        value = self._meta.get(key, default)
        return value.tolist() if isinstance(value, np.ndarray) else value

    def require(self, key: str):
        value = self.metadata(key)
        if value is None:
            raise ModelFormatError(f"{self.path}: metadata key '{key}' is missing")
        return value

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: tensor '{name}' is missing")
        if info.qtype not in SUPPORTED_TYPES:
            raise UnsupportedError(f"{self.path}: tensor '{name}' has type {info.qtype.name}, which is not supported")
        return info


def read_header(path: str | os.PathLike) -> GGUFHeader:
    return GGUFHeader(path)
