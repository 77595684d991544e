"""Helpers of tests/test_tp_e2e.py: launching the worker / CLI under mpirun, finding a
job's rank processes, timing how fast a job ends, and the logit comparison statistics."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "tp_e2e_worker.py"


def mpirun() -> str | None:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else shutil.which("mpirun")


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def launch_prefix(np_: int, exported: tuple[str, ...] = ()) -> list[str]:
    """``mpirun -np N`` (oversubscribed: this box has fewer cores than ranks), or nothing
    for N = 1 (world size 1 runs without mpirun, as a user would)."""
    if np_ == 1:
        return []
    cmd = [mpirun(), "--oversubscribe", "--bind-to", "none", "-np", str(np_), "-x", "PYTHONPATH"]
    for name in exported:
        cmd += ["-x", name]
    return cmd


def cli_cmd(np_: int, *args: str, exported: tuple[str, ...] = ()) -> list[str]:
    """``[mpirun -np N] python -m tp_numa.cli generate ARGS`` (the installed ``tp-numa``
    entry point runs the same ``tp_numa.cli:main``)."""
    return launch_prefix(np_, exported) + [sys.executable, "-m", "tp_numa.cli", "generate", *args]


def run_worker(np_: int, out: Path, models: dict[str, Path], prompts: list[int], tokens: int,
               logits_len: int, timeout: float = 600) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_prefix(np_) + [sys.executable, str(WORKER), "--out", str(out), "--tokens", str(tokens),
                                "--prompts", ",".join(map(str, prompts)), "--logits-len", str(logits_len)]
    cmd += [f"{short}={path}" for short, path in models.items()]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


class TimedProcess:
    """A Popen whose stdout/stderr are read by threads that note when each chunk came."""

    def __init__(self, cmd: list[str], environ: dict):
        self.proc = subprocess.Popen(cmd, env=environ, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.out: list[tuple[float, bytes]] = []
        self.err: list[tuple[float, bytes]] = []
        self.ended: float | None = None
        self._threads = [threading.Thread(target=self._pump, args=(s, dst), daemon=True)
                         for s, dst in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, dst) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            dst.append((time.time(), chunk))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:  # the test failed: do not leave the job behind
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.ended = time.time()
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        """End the whole job (its own session) at once."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait()

    def stdout(self) -> str:
        return b"".join(c for _, c in self.out).decode("utf-8", "replace")

    def stderr(self) -> str:
        """stderr text; NUL bytes dropped (Open MPI's launcher ends a forwarded help
        message, such as its MPI_ABORT notice, with a NUL that can land before the next
        rank's line)."""
        return b"".join(c for _, c in self.err).replace(b"\0", b"").decode("utf-8", "replace")

    def first_stdout_time(self, timeout: float) -> float | None:
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            if self.out:
                return self.out[0][0]
            time.sleep(0.05)
        return self.out[0][0] if self.out else None

    def first_line_time(self, needle: str) -> float | None:
        """When the stderr chunk completing ``needle`` arrived."""
        acc = b""
        for t, chunk in self.err:
            acc += chunk
            if needle.encode() in acc:
                return t
        return None


def rank_pids(tag: str) -> dict[int, int]:
    """{MPI rank: pid} of the live processes whose environment holds ``TP_E2E_TAG=tag``."""
    found = {}
    want = f"TP_E2E_TAG={tag}".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                items = f.read().split(b"\0")
        except OSError:
            continue
        if want not in items:
            continue
        for item in items:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                found[int(item.split(b"=", 1)[1])] = int(d)
    return found


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def shm_left(pids) -> list[str]:
    """Entries of /dev/shm named after one of ``pids`` (the segments are
    ``tp_numa-<pid of local rank 0>-<random>.<local rank>``)."""
    marks = tuple(f"tp_numa-{p}-" for p in pids)
    return [n for n in os.listdir("/dev/shm") if n.startswith(marks)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def logit_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Differences between two [T, vocab] logit arrays (ref = world size 1):

    - ``kl_mean`` / ``kl_max``: KL(softmax(ref) || softmax(got)) per position (nats);
    - ``margin_delta``: max over positions of the change of ref's top-1 minus top-2 logit
      (what decides whether a greedy choice can flip);
    - ``max_abs``: max |got - ref| over all logits;
    - ``top1``: fraction of positions with the same argmax.
    """
    lr, lg = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lr) * (lr - lg)).sum(axis=1)
    top = np.argsort(-ref, axis=1)[:, :2]
    r2, g2 = np.take_along_axis(ref, top, 1), np.take_along_axis(got, top, 1)
    margin_delta = np.abs((r2[:, 0] - r2[:, 1]) - (g2[:, 0] - g2[:, 1]))
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "margin_delta": float(margin_delta.max()),
            "max_abs": float(np.abs(got - ref).max()), "top1": float((ref.argmax(1) == got.argmax(1)).mean())}
