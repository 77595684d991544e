"""Where `bash scripts/setup_reference.sh` put the llama.cpp reference build.

The comparison and golden-data scripts (compare_llamacpp.py, make_golden.py,
make_arch_fixtures.py) use this module so that they find the reference by default, with
no path on the command line: the same cache folder as the setup script,
``$TP_NUMA_REFERENCE_DIR`` or ``~/.cache/tp_numa/reference``, holding

    venv/bin/python      an interpreter with llama-cpp-python (native build) and numpy
    bin/<tool>           llama-bench, llama-server, llama-quantize, test-llama-archs

Missing pieces raise ``SystemExit`` with the message "run bash scripts/setup_reference.sh
first", so a script fails with one clear line instead of an ImportError in a worker.
Standard library only: it is imported both by the project's .venv and by the reference
venv.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "TP_NUMA_REFERENCE_DIR"
SETUP = "bash scripts/setup_reference.sh"
TOOLS = ("llama-bench", "llama-server", "llama-quantize", "test-llama-archs")


def reference_dir() -> Path:
    """The cache folder of the reference build (it may not exist yet)."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tp_numa" / "reference"


def _missing(what: str, path: Path) -> SystemExit:
    return SystemExit(f"llama.cpp reference: {what} not found at {path}; run {SETUP} first "
                      f"(it builds into ${ENV_VAR}, default ~/.cache/tp_numa/reference)")


def python() -> str:
    """The reference venv's interpreter (llama-cpp-python + numpy)."""
    exe = reference_dir() / "venv" / "bin" / "python"
    if not os.access(exe, os.X_OK):
        raise _missing("the llama-cpp-python venv", exe)
    return str(exe)


def binary(name: str) -> str:
    """Path of one of the reference build's programs (see TOOLS)."""
    if name not in TOOLS:
        raise ValueError(f"unknown reference tool {name!r} (known: {', '.join(TOOLS)})")
    exe = reference_dir() / "bin" / name
    if not os.access(exe, os.X_OK):
        raise _missing(name, exe)
    return str(exe)


def info() -> dict[str, str]:
    """What setup_reference.sh recorded (version, flags, paths) in reference.env; {} if absent."""
    out = {}
    try:
        with open(reference_dir() / "reference.env", encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and not key.startswith("#"):
                    out[key] = value
    except FileNotFoundError:
        pass
    return out


if __name__ == "__main__":  # prints the paths, for shell use and for checking the build
    print(f"dir     {reference_dir()}")
    print(f"version llama-cpp-python {info().get('LLAMA_CPP_PYTHON_VERSION', '?')}")
    print(f"python  {python()}")
    for tool in TOOLS:
        print(f"{tool:<17}{binary(tool)}")
