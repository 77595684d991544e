"""Loads the native extension ``tp_numa._C``, which registers ``torch.ops.tp_numa.*``."""
from __future__ import annotations

from .errors import TpNumaError

_loaded = False


def load_extension() -> None:
    """Import the compiled ops once; a clear error if the extension was not built."""
    global _loaded
    if _loaded:
        return
    import torch  # noqa: F401  (_C links against libc10/libtorch, which torch loads)

    try:
        from . import _C  # noqa: F401  (registers the ops as a side effect)
    except ImportError as e:
        raise TpNumaError(
            f"tp_numa native extension is not built ({e}); run `bash scripts/setup.sh` "
            "(or `pip install --no-build-isolation -e .`) in the repository"
        ) from None
    _loaded = True


def ops_registered(*names: str) -> bool:
    """True when the extension loads and registers every op ``torch.ops.tp_numa.<name>``
    (the ``available()`` check of each op family: quant, attention, fused, shm)."""
    try:
        load_extension()
    except TpNumaError:
        return False
    import torch

    return all(hasattr(torch.ops.tp_numa, name) for name in names)


def kernel_isa() -> str:
    """The SIMD path the quantized kernels use now: 'avx512vnni', 'avx512', 'avx2' or 'scalar'."""
    load_extension()
    import torch

    return torch.ops.tp_numa.kernel_isa()
