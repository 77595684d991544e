"""User-facing errors.

A ``TpNumaError`` is a problem with what the user asked for (a missing file, a bad
option, a tensor that cannot be split). The CLI prints its message as one line on
stderr and exits non-zero on every rank; it never shows a traceback for these.
Anything else escaping is a bug in tp_numa and keeps its traceback.
"""


class TpNumaError(Exception):
    """A user mistake or an unusable input; the message names the file/tensor/option."""


class ModelFormatError(TpNumaError):
    """The GGUF file is missing, truncated, not a GGUF, or lacks what the model needs."""


class UnsupportedError(TpNumaError):
    """An architecture, tensor type or option this build of tp_numa does not support."""


class ShardingError(TpNumaError):
    """A tensor cannot be partitioned over the requested number of ranks."""
