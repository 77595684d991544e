"""`tp-numa serve` end to end: the real server on 127.0.0.1 (a free port), the shipped
Qwen2.5-Coder-0.5B, driven with the `openai` package and raw HTTP: completions and chat,
streaming and not, greedy output equal to `tp-numa generate`, concurrent streams, batch
invariance, bad requests answered 4xx while the server keeps serving, a client that leaves
mid-stream freeing its slot, and the same server under mpirun -np 2."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from mpi_util import mpirun_path  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "def fibonacci(n):"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `tp-numa serve` subprocess (optionally under mpirun) and its base URL."""

    def __init__(self, cli_env, model, *extra, mpi_np: int = 0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "tp_numa.cli", "serve", "-m", str(model), "--port", str(self.port),
                "-t", "1" if mpi_np else "2", *extra]
        env = dict(cli_env)
        if mpi_np:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            args = [mpirun_path(), "--oversubscribe", "--bind-to", "none", "-np", str(mpi_np), "-x", "PYTHONPATH",
                    *args]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError("server did not start")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=300)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}

    def _rank0(self) -> int | None:
        """Under mpirun: the pid of rank 0 (a child of the launcher with rank 0 in its env)."""
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if ppid == self.proc.pid and b"OMPI_COMM_WORLD_RANK=0" in env:
                return int(d)
        return None

    def stop(self) -> int:
        """SIGINT to the server (rank 0 under mpirun: mpirun itself would kill the job)."""
        if self.proc.poll() is None:
            rank0 = self._rank0()
            if rank0 is not None:
                os.kill(rank0, signal.SIGINT)
            else:
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(cli_env, qwen_path):
    s = Server(cli_env, qwen_path, "-np", "8", "-c", "512")
    yield s
    assert s.stop() == 0


def complete(server, prompt=PROMPT, n=16, **kw):
    return server.client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, **kw)


def test_completion_equals_generate(server, cli_env, qwen_path):
    got = complete(server)
    out = subprocess.run([sys.executable, "-m", "tp_numa.cli", "generate", "-m", str(qwen_path), "-p", PROMPT,
                          "-n", "16", "--temperature", "0", "-t", "2", "-q"],
                         capture_output=True, text=True, env=cli_env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert got.choices[0].text == out.stdout
    assert got.usage.completion_tokens == 16 and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(httpx.post(server.url + "/tokenize", json={"content": PROMPT}).json()["tokens"])


def test_chat_stream_and_not(server):
    msgs = [{"role": "user", "content": "Write a haiku about sockets."}]
    whole = server.client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(server.client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.choices[0].message.role == "assistant"


def test_logprobs(server):
    r = server.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                              temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for e in lp:   # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_concurrent_streams_and_batch_invariance(server):
    alone = complete(server, "import os\n", 24).choices[0].text
    prompts = ["import os\n"] + [f"# task {i}: sort a list\n" for i in range(15)]
    results: dict[int, str] = {}

    def stream(i):
        s = server.client.completions.create(model="m", prompt=prompts[i], max_tokens=24, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in s)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == list(range(16))
    assert results[0] == alone                      # beside 15 others: the same tokens
    assert all(results[i] for i in range(16))      # every stream got its text
    assert server.metrics()["tp_numa_requests_running"] == 0


def test_prefix_reuse(server):
    long = "# utilities\n" + "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(12))
    a = complete(server, long + "def g(", 4)
    b = complete(server, long + "def h(", 4)
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 4
    again = complete(server, long + "def g(", 4)
    assert again.choices[0].text == a.choices[0].text


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x " * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": 5}, 400, "stop"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {"content": 3}, 400, "content"),
])
def test_bad_requests_get_4xx(server, path, body, status, param):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param
    assert complete(server, n=2).usage.completion_tokens == 2      # still serving


def test_not_json_and_unknown_route(server):
    assert httpx.post(server.url + "/v1/completions", content=b"{nope", timeout=10).status_code == 400
    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["meta"]["n_slots"] == 8


def test_disconnect_frees_the_slot(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break                               # one chunk, then hang up
    deadline = time.time() + 30
    while server.metrics()["tp_numa_requests_running"] and time.time() < deadline:
        time.sleep(0.2)
    assert server.metrics()["tp_numa_requests_running"] == 0
    assert complete(server, n=2).usage.completion_tokens == 2


def test_port_in_use_is_one_clear_error(cli_env, qwen_path, server):
    out = subprocess.run([sys.executable, "-m", "tp_numa.cli", "serve", "-m", str(qwen_path), "--port",
                          str(server.port)], capture_output=True, text=True, env=cli_env, timeout=120)
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{server.port}" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.mpi
def test_serve_under_mpirun(cli_env, qwen_path, server):
    if mpirun_path() is None:
        pytest.skip("mpirun not installed")
    want = complete(server).choices[0].text
    two = Server(cli_env, qwen_path, "-np", "2", "-c", "256", mpi_np=2)
    try:
        assert complete(two).choices[0].text == want              # tp=2 is bitwise tp=1
        chunks = list(two.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=6, temperature=0, stream=True))
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)
        assert httpx.post(two.url + "/v1/completions", json={"prompt": "x", "top_p": 2}).status_code == 400
    finally:
        assert two.stop() == 0
