"""The `tp-numa generate` contract other tools rely on, through the real CLI:

stdout is exactly the generated continuation (no prompt echo, no logs), streamed as it
is produced; logs and timings go to stderr; the prompt is raw unless --chat; exit 0.
Greedy output equals llama.cpp's golden continuation.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from golden import load_golden
from tp_numa.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
N = 16


def cli(*args):
    return [sys.executable, "-m", "tp_numa.cli", "generate", *args]


def run(cli_env, *args, input=None, timeout=600):
    return subprocess.run(cli(*args), capture_output=True, text=True, env=cli_env, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


def safest_case(g):
    """The golden prompt whose first N greedy steps have the widest top-2 margins, so a
    last-bit numerical difference cannot flip a token."""
    return max(g["greedy"], key=lambda c: min(c["top2_margin"][:N]))


def golden_text(path, case, eog_ids):
    ids = []
    for t in case["ids"][:N]:
        if t in eog_ids:
            break
        ids.append(t)
    return Tokenizer.from_gguf(path).decode(ids)


@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_stdout_is_exactly_the_golden_continuation(cli_env, model_path, name):
    path = model_path(name)
    g = load_golden(name)
    case = safest_case(g)
    # qwen2.5-coder-0.5b is the default model: leave --model out for it
    model_args = ["--model", str(path)] if name != "qwen2.5-coder-0.5b" else []
    proc = run(cli_env, *model_args, "--prompt", case["prompt"], "--max-tokens", str(N), "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == golden_text(path, case, set(g["eog_ids"]))
    assert not proc.stdout.startswith(case["prompt"])
    assert "t/s" in proc.stderr and "t/s" not in proc.stdout  # timings on stderr


def test_prompt_file_stdin_and_quiet(cli_env, gemma_path, tmp_path):
    g = load_golden("gemma3-270m")
    case = safest_case(g)
    expect = golden_text(gemma_path, case, set(g["eog_ids"]))
    f = tmp_path / "prompt.txt"
    f.write_text(case["prompt"], encoding="utf-8")
    common = ["-m", str(gemma_path), "-n", str(N), "--temperature", "0", "-q"]
    by_file = run(cli_env, *common, "--prompt-file", str(f))
    assert (by_file.returncode, by_file.stdout, by_file.stderr) == (0, expect, "")
    by_stdin = run(cli_env, *common, "-f", "-", input=case["prompt"])
    assert (by_stdin.returncode, by_stdin.stdout) == (0, expect)


def test_stop_string_is_not_printed(cli_env, gemma_path):
    g = load_golden("gemma3-270m")
    case = safest_case(g)
    expect = golden_text(gemma_path, case, set(g["eog_ids"]))
    stop = expect.split()[3]
    proc = run(cli_env, "-m", str(gemma_path), "-p", case["prompt"], "-n", str(N), "--temperature", "0",
               "--stop", "no such text", "--stop", stop)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expect[: expect.find(stop)]


def test_output_is_streamed(cli_env, gemma_path):
    """Pieces reach stdout while the process is still generating."""
    proc = subprocess.Popen(
        cli("-m", str(gemma_path), "-p", "Count from one to fifty: one, two,", "-n", "48",
            "--temperature", "0", "-q"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env)
    chunks = []
    fd = proc.stdout.fileno()
    while True:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append((time.monotonic(), proc.poll() is None, data))
    proc.wait(timeout=600)
    assert proc.returncode == 0, proc.stderr.read()
    assert len(chunks) >= 3
    assert chunks[0][1], "the first text arrived only after the process had ended"
    assert chunks[-1][0] - chunks[0][0] > 0.05


def test_chat_applies_the_template(cli_env, qwen_path):
    proc = run(cli_env, "-m", str(qwen_path), "-p", "What is 2+2? Answer with one number.",
               "--chat", "--system", "You are a calculator.", "-n", "16", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "4" in out
    assert "<|im_start|>" not in out and "<|im_end|>" not in out
    assert "stop: eog" in proc.stderr  # the assistant turn ended by itself
