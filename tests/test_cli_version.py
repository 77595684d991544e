"""`tp-numa --version` through the real CLI (a subprocess): one line each for tp_numa,
the kernels in use (and the CPU's best when different), torch and MPI; exit 0."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_numa

ISAS = ("scalar", "avx2", "avx512", "avx512vnni")


def version(env, *cmd):
    cmd = cmd or (sys.executable, "-m", "tp_numa.cli")
    p = subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    # Plain text lines: no stray terminators (Open MPI's version string carries a NUL).
    assert p.stdout.replace("\n", "").isprintable(), repr(p.stdout)
    assert all(line == line.strip() for line in p.stdout.splitlines()), repr(p.stdout)
    return p.stdout.splitlines()


@pytest.fixture(scope="module")
def env(cli_env):
    e = dict(cli_env)
    e.pop("TP_NUMA_KERNEL", None)  # the CPU's own choice
    return e


@pytest.fixture(scope="module")
def auto_lines(env):
    return version(env)


def test_lines(auto_lines):
    lines = auto_lines
    assert len(lines) == 4, lines  # no "cpu best:" line: the kernels in use are the best
    assert lines[0] == f"tp_numa {tp_numa.__version__}"
    assert lines[1].startswith("kernels: ") and lines[1].split(": ", 1)[1] in ISAS, lines
    assert lines[2] == f"torch {torch.__version__}"
    assert lines[3].startswith("MPI: ") and len(lines[3]) > len("MPI: "), lines
    if importlib.util.find_spec("mpi4py") is not None:
        assert not lines[3].startswith("MPI: not available"), lines


def test_forced_kernel_shows_the_cpu_best(env, auto_lines):
    best = auto_lines[1].split(": ", 1)[1]
    lines = version(dict(env, TP_NUMA_KERNEL="scalar"))
    assert lines[1] == "kernels: scalar"
    if best == "scalar":
        assert len(lines) == 4 and not any(l.startswith("cpu best:") for l in lines), lines
    else:
        assert lines[2] == f"cpu best: {best}", lines
        assert lines[0] == auto_lines[0] and lines[3:] == auto_lines[2:]


def test_console_script(env, auto_lines):
    script = Path(sys.executable).with_name("tp-numa")
    if not script.exists():
        pytest.skip(f"no {script.name} script next to {sys.executable} (not pip-installed)")
    assert version(env, str(script)) == auto_lines


def test_version_is_listed_in_help(env):
    p = subprocess.run([sys.executable, "-m", "tp_numa.cli", "--help"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0 and "--version" in p.stdout


def test_without_extension_or_mpi(monkeypatch):
    """Still four lines and no error: --version is what one runs when something is missing."""
    from tp_numa import _ext, cli
    from tp_numa.errors import TpNumaError

    def not_built():
        raise TpNumaError("tp_numa native extension is not built")

    monkeypatch.setattr(_ext, "load_extension", not_built)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    lines = cli.version_lines()
    assert lines[0] == f"tp_numa {tp_numa.__version__}"
    assert lines[1].startswith("kernels: not available (native extension not built; run `bash scripts/setup.sh`")
    assert lines[2] == f"torch {torch.__version__}"
    assert lines[3].startswith("MPI: not available (ModuleNotFoundError: "), lines
    assert len(lines) == 4
