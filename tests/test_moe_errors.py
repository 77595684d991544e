"""Bad MoE files through the real CLI: one clear line naming the problem, a non-zero exit,
no traceback; under mpirun every rank ends."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_util import mpirun_or_skip
from synthetic_moe import moe_spec, write_moe_model
from test_errors_cli import assert_one_line_error, generate

WORKER = Path(__file__).resolve().parent / "tp_worker.py"


def _bad_models(d: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (file, strings its error line must contain)."""
    out = {}
    ms = moe_spec("qwen3moe", meta={"expert_used_count": 9})
    out["k_above_experts"] = (write_moe_model(d / "k.gguf", ms), ("qwen3moe.expert_used_count", "9", "8"))
    ms = moe_spec("qwen3moe")
    ms.base.drop = ("blk.1.ffn_gate_inp.weight",)
    out["missing_router"] = (write_moe_model(d / "router.gguf", ms), ("blk.1.ffn_gate_inp.weight", "missing"))
    ms = moe_spec("qwen3moe")
    ms.base.drop = ("blk.0.ffn_up_exps.weight",)
    ms.base.tensors = {"blk.0.ffn_up_exps.weight": np.zeros((8, 64, 128), dtype=np.float32)}
    out["wrong_expert_shape"] = (write_moe_model(d / "shape.gguf", ms),
                                 ("blk.0.ffn_up_exps.weight", "[8, 64, 128]", "[8, 96, 128]"))
    ms = moe_spec("qwen3moe")
    ms.base.tensors = {"blk.0.ffn_down_exps.scale": np.ones(1, dtype=np.float32)}
    out["expert_scale"] = (write_moe_model(d / "scale.gguf", ms), ("blk.0.ffn_down_exps.scale", "not supported"))
    ms = moe_spec("qwen3moe")
    ms.base.tensors = {"blk.0.ffn_router_bias.weight": np.ones(8, dtype=np.float32)}
    out["unknown_tensor"] = (write_moe_model(d / "unknown.gguf", ms), ("blk.0.ffn_router_bias.weight",
                                                                       "not part of a 'qwen3moe' model"))
    ms = moe_spec("llama", meta={"feed_forward_length": 64})     # Mixtral: experts sized by n_ff
    out["mixtral_width"] = (write_moe_model(d / "width.gguf", ms), ("'llama.feed_forward_length' = 64", "96"))
    ms = moe_spec("qwen2moe", meta={"expert_count": 0})
    out["no_experts"] = (write_moe_model(d / "zero.gguf", ms), ("qwen2moe.expert_count",))
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return _bad_models(tmp_path_factory.mktemp("moe_bad"))


@pytest.mark.parametrize("name", ["k_above_experts", "missing_router", "wrong_expert_shape", "no_experts",
                                  "expert_scale", "unknown_tensor", "mixtral_width"])
def test_bad_moe_file_one_line(cli_env, bad, name):
    path, needles = bad[name]
    assert_one_line_error(generate(cli_env, "-m", str(path), "-p", "hi", "-n", "2"), str(path), *needles)


@pytest.mark.mpi
def test_bad_moe_file_ends_every_rank(bad):
    path, needles = bad["wrong_expert_shape"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([mpirun_or_skip(), "--oversubscribe", "-np", "2", sys.executable, str(WORKER), str(path),
                           "/dev/null", "--tokens", "1,2,3"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert needles[0] in proc.stderr
    assert "Traceback" not in proc.stderr
