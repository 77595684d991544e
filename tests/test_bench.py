"""`tp-numa bench`: llama-bench / llama-sweep-bench output formats, the PNG writer, and a
real (tiny) end-to-end run through the CLI."""
import json
import math
import re
import statistics
import struct
import subprocess
import zlib

import pytest

from tp_numa import benchmark as bm
from tp_numa.png_plot import line_plot

INFO = bm.ModelInfo("/m/qwen.gguf", "qwen2", 485_450_560, 630_167_424, "Q4_K - Medium", "0.5B")


def test_size_and_params_columns_follow_llama_bench():
    assert bm.format_size(485_450_560) == "462.96 MiB"
    assert bm.format_size(3 * 1024 ** 3 + 1024 ** 3 // 4) == "3.25 GiB"
    assert bm.format_size(1024 ** 3 - 1) == "1024.00 MiB"
    assert bm.format_params(630_167_424) == "630.17 M"
    assert bm.format_params(7_241_732_096) == "7.24 B"


def test_test_names():
    assert bm.test_name(512, 0, 0) == "pp512"
    assert bm.test_name(0, 128, 0) == "tg128"
    assert bm.test_name(512, 0, 4096) == "pp512 @ d4096"
    assert bm.test_name(0, 128, 4096) == "tg128 @ d4096"
    assert bm.test_name(512, 128, 0) == "pp512+tg128"


def test_mean_std_is_sample_stddev():
    xs = [10.0, 12.0, 11.5, 9.0]
    m, s = bm.mean_std(xs)
    assert m == pytest.approx(statistics.mean(xs)) and s == pytest.approx(statistics.stdev(xs))
    assert bm.mean_std([3.0]) == (3.0, 0.0)


def _result(n_prompt, n_gen, depth, secs, ranks=1):
    r = bm.TestResult(INFO, 2, ranks, n_prompt, n_gen, depth)
    r.samples_ns = [int(s * 1e9) for s in secs]
    return r


def test_markdown_table():
    rows = [_result(512, 0, 0, [5.0, 5.2, 4.8]), _result(0, 128, 4096, [4.0, 4.0])]
    text = bm.markdown_table(rows, show_ranks=False).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text]
    assert cells[0] == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    assert all(re.fullmatch(r"-+:?", c) for c in cells[1])
    assert cells[1][1].endswith(":") and not cells[1][0].endswith(":")  # size right, model left aligned
    ts = [512 / s for s in (5.0, 5.2, 4.8)]
    assert cells[2] == ["qwen2 0.5B Q4_K - Medium", "462.96 MiB", "630.17 M", "CPU", "2", "pp512",
                        f"{statistics.mean(ts):.2f} ± {statistics.stdev(ts):.2f}"]
    assert cells[3][5:] == ["tg128 @ d4096", "32.00 ± 0.00"]
    assert len({len(line) for line in text}) == 1  # columns padded to one width


def test_markdown_table_ranks_column():
    text = bm.markdown_table([_result(0, 128, 0, [1.0], ranks=2)], show_ranks=True).splitlines()
    header = [c.strip() for c in text[0].strip("|").split("|")]
    row = [c.strip() for c in text[2].strip("|").split("|")]
    assert header[4:6] == ["ranks", "threads"] and row[4:6] == ["2", "2"]


def test_json_records_have_llama_bench_keys():
    recs = json.loads(bm.json_output([_result(0, 128, 0, [2.0, 4.0])]))
    assert isinstance(recs, list) and len(recs) == 1
    r = recs[0]
    for key in ("model_filename", "model_type", "model_size", "model_n_params", "n_threads", "n_prompt",
                "n_gen", "n_depth", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ts"):
        assert key in r, key
    assert r["model_type"] == "qwen2 0.5B Q4_K - Medium" and r["model_size"] == 485_450_560
    assert r["avg_ns"] == 3_000_000_000 and r["stddev_ns"] == round(math.sqrt(2) * 1e9)
    assert r["samples_ts"] == [64.0, 32.0] and r["avg_ts"] == 48.0
    assert r["stddev_ts"] == pytest.approx(statistics.stdev([64.0, 32.0]))


def test_sweep_rows():
    row = bm.SweepRow(512, 128, 1024, 2.5, 4.0)
    assert row.s_pp == pytest.approx(204.8) and row.s_tg == 32.0 and row.ms_per_token == 31.25
    header = [c.strip() for c in bm.SWEEP_HEADER.strip("|").split("|")]
    assert header == ["PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s"]
    cells = [c.strip() for c in bm.sweep_line(row).strip("|").split("|")]
    assert cells == ["512", "128", "1024", "2.500", "204.80", "4.000", "32.00"]
    assert len(bm.sweep_line(row)) == len(bm.SWEEP_HEADER) == len(bm.SWEEP_RULE)


def _read_png(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    return w, h, depth, ctype, zlib.decompress(chunks[b"IDAT"])


def test_builtin_png_plot(tmp_path):
    out = tmp_path / "p.png"
    assert line_plot(str(out), [0, 512, 1024], [30.0, 31.0, 33.5], width=200, height=120,
                     prefer_matplotlib=False) == "builtin"
    w, h, depth, ctype, raw = _read_png(out.read_bytes())
    assert (w, h, depth, ctype) == (200, 120, 8, 2) and len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w) + 1:(y + 1) * (1 + 3 * w)] for y in range(h)]
    blue = bytes((31, 119, 180))
    assert sum(r.count(blue) for r in rows) > 50  # the data line was drawn


def test_bench_cli_end_to_end(tmp_path, cli_env, python):
    """A real run on a tiny random GGUF: json and markdown outputs, sweep with a plot."""
    from synthetic_gguf import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny.gguf")
    base = [python, "-m", "tp_numa.cli", "bench", "-m", str(model)]
    r = subprocess.run(base + ["-p", "8", "-n", "4", "-d", "0,6", "-r", "2", "-t", "1", "-o", "json"],
                       capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)
    assert [(x["n_prompt"], x["n_gen"], x["n_depth"]) for x in recs] == [(8, 0, 0), (0, 4, 0), (8, 0, 6), (0, 4, 6)]
    assert all(len(x["samples_ts"]) == 2 and x["avg_ts"] > 0 and x["n_threads"] == 1 for x in recs)
    assert "rep 2/2" in r.stderr  # progress on stderr

    plot = tmp_path / "sweep.png"
    r = subprocess.run(base + ["--sweep", "-c", "64", "-ub", "16", "--sweep-tg", "4", "--plot", str(plot), "-t", "1"],
                       capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if re.match(r"\|\s+16 \|", line)]
    assert [int(line.split("|")[3]) for line in rows] == [0, 16, 32, 48]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = subprocess.run(base + ["-p", "0", "-n", "0"], capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode != 0 and "nothing to run" in r.stderr and "Traceback" not in r.stderr


def test_compare_script_tpnuma_worker_protocol(tmp_path, cli_env, python):
    """scripts/compare_llamacpp.py's tp-numa worker: loads once, answers timed runs on stdin."""
    import os

    from synthetic_gguf import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny.gguf")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "compare_llamacpp.py")
    cmds = "\n".join(json.dumps(c) for c in [
        {"op": "run", "kind": "pp", "n": 8, "depth": 0},
        {"op": "run", "kind": "tg", "n": 3, "depth": 5},
        {"op": "quit"}]) + "\n"
    r = subprocess.run([python, script, "--worker", "tpnuma", "-m", str(model), "--threads", "1", "--ctx", "32"],
                       input=cmds, capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    replies = [json.loads(line[2:]) for line in r.stdout.splitlines() if line.startswith("@@")]
    assert replies[0] == {"ready": True}
    assert len(replies) == 3 and all(x["secs"] > 0 for x in replies[1:])


def test_bench_matmul_script_runs_small(cli_env, python):
    """scripts/bench_matmul.py end to end at toy sizes: the probe-pattern table, one GEMV cell
    per shape with a ratio to the probe read alongside it, the GEMM column, the target line."""
    import os

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_matmul.py")
    r = subprocess.run([python, script, "--threads", "1", "--types", "Q4_0x4", "Q4_K", "--shapes", "64x512",
                        "96x640", "--min-time", "0.02", "--gemm-shape", "64x256", "--gemm-m", "8",
                        "--bw-bytes", str(8 << 20), "--rounds", "2"],
                       capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    probes = [line for line in out.splitlines() if re.match(r"\| 1 \| 0\.0\d+ \| \d streams?", line)]
    assert len(probes) == 2  # one per weight size: 64x512 (Q4_0 and Q4_K: 18432 bytes), 96x640 Q4_0
    row = next(line for line in out.splitlines() if line.startswith("| Q4_0x4 | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6 and all(re.fullmatch(r"[\d.]+ \([\d.]+\)", c) for c in cells[3:5])
    assert "n/a (K % 256)" in next(line for line in out.splitlines() if line.startswith("| Q4_K | 1 |"))
    assert "target GEMV >= 0.85 x read bandwidth for Q4_0x4" in out
