"""End-to-end tensor parallelism on the two shipped models (qwen2.5-coder-0.5b, gemma3-270m):
``mpirun -np 2/3/4`` (oversubscribed on a small box) against world size 1.

One launch of tests/tp_e2e_worker.py per world size loads both models through the public
API (``tp_numa.load``, the engine behind ``tp-numa generate``), generates greedy
continuations of the golden prompts (tests/data, ``load_golden(short)['greedy']``),
computes teacher-forced logits and reports each rank's weight bytes. The CLI itself runs
under mpirun for the output contract, and two failure cases end whole jobs.

Why tp=N is bitwise tp=1
------------------------
Every value a rank computes is either computed whole by one rank with the same code as at
tp=1 (column-parallel rows, per-head attention with a key split that depends only on the
context length, norms, RoPE on replicated data) or is a row-parallel sum (o_proj,
ffn_down). The latter use ``quant_matmul_exact``: each block's fp32 term is added in
float64, the all-reduce adds the ranks' float64 partials, and the total is rounded to
float32 once, as tp=1 rounds its own float64 sum. Two float64 sums of the same fp32 terms
in different groupings differ by ~1e-16 relative, so their float32 roundings agree unless
the value sits within that distance of an fp32 rounding boundary (probability ~1e-9 per
value, and then fixed for given inputs: the runs are deterministic). So the test demands
identity: the same greedy tokens and text for every golden prompt, and teacher-forced
logits equal bit for bit (the documented bound is 0). Before exact row-parallel sums,
fp32 partials in a tp-dependent order changed logits by up to 1.5 and flipped greedy
choices at near ties: the 8-bit activation quantization of these models amplifies
last-bit differences (see docs/models.md).

Cost: 4 worker launches (np = 1, 2, 3, 4; both models, 8 prompts each, --threads 1 per
rank), 3 CLI runs and 4 short failure jobs; about 7 minutes on a busy 2-core machine.

Note for the CLI under mpirun: Open MPI forwards a rank's stdout line by line, so a
continuation without a newline appears at the end (or at its next newline) rather than
token by token; the text is the same.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest

import tp_e2e_helpers as H
from mpi_util import split_and_replicated_bytes
from golden import load_golden

pytestmark = [pytest.mark.slow, pytest.mark.mpi,
              pytest.mark.skipif(H.mpirun() is None, reason="mpirun not found")]

SHORTS = ("qwen2.5-coder-0.5b", "gemma3-270m")
TOKENS = 16          # generated per prompt
LOGITS_LEN = 32      # teacher-forced positions compared
# prompts (indices into load_golden(short)['greedy']) per world size: all 8 golden prompts
# at every world size (np=1 is the reference)
PROMPTS = {n: list(range(8)) for n in (1, 2, 3, 4)}

WEIGHT_SLACK = 1.05
SHUTDOWN_S = 10.0    # from the failure to the end of every rank
START_S = 240        # start-up + load of 3 ranks on a loaded 2-core box


@pytest.fixture(scope="module")
def models(qwen_path, gemma_path):
    return {"qwen2.5-coder-0.5b": qwen_path, "gemma3-270m": gemma_path}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """{world size: {short: {"doc": worker JSON, "logits": [L, vocab]}}} for 1, 2, 3, 4."""
    base = tmp_path_factory.mktemp("tp_e2e")
    results = {}
    for n, prompts in PROMPTS.items():
        out = base / f"np{n}"
        t0 = time.time()
        proc = H.run_worker(n, out, models, prompts, TOKENS, LOGITS_LEN)
        assert proc.returncode == 0, f"np={n} worker failed:\n{proc.stdout}\n{proc.stderr}"
        results[n] = {}
        for short in SHORTS:
            with open(out / f"{short}.json", encoding="utf-8") as f:
                doc = json.load(f)
            assert doc["world_size"] == n
            results[n][short] = {"doc": doc, "logits": np.load(out / f"{short}.npy")}
        print(f"np={n}: worker {time.time() - t0:.1f} s")
    return results


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("short", SHORTS)
def test_greedy_matches_world_size_1(runs, short, n):
    ref, got = runs[1][short]["doc"], runs[n][short]["doc"]
    golden = load_golden(short)["greedy"]
    for i in PROMPTS[n]:
        a, b = ref["greedy"][str(i)], got["greedy"][str(i)]
        assert len(a) > 0, f"prompt {i}: no tokens at world size 1"
        assert a == b, f"{short} np={n} prompt {i} {golden[i]['prompt']!r}:\ntp=1: {a}\ntp={n}: {b}"
        assert got["texts"][str(i)] == ref["texts"][str(i)]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("short", SHORTS)
def test_logits_bitwise_equal_to_world_size_1(runs, short, n):
    ref, got = runs[1][short]["logits"], runs[n][short]["logits"]
    assert got.shape == ref.shape == (LOGITS_LEN, ref.shape[1])
    if not np.array_equal(ref, got):
        s = H.logit_stats(ref, got)
        pytest.fail(f"{short} np={n}: logits differ from tp=1: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items()))


def _expected_rank_bytes(path, tp: int) -> tuple[float, int]:
    """(1/tp of the split weights + the replicated ones, all tensor bytes) from the GGUF
    by the sharding table (DESIGN.md): vectors (norms, biases) are replicated, so are the
    K/V projections once tp > n_kv_heads; every other matrix (q, o, ffn, embedding / LM
    head rows) is split: mpi_util.split_and_replicated_bytes."""
    from tp_numa.config import ModelConfig
    from tp_numa.gguf_loader import open_gguf

    f = open_gguf(path)
    split, replicated = split_and_replicated_bytes(f, ModelConfig.from_gguf(f), tp)
    return split / tp + replicated, split + replicated


@pytest.mark.parametrize("short", SHORTS)
def test_resident_weight_bytes_per_rank(runs, models, short):
    """Each rank of a real mpirun job holds <= (1/N split + replicated) x 1.05, counted
    both as the model's registered buffers (``tp_numa.models.weight_bytes``) and as the
    distinct tensor storages reachable from the module tree (a shard that is a view into
    a whole tensor would count whole)."""
    _, total = _expected_rank_bytes(models[short], 1)
    one = runs[1][short]["doc"]
    # world size 1 holds the whole file's tensors (plus small computed tables)
    assert total <= one["storage_bytes"][0] <= total * WEIGHT_SLACK, (one["storage_bytes"], total)
    for n in (2, 3, 4):
        doc = runs[n][short]["doc"]
        bound = _expected_rank_bytes(models[short], n)[0] * WEIGHT_SLACK
        assert len(doc["weight_bytes"]) == n
        for r in range(n):
            for key in ("weight_bytes", "storage_bytes"):
                assert doc[key][r] <= bound, f"{short} np={n} rank {r}: {key} {doc[key][r]} > {bound:.0f}"
        print(f"{short} np={n}: weight bytes per rank {doc['weight_bytes']} (bound {bound:.0f}), "
              f"anonymous RSS growth over the load {doc['anon_delta']}")


def _cli_case(runs, short: str) -> int:
    """The golden prompt whose tp=1 continuation has the widest smallest margin (the
    continuation least sensitive to the CLI's own settings, e.g. its context size)."""
    margins = runs[1][short]["doc"]["margins"]
    return max(PROMPTS[1], key=lambda i: min(margins[str(i)]))


@pytest.mark.parametrize("n,short", [(2, "qwen2.5-coder-0.5b"), (3, "gemma3-270m"), (4, "qwen2.5-coder-0.5b")])
def test_cli_generate_under_mpirun(runs, models, short, n):
    """`mpirun -np N tp-numa generate`: exit 0, stdout = the world-size-1 continuation,
    exactly once (rank 0 only), nothing else on stdout; stderr has one timing line."""
    i = _cli_case(runs, short)
    ref = runs[1][short]["doc"]
    prompt = load_golden(short)["greedy"][i]["prompt"]
    cmd = H.cli_cmd(n, "-m", str(models[short]), "-p", prompt, "-n", str(TOKENS), "--temperature", "0",
                    "-t", "1", "-c", "128")
    proc = subprocess.run(cmd, env=H.env(), capture_output=True, text=True, timeout=START_S, cwd=H.ROOT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ref["texts"][str(i)], (proc.stdout, ref["texts"][str(i)])
    assert proc.stderr.count("tp-numa: prompt ") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["bad-path", "unsplittable"])
def test_load_error_ends_every_rank(case, tmp_path, request):
    """An error while loading ends every rank within 10 s of the message, which is
    printed once, with a non-zero exit and nothing on stdout:
    ``bad-path``: a GGUF path that does not exist (np=3);
    ``unsplittable``: gemma3-270m has 4 query heads (1 KV head), so tp=5 cannot split
    ``blk.0.attn_output.weight`` (np=5); the message names tensor, tp and block size."""
    if case == "bad-path":
        np_, model = 3, tmp_path / "absent.gguf"
        expect = [str(model)]
    else:
        np_, model = 5, request.getfixturevalue("gemma_path")
        expect = ["blk.0.attn_output.weight", "tp=5", "block size 256"]
    tag = uuid.uuid4().hex
    job = H.TimedProcess(H.cli_cmd(np_, "-m", str(model), "-p", "hi", "-t", "1", exported=("TP_E2E_TAG",)),
                         H.env(TP_E2E_TAG=tag))
    rc = job.wait(START_S)
    err = job.stderr()
    assert rc != 0
    assert job.stdout() == ""
    errors = [line for line in err.splitlines() if line.startswith("tp-numa: error:")]
    assert len(errors) == 1 and all(e in errors[0] for e in expect), err
    assert "Traceback" not in err
    printed = job.first_line_time("tp-numa: error:")
    assert printed is not None and job.ended - printed <= SHUTDOWN_S, (job.ended - printed, err)
    deadline = printed + SHUTDOWN_S
    while time.time() < deadline and any(H.alive(p) for p in H.rank_pids(tag).values()):
        time.sleep(0.05)
    assert not H.rank_pids(tag), "ranks still alive 10 s after the error"
    print(f"{case}: job ended {job.ended - printed:.2f} s after the error line, exit {rc}")


@pytest.mark.parametrize("launcher", ["default", "enable-recovery"])
def test_sigkill_of_one_rank_ends_the_job(launcher):
    """SIGKILL of rank 1 while the job streams tokens: the others end within 10 s, the
    job exits non-zero, and /dev/shm holds nothing of it.

    ``default``: Open MPI's launcher itself kills the other ranks when one dies.
    ``enable-recovery``: ``mpirun --enable-recovery`` leaves the survivors running, so
    tp_numa's own liveness check (shm collectives notice the dead peer) must end them,
    with its error printed once."""
    from tp_numa.model_registry import resolve

    path = resolve("qwen2.5-coder-0.5b")
    tag = uuid.uuid4().hex
    # counting never meets an end-of-generation token: the job is still decoding when
    # rank 1 dies. One number per line: Open MPI forwards a rank's stdout line by line,
    # so the first newline tells the test that decoding has begun.
    prompt = "1\n2\n3\n4\n5\n6\n7\n8\n"
    cmd = H.cli_cmd(3, "-m", str(path), "-p", prompt, "-n", "1000", "--temperature", "0",
                    "-t", "1", "-c", "2048", exported=("TP_E2E_TAG",))
    if launcher == "enable-recovery":
        cmd.insert(1, "--enable-recovery")
    job = H.TimedProcess(cmd, H.env(TP_E2E_TAG=tag))
    try:
        first = job.first_stdout_time(START_S)
        assert first is not None, f"no output before the kill:\n{job.stderr()}"
        pids = H.rank_pids(tag)
        assert sorted(pids) == [0, 1, 2], pids
        # the segments are unlinked as soon as every rank mapped them, well before decoding
        assert not H.shm_left(pids.values()), H.shm_left(pids.values())
        time.sleep(0.5)  # well inside the decode loop
        assert job.proc.poll() is None, "the job ended before the kill"
        killed_at = time.time()
        os.kill(pids[1], signal.SIGKILL)
    except BaseException:
        job.kill()
        raise
    rc = job.wait(60)
    assert rc != 0, job.stderr()
    print(f"SIGKILL of rank 1 (pid {pids[1]}) {killed_at - first:.2f} s after the first line; job ended "
          f"{job.ended - killed_at:.2f} s later, exit {rc}; stderr:\n{job.stderr()}")
    assert job.ended - killed_at <= SHUTDOWN_S, (job.ended - killed_at, job.stderr())
    # every rank process is gone within the same 10 s (mpirun may return a moment
    # before its last child has been reaped)
    while time.time() < killed_at + SHUTDOWN_S and any(H.alive(p) for p in pids.values()):
        time.sleep(0.05)
    survivors = {r: p for r, p in pids.items() if H.alive(p)}
    assert not survivors, f"ranks {survivors} still alive {time.time() - killed_at:.1f} s after the kill"
    assert not H.shm_left(pids.values()), H.shm_left(pids.values())
    assert "Traceback" not in job.stderr()
    if launcher == "enable-recovery":
        errors = [line for line in job.stderr().splitlines() if line.startswith("tp-numa: error:")]
        assert len(errors) == 1 and "rank 1" in errors[0], job.stderr()
