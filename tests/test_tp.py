"""Tensor parallel = world size 1: ``mpirun -np 2/3/4`` on synthetic models (uneven head
and block splits, KV replication, a rank straddling two KV groups, vocab split), and the
per-rank weight bytes of the shipped models at tp = 2, 3, 4.

Identity: tp = N gives bitwise the logits and greedy tokens of world size 1. Column-
parallel rows and attention heads are computed whole by one rank with the same code; the
row-parallel layers sum float64 partials that do not depend on the split
(``tp_numa.ops.quant_matmul_exact``) and round to float32 once, as tp = 1 does. The shipped
models are checked the same way by tests/test_tp_e2e.py (golden prompts, np = 2, 3, 4).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from mpi_util import mpirun_or_skip, split_and_replicated_bytes
from synthetic_gguf import Spec, gemma3_spec, write_model

HERE = Path(__file__).resolve().parent
WORKER = HERE / "tp_worker.py"
TOKENS = "5,17,3,250,42,42,7,300,1,99"


def _run(pairs: list[tuple[Path, Path]], np_: int, timeout: int = 600, prompts: list[list[int]] | None = None,
         greedy: int = 6, cache: str = "f32", native_decode: bool = True) -> list[dict]:
    """Run the worker on every (model, out) pair in one launch of np_ ranks."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent),
               TP_NUMA_NATIVE_DECODE="1" if native_decode else "0")
    if np_ == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [mpirun_or_skip(), "--oversubscribe", "-np", str(np_), sys.executable, str(WORKER)]
    cmd += [str(p) for pair in pairs for p in pair] + ["--greedy", str(greedy), "--cache", cache]
    for prompt in (prompts or [[int(t) for t in TOKENS.split(",")]]):
        cmd += ["--tokens", ",".join(str(t) for t in prompt)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"np={np_} failed:\n{proc.stdout}\n{proc.stderr}"
    results = []
    for _, out in pairs:
        with np.load(out) as z:
            results.append({k: z[k] for k in z.files})
    return results


def _close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1))


SPECS = {
    # Q8_0 matrices, Q4_0 ffn_down (5 blocks), F16 v; 6 heads in 2 KV groups
    "qwen2": Spec(arch="qwen2", seed=1),
    # q/k norm, all F32 ffn
    "qwen3": Spec(arch="qwen3", seed=2, down_type=QT.Q8_0, n_heads=8, n_kv=4),
    # llama (NORM rope), untouched defaults
    "llama": Spec(arch="llama", seed=3),
    # llama with every tensor F32: no activation quantization, float32 rounding only
    "llama_f32": Spec(arch="llama", seed=5, weight_type=QT.F32, embed_type=QT.F32, down_type=QT.F32,
                      v_type=QT.F32),
    # single KV head (replicated), tied output, sliding windows
    "gemma3": gemma3_spec(seed=4),
}


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """{n_ranks: {arch: worker output}} for n = 1, 2, 3, 4 (one launch per n), and under
    "2-modules" np = 2 with the native decode step switched off (the nn.Module path)."""
    d = tmp_path_factory.mktemp("tp")
    models = {arch: write_model(d / f"{arch}.gguf", spec) for arch, spec in SPECS.items()}
    results = {}
    for n in (1, 2, 3, 4):
        archs = list(SPECS) if n < 4 else ["qwen2", "gemma3", "llama_f32"]
        outs = _run([(models[a], d / f"{a}_tp{n}.npz") for a in archs], n)
        results[n] = dict(zip(archs, outs))
    outs = _run([(models[a], d / f"{a}_tp2_modules.npz") for a in SPECS], 2, native_decode=False)
    results["2-modules"] = dict(zip(SPECS, outs))
    return results


@pytest.mark.mpi
@pytest.mark.parametrize("arch", list(SPECS))
def test_tp_matches_single_rank(tp_results, arch):
    base = tp_results[1][arch]
    for n in (2, 3, 4):
        if arch not in tp_results[n]:
            continue
        got = tp_results[n][arch]
        assert got["logits"].shape == base["logits"].shape
        for key in ("logits", "step_logits"):
            assert np.array_equal(got[key], base[key]), f"tp={n} {key}: max rel diff {_close(got[key], base[key]):.3g}"
        np.testing.assert_array_equal(got["greedy"], base["greedy"], err_msg=f"tp={n}")
        assert len(got["weight_bytes"]) == n
        # every rank holds less than the whole model
        assert got["weight_bytes"].max() < base["weight_bytes"][0]


@pytest.mark.mpi
@pytest.mark.parametrize("arch", list(SPECS))
def test_native_decode_step_is_the_module_path_under_tp(tp_results, arch):
    """At np = 2 every rank decodes through the native DecodePlan (its all-reduce is the shm
    op called from C++) and the steps are bitwise those of the nn.Module path."""
    plan, modules = tp_results[2][arch], tp_results["2-modules"][arch]
    assert plan["native_decode"].all(), plan["native_decode"]
    assert not modules["native_decode"].any()
    assert np.array_equal(plan["step_logits"], modules["step_logits"])
    np.testing.assert_array_equal(plan["greedy"], modules["greedy"])
    # np = 3 on qwen3 (8 query heads in 4 KV groups of 2, split 3/3/2): ranks 0 and 1
    # hold heads of a group cut in two (K/V expanded per head), so they take the module
    # path while rank 2 runs the plan; the collectives are the same on both paths
    if arch == "qwen3":
        assert list(tp_results[3][arch]["native_decode"]) == [False, False, True]


@pytest.mark.mpi
def test_q8_0_kv_cache_tp_matches_single_rank(tmp_path):
    """A q8_0 KV cache (uint8 Q8_0 blocks, quantized per KV head row) under tp = 2: each
    rank quantizes its own heads' rows exactly as tp = 1 does, so logits stay bitwise."""
    pairs = {n: [(write_model(tmp_path / "q.gguf", SPECS["qwen2"]), tmp_path / f"q{n}.npz"),
                 (write_model(tmp_path / "g.gguf", SPECS["gemma3"]), tmp_path / f"g{n}.npz")] for n in (1, 2)}
    one, two = _run(pairs[1], 1, cache="q8_0"), _run(pairs[2], 2, cache="q8_0")
    for a, b in zip(one, two):
        for key in ("logits", "step_logits", "greedy"):
            assert np.array_equal(a[key], b[key]), key
        assert b["native_decode"].all()


@pytest.mark.mpi
def test_unsplittable_tensor_fails_on_every_rank(tmp_path):
    # gemma3-like: 4 query heads cannot be split over 5 ranks
    model = write_model(tmp_path / "g.gguf", gemma3_spec(n_layers=1))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([mpirun_or_skip(), "--oversubscribe", "-np", "5", sys.executable, str(WORKER), str(model),
                           str(tmp_path / "x.npz"), "--tokens", TOKENS], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "blk.0.attn_output.weight" in proc.stderr and "tp=5" in proc.stderr
    assert "Traceback" not in proc.stderr


def _expected_bytes(f, cfg, tp: int) -> float:
    """1/tp of the split weights + the replicated ones (mpi_util.split_and_replicated_bytes)."""
    split, replicated = split_and_replicated_bytes(f, cfg, tp)
    return split / tp + replicated


@pytest.mark.slow
@pytest.mark.parametrize("which", ["qwen_path", "gemma_path"])
def test_resident_weight_bytes_per_rank(request, which):
    """Each rank's weights <= (1/N of split weights + replicated) x 1.05 at N = 2, 3, 4."""
    from tp_numa.config import ModelConfig
    from tp_numa.distributed.parallel_state import ParallelState
    from tp_numa.gguf_loader import open_gguf
    from tp_numa.models import load_model, weight_bytes

    path = request.getfixturevalue(which)
    f = open_gguf(path)
    cfg = ModelConfig.from_gguf(f)
    for tp in (2, 3, 4):
        bound = _expected_bytes(f, cfg, tp) * 1.05
        for rank in range(tp):
            f.loaded_bytes.clear()
            model, _ = load_model(f, ParallelState(rank=rank, world_size=tp))
            held = weight_bytes(model)
            assert held <= bound, f"tp={tp} rank={rank}: {held} > {bound:.0f}"
            # the loader copied exactly this rank's slices out of the file (norms are
            # F32 in these files, so bytes held = bytes read, up to the RoPE tables)
            assert abs(f.total_loaded - held) <= 64 * 1024, (f.total_loaded, held)
            del model
