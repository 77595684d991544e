"""Bad input through the real CLI (a subprocess): one clear line on stderr, a non-zero
exit, nothing on stdout, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from synthetic_gguf import write_tiny_llama


def generate(cli_env, *args, timeout=300):
    cmd = [sys.executable, "-m", "tp_numa.cli", "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=timeout)


def assert_one_line_error(proc, *needles):
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tp-numa: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_tiny_model_itself_works(cli_env, tiny):
    """The synthetic file is valid: each broken variant below fails for its one flaw."""
    proc = generate(cli_env, "-m", str(tiny), "-p", "hello the", "-n", "4", "--temperature", "0", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_missing_file(cli_env, tmp_path):
    missing = tmp_path / "missing-model.gguf"
    assert_one_line_error(generate(cli_env, "-m", str(missing), "-p", "hi"), str(missing))


def test_unknown_short_name(cli_env):
    assert_one_line_error(generate(cli_env, "-m", "tinyllama-7b", "-p", "hi"),
                          "tinyllama-7b", "qwen2.5-coder-0.5b", "gemma3-270m")


def test_not_a_gguf(cli_env, tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(4096))
    assert_one_line_error(generate(cli_env, "-m", str(bad), "-p", "hi"), str(bad), "not a GGUF")


def test_truncated_file(cli_env, tiny, tmp_path):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(generate(cli_env, "-m", str(cut), "-p", "hi"), str(cut), "truncated")


def test_truncated_header(cli_env, tiny, tmp_path):
    cut = tmp_path / "cut_header.gguf"
    cut.write_bytes(tiny.read_bytes()[:100])
    assert_one_line_error(generate(cli_env, "-m", str(cut), "-p", "hi"), str(cut))


@pytest.mark.slow
def test_truncated_shipped_model(cli_env, gemma_path, tmp_path):
    """The real gemma3 file cut after 24 MiB: header intact, tensor data missing."""
    cut = tmp_path / "gemma-cut.gguf"
    with open(gemma_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(24 << 20))
    assert_one_line_error(generate(cli_env, "-m", str(cut), "-p", "hi"), str(cut), "truncated")


def test_unknown_architecture(cli_env, tmp_path):
    f = write_tiny_llama(tmp_path / "arch.gguf", arch="mamba9")
    assert_one_line_error(generate(cli_env, "-m", str(f), "-p", "hi"), "mamba9", "not supported")


def test_missing_tensor(cli_env, tmp_path):
    f = write_tiny_llama(tmp_path / "drop.gguf", drop=("blk.0.ffn_down.weight",))
    assert_one_line_error(generate(cli_env, "-m", str(f), "-p", "hi"), "blk.0.ffn_down.weight", "missing")


def test_unsupported_tensor_type(cli_env, tmp_path):
    f = write_tiny_llama(tmp_path / "q81.gguf", unsupported="blk.0.attn_q.weight")
    assert_one_line_error(generate(cli_env, "-m", str(f), "-p", "hi"), "blk.0.attn_q.weight", "Q8_1")


def test_prompt_longer_than_context(cli_env, tiny):
    line = assert_one_line_error(
        generate(cli_env, "-m", str(tiny), "-p", "hello the hello the hello", "-c", "4"), "context")
    assert "24 tokens" in line and "holds 4" in line


@pytest.mark.slow
def test_prompt_longer_than_context_shipped_model(cli_env, gemma_path):
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    line = assert_one_line_error(generate(cli_env, "-m", str(gemma_path), "-p", prompt, "-c", "8"))
    assert "13 tokens" in line and "holds 8" in line  # BOS + 12 words


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--top-p", "0"], "--top-p"),
        (["--min-p", "2"], "--min-p"),
        (["--repeat-penalty", "-1"], "--repeat-penalty"),
        (["--max-tokens", "-3"], "--max-tokens"),
        (["--threads", "0"], "--threads"),
        (["--ctx-size", "0"], "--ctx-size"),
        (["--system", "be brief"], "--chat"),
    ],
)
def test_bad_options(cli_env, tiny, args, needle):
    assert_one_line_error(generate(cli_env, "-m", str(tiny), "-p", "hi", *args), needle)


def test_no_prompt_and_bad_prompt_file(cli_env, tiny, tmp_path):
    assert_one_line_error(generate(cli_env, "-m", str(tiny)), "--prompt")
    missing = tmp_path / "prompt.txt"
    assert_one_line_error(generate(cli_env, "-m", str(tiny), "-f", str(missing)), str(missing))
