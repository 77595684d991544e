"""scripts/bench_report.py: the machine header, the markdown it builds from the benchmark
scripts' outputs, the skip line of the llama.cpp table, and a real run of its cheapest
command (the attention op alone with a q8_0 cache; no llama.cpp, no model)."""
import os
import re
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)
import bench_report as br  # noqa: E402

MATMUL_OUT = """kernel ISA: avx2   LLC: 32 MiB   torch 2.13.0+cpu
Read-probe pattern per thread count and window (the GEMV weight's size), chosen as the fastest of 7 in the first round:

| threads | window MB | pattern | GB/s when chosen |
|---|---|---|---|
| 1 | 9.4 | 3 streams | 24.1 |

GEMV cells: weight GB/s (ratio to the probe read alongside it, best of each over 3 rounds)

| type | threads | in-cache GEMV GB/s | GEMV 4096x4096 GB/s (ratio) |
|---|---|---|---|
| Q4_0x4 | 1 | 21.9 | 24.4 (0.86) |
| Q4_0x4 | 2 | 32.3 | 33.6 (0.84) |

target GEMV >= 0.85 x read bandwidth for Q4_0x4: missed at Q4_0x4 4096x4096 2t: 0.84
"""

ALLREDUCE_OUT = """all-reduce fp32, 2 ranks, path=communicator, iters=2000 (times in us; ratio = mpi / shm)
   size |  shm med  shm p99 |  mpi med  mpi p99 | ratio med ratio p99
   4 KB |     1.88     3.15 |     4.08     8.64 |      2.17      2.74
   1 MB |    68.73   105.23 |   155.05   220.37 |      2.26      2.09
"""

COMPARE_OUT = """
qwen.gguf: tp-numa vs llama.cpp, 3 interleaved repetitions, t/s mean ± stddev

| config | test | tp-numa t/s | llama.cpp t/s | ratio |
|---|---|---:|---:|---:|
| t2 | tg128 | 51.76 ± 5.61 | 29.68 ± 0.77 | 1.74x |
| tp2x1 | tg128 | 43.61 ± 2.40 | 20.00 ± 1.00 | 2.18x |

tp-numa tp2x1 / t2, tg128: 0.843
"""


def test_markdown_tables_and_header_lookup():
    tables = br.markdown_tables(MATMUL_OUT)
    assert [len(t) for t in tables] == [3, 4]
    gemv = br.table_with_header(MATMUL_OUT, "type")
    assert br.cells(gemv[2]) == ["Q4_0x4", "1", "21.9", "24.4 (0.86)"]
    assert br.table_with_header(MATMUL_OUT, "nothing") == []


def test_matmul_render_keeps_table_and_target_line():
    lines = br.matmul_render({"matmul": MATMUL_OUT})
    assert lines[0].startswith("| type | threads |") and lines[-1].startswith("target GEMV >= 0.85")
    assert not any("window MB" in line for line in lines)  # the probe-pattern table is left out


def test_allreduce_markdown():
    lines = br.allreduce_markdown(ALLREDUCE_OUT)
    assert br.cells(lines[0])[:3] == ["size", "shm median (us)", "shm p99"]
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|"
    assert br.cells(lines[2]) == ["4 KB", "1.88", "3.15", "4.08", "8.64", "2.17", "2.74"]
    assert br.cells(lines[3])[0] == "1 MB" and len(lines) == 4
    assert br.allreduce_markdown("no table here") == []


def test_llamacpp_render_merges_models_with_a_column():
    lines = br.llamacpp_render({"qwen": COMPARE_OUT, "gemma": COMPARE_OUT.replace("51.76", "66.87")})
    assert br.cells(lines[0]) == ["model", "config", "test", "tp-numa t/s", "llama.cpp t/s", "ratio"]
    assert lines[1] == "|---|---|---|---:|---:|---:|"
    rows = [br.cells(line) for line in lines[2:6]]
    assert [r[:2] for r in rows] == [["qwen", "t2"], ["qwen", "tp2x1"], ["gemma", "t2"], ["gemma", "tp2x1"]]
    assert rows[2][3] == "66.87 ± 5.61"
    assert "- qwen, tp2x1 / t2, tg128: 0.843" in lines


def test_attention_pair_and_rounds_tables():
    f16 = "| geometry | N_KV | decode us/layer | x | y |\n|---|\n| qwen | 4096 | 300.0 | 1 | 2 |\n"
    q8 = "| geometry | N_KV | decode us/layer | x | y |\n|---|\n| qwen | 4096 | 450.0 | 1 | 2 |\n"
    lines = br.attention_pair_table({"f16": f16, "q8_0": q8})
    assert br.cells(lines[0]) == ["geometry", "N_KV", "f16 decode us/layer", "q8_0 decode us/layer", "q8_0 / f16"]
    assert br.cells(lines[2]) == ["qwen", "4096", "300.0", "450.0", "1.50"]
    assert br.bench_json_ts('[{"avg_ts": 33.1}, {"avg_ts": 30.4}]') == [33.1, 30.4]
    assert br.bench_json_ts("not json") == []
    r = br.rounds_table("cache", {"q8_0": [33.1, 30.4], "f16": [30.7]})
    assert br.cells(r[0]) == ["cache", "round 1 (t/s)", "round 2 (t/s)"]
    assert br.cells(r[3]) == ["f16", "30.7", "–"]


def test_machine_header_lines():
    info = {"cpu": "AMD EPYC (family 25, model 17)", "cpus": 2, "numa_nodes": 1, "llc_mib": 32.0,
            "simd": ["avx2", "avx512f"], "isa": "avx2", "probe": {2: (30.25, "3 streams"), 1: (20.04, "2 streams")},
            "probe_buffer_mib": 1024, "window_mib": 64, "thp": "madvise", "torch": "2.13.0+cpu",
            "commit": "abc1234", "dirty": True}
    text = "\n".join(br.machine_header(info))
    assert "AMD EPYC (family 25, model 17), 2 CPUs, 1 NUMA node(s), LLC 32 MiB; SIMD: avx2 avx512f" in text
    assert "kernel ISA in use: avx2" in text
    assert "20.0 GB/s at 1 thread (2 streams), 30.2 GB/s at 2 threads (3 streams)" in text  # sorted by threads
    assert "commit: abc1234 (working tree with uncommitted changes)" in text


def test_machine_facts_from_this_host():
    assert br.cpu_model() != ""
    commit, dirty = br.git_commit()
    assert re.fullmatch(r"[0-9a-f]{7,}|unknown", commit) and isinstance(dirty, bool)


def test_display_relativizes_repo_paths():
    argv = [sys.executable, os.path.join(SCRIPTS, "bench_matmul.py"), "--tests", "pp512,tg128@d4096", "a b"]
    shown = br.display(argv, {"TP_NUMA_HUGEPAGES": "0"})
    assert shown.startswith("TP_NUMA_HUGEPAGES=0 ")
    assert "scripts/bench_matmul.py --tests pp512,tg128@d4096 'a b'" in shown
    assert os.path.join(SCRIPTS, "") not in shown


def test_llamacpp_table_skipped_without_reference(monkeypatch, tmp_path):
    monkeypatch.delenv("LCPP_PYTHON", raising=False)
    monkeypatch.setenv("TP_NUMA_REFERENCE_DIR", str(tmp_path))  # an empty cache folder
    assert br.reference_python() is None
    table = next(t for t in br.TABLES if t.name == "llamacpp")
    lines = br.run_table(table, quick=True)
    assert lines[0].startswith("### ") and "bash scripts/setup_reference.sh" in lines[-1]


def test_unknown_table_is_an_error(cli_env, python):
    r = subprocess.run([python, os.path.join(SCRIPTS, "bench_report.py"), "--only", "nope"],
                       capture_output=True, text=True, env=cli_env, timeout=60)
    assert r.returncode == 2 and "unknown table 'nope'" in r.stderr


def test_list_names_every_table(cli_env, python):
    r = subprocess.run([python, os.path.join(SCRIPTS, "bench_report.py"), "--list"],
                       capture_output=True, text=True, env=cli_env, timeout=60)
    assert r.returncode == 0, r.stderr
    names = [line.split(":")[0] for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert names == [t.name for t in br.TABLES]
    assert "scripts/bench_matmul.py --threads 1 2 --types Q4_0x4" in r.stdout


def test_attention_op_table_end_to_end(python):
    """bench_attention.py with a q8_0 cache for real, at toy repetitions, through run_table."""
    pytest.importorskip("torch")
    from tp_numa import attention_ops

    if not attention_ops.available():
        pytest.skip("native attention ops not built")
    runs = [br.Run("op q8_0", [python, br.SCRIPTS["bench_attention.py"], "-t", "1", "--ctx", "64",
                               "--cache-type", "q8_0", "--rounds", "1", "--reps", "2"])]
    table = br.Table("t", "toy", "toy", lambda quick: runs, br.kvcache_render)
    lines = br.run_table(table, quick=True)
    assert any(line.endswith("scripts/bench_attention.py -t 1 --ctx 64 --cache-type q8_0 --rounds 1 --reps 2")
               for line in lines)
    rows = [br.cells(line) for line in lines if line.startswith("| qwen2.5-0.5b | 64 |")]
    assert len(rows) == 1 and float(rows[0][2]) > 0, lines
    assert not any(line.startswith("failed") for line in lines)
