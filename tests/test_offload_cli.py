"""`tp-numa plan` and `--offload` on the command line: printed plans, one-line errors,
non-zero exits (on every rank under mpirun), and the no-CUDA failure before loading."""
import subprocess
import sys

import pytest
import torch

from mpi_util import mpirun_or_skip

HAS_CUDA = torch.cuda.is_available()
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")


def cli(args, env, timeout=300, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "tp_numa.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tp-numa: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_plan_prints_per_rank_devices_and_bytes(cli_env, model_path, name):
    model_path(name)  # installed and cached before the CLI runs
    r = cli(["plan", "--model", name, "--offload", "attention-on-gpu", "--tp", "2", "--gpus", "2", "-c", "2048"],
            cli_env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "tp=2, context 2048, KV cache f16" in out
    attn = next(ln for ln in out.splitlines() if "self_attn.attn" in ln)
    assert "cuda:0" in attn and "cuda:1" in attn
    assert "rank 0: cpu " in out and "rank 1: cpu " in out
    assert "mlp.down_proj" in out and "lm_head" in out


def test_plan_of_a_toml_file_lists_unmatched_rules(cli_env, model_path, tmp_path):
    cfg = tmp_path / "place.toml"
    cfg.write_text("[[rule]]\npattern = '^model\\.layers\\.0\\.self_attn\\.attn$'\ndevice = 'cuda:0'\n"
                   "[[rule]]\npattern = 'experts'\ndevice = 'cpu'\n")
    model_path("gemma3-270m")
    r = cli(["plan", "--model", "gemma3-270m", "--offload", str(cfg), "--gpus", "1"], cli_env)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if "self_attn.attn" in ln]
    assert rows[0].split()[1:3] == ["(KV", "cache)"] and " 0 " in rows[0] and "cuda:0" in rows[0]
    assert "1-17" in rows[1] and "cpu" in rows[1]
    assert "warning: " + str(cfg) + ": rule 2 (pattern 'experts' -> cpu) matches no module" in r.stdout


@pytest.mark.parametrize("text,message", [
    ("[[rule]]\npattern = 'x\n", "invalid TOML"),
    ("[[rule]]\npattern = '(attn'\ndevice = 'cpu'\n", "rule 1: bad regular expression '(attn'"),
    ("[[rule]]\npattern = 'attn'\ndevice = 'gpu0'\n", "rule 1: unknown device 'gpu0'"),
])
def test_plan_config_errors_are_one_line(cli_env, model_path, tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    model_path("gemma3-270m")
    r = cli(["plan", "--model", "gemma3-270m", "--offload", str(cfg)], cli_env)
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert str(cfg) in line and message in line


def test_plan_of_whole_layers_on_gpu(cli_env, model_path, tmp_path):
    cfg = tmp_path / "layers.toml"
    cfg.write_text("[[rule]]\npattern = '^model\\.layers\\.(1[2-9]|2[0-3])\\.'\ndevice = 'cuda'\n")
    model_path("qwen2.5-coder-0.5b")
    r = cli(["plan", "--model", "qwen2.5-coder-0.5b", "--offload", str(cfg), "--tp", "2", "--gpus", "2"], cli_env)
    assert r.returncode == 0, r.stderr
    down = [ln.split() for ln in r.stdout.splitlines() if "mlp.down_proj" in ln]
    assert down[0][:2] == ["model.layers.*.mlp.down_proj", "0-11"] and down[0][2] == "cpu"
    assert down[1][:3] == ["model.layers.*.mlp.down_proj", "(fp16)", "12-23"]
    assert down[1][3] == "cuda:0" and down[1][6] == "cuda:1"


def test_plan_of_a_lone_mlp_on_gpu_is_one_error_line(cli_env, model_path, tmp_path):
    cfg = tmp_path / "mlp.toml"
    cfg.write_text("[[rule]]\npattern = '\\.mlp\\.'\ndevice = 'cuda'\n")
    model_path("gemma3-270m")
    r = cli(["plan", "--model", "gemma3-270m", "--offload", str(cfg), "--gpus", "1"], cli_env)
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert "places 'model.layers.0.mlp.gate_up_proj' on cuda:0" in line and "whole decoder layers" in line


@no_cuda_only
def test_plan_without_cuda_asks_for_gpus(cli_env, model_path):
    model_path("gemma3-270m")
    r = cli(["plan", "--model", "gemma3-270m", "--offload", "attention-on-gpu"], cli_env)
    assert r.returncode != 0
    assert "pass --gpus N" in one_error_line(r.stderr)


@no_cuda_only
@pytest.mark.parametrize("preset", ["attention-on-gpu", "layers-on-gpu"])
def test_generate_with_gpu_config_fails_before_loading(cli_env, tmp_path, preset):
    # A file that is not a GGUF at all: the placement error must come first, proving
    # that the config is checked before the model is read.
    fake = tmp_path / "not-a-model.gguf"
    fake.write_bytes(b"this is not a gguf file" * 10)
    r = cli(["generate", "--model", str(fake), "--offload", preset, "-p", "hi", "-n", "2"], cli_env)
    assert r.returncode != 0 and r.stdout == ""
    line = one_error_line(r.stderr)
    assert "needs a CUDA GPU, but none is available" in line and "not a GGUF" not in line


@no_cuda_only
@pytest.mark.mpi
def test_gpu_config_without_cuda_ends_every_rank(cli_env, tmp_path):
    mpirun = mpirun_or_skip()
    fake = tmp_path / "not-a-model.gguf"
    fake.write_bytes(b"this is not a gguf file" * 10)
    env = dict(cli_env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    r = cli(["generate", "--model", str(fake), "--offload", "attention-on-gpu", "-p", "hi", "-n", "2"], env,
            timeout=120, prefix=(mpirun, "--oversubscribe", "-np", "2"))
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr
    assert "needs a CUDA GPU, but none is available" in r.stderr
