"""Fast reader for the key/value metadata section of a GGUF file.

``gguf.GGUFReader`` builds one numpy view per array element, which for a 262144-entry
vocabulary costs seconds. The tokenizer needs only the metadata, so this module parses
the header and the key/value section directly (little-endian GGUF v2/v3) and stops
before the tensor infos. Layout (all little-endian):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv | n_kv x (key, value)
    key    = u64 len + utf-8 bytes
    value  = u32 type + payload; string = u64 len + bytes;
             array = u32 elem_type + u64 count + count payloads

Numeric arrays come back as numpy arrays, string arrays as lists of ``str``
(undecodable bytes replaced), scalars as Python values.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct

import numpy as np

from .errors import ModelFormatError

# GGUF value type id -> (struct format, numpy dtype) for fixed-size types.
_SCALAR = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; errors name the file."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise ModelFormatError(f"{self.path}: file is truncated inside the GGUF header (needs byte {start + n}, "
                                   f"the file has {len(self.buf)})")
        self.pos = start + n
        return start

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.buf, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return self.buf[start:start + n].decode("utf-8", errors="replace")

    def string_array(self, count: int) -> list[str]:
        """``count`` strings, each u64 length + bytes, as a list of str.

        The vocabulary is the one large string array (262144 entries for Gemma), so only
        the walk over the length fields is a Python loop: the payloads are then cut out
        with numpy (each 8-byte length replaced by one NUL separator) and decoded by a
        single ``bytes.decode`` + ``str.split``.
        """
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        starts = []
        append = starts.append
        try:
            for _ in range(count):
                append(pos)
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = end + 1
        if pos > end:
            raise ModelFormatError(f"{self.path}: file is truncated inside the GGUF header (string array)")
        first, self.pos = self.pos, pos
        if count == 0:
            return []
        region = np.frombuffer(buf[first:pos], dtype=np.uint8).copy()
        rel = np.array(starts, dtype=np.int64) - first
        keep = np.ones(len(region), dtype=bool)
        for k in range(7):
            keep[rel + k] = False
        region[rel + 7] = 0  # the separator in front of each string
        payload = region[keep]
        if int(np.count_nonzero(payload == 0)) != count:
            # A string contains NUL itself: fall back to one decode per string.
            return [buf[int(o) + 8:int(o) + 8 + unpack(buf, int(o))[0]].decode("utf-8", errors="replace")
                    for o in starts]
        return payload.tobytes().decode("utf-8", errors="replace").split("\0")[1:]

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype in _SCALAR:
                dtype = np.dtype(_SCALAR[etype][1]).newbyteorder("<")
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf[start:self.pos], dtype=dtype).copy()
            if etype == _STRING:
                return self.string_array(count)
            return [self.value(etype) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


@contextlib.contextmanager
def map_gguf(path: str):
    """Yield ``(mmap, size)`` of the file at ``path``, read-only; ``ModelFormatError``
    naming the file when it cannot be opened or is too short to be a GGUF."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open GGUF file ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelFormatError(f"{path}: not a GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm, size


def read_metadata(path: str | os.PathLike) -> dict:
    """Return the GGUF key/value metadata of ``path`` as a dict (key -> value).

    Raises ``ModelFormatError`` naming the file when it is missing, not a GGUF or cut short.
    """
    path = os.fspath(path)
    with map_gguf(path) as (mm, _):
        return parse_kv(mm, path)[2]


def parse_kv(buf, path: str) -> tuple[_Cursor, int, dict]:
    """Check magic and version, read the key/value section of the GGUF header in ``buf``.

    Returns the cursor (left at the first tensor info), the tensor count and the metadata
    dict; ``gguf_loader.parse_header`` goes on from there with the tensor infos."""
    if bytes(buf[:4]) != _MAGIC:
        raise ModelFormatError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    cur = _Cursor(buf, path)
    cur.take(4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: unsupported GGUF version {version}")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    return cur, n_tensors, meta


def metadata_from_reader(reader) -> dict:
    """Same dict as ``read_metadata`` from an open ``gguf.GGUFReader``."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        types = field.types
        if not types:
            continue
        if types[0] == _ARRAY:
            etype = int(types[-1]) if len(types) > 1 else None
            if etype == _STRING:
                parts = field.parts
                meta[key] = [bytes(parts[i]).decode("utf-8", errors="replace") for i in field.data]
            elif etype in _SCALAR:
                # Each element is its own 1-element view; gather them into one array.
                parts = field.parts
                idx = field.data
                if len(idx):
                    meta[key] = np.concatenate([parts[i] for i in idx]).astype(_SCALAR[etype][1])
                else:
                    meta[key] = np.zeros(0, dtype=_SCALAR[etype][1])
            else:
                meta[key] = field.contents()
        else:
            meta[key] = field.contents()
    return meta
