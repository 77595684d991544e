#!/usr/bin/env python3
"""Regenerates the tables of docs/benchmarks.md on this machine, in markdown.

    .venv/bin/python scripts/bench_report.py                      # every table
    .venv/bin/python scripts/bench_report.py --only matmul --quick
    .venv/bin/python scripts/bench_report.py --list               # tables and their commands

It runs the project's benchmark scripts with the arguments each table of the page uses
(scripts/compare_llamacpp.py, bench_matmul.py, bench_allreduce.py, bench_attention.py,
bench_weight_memory.py, and ``tp-numa bench``), and prints, first, a machine header: the
CPU model (/proc/cpuinfo, else lscpu), the kernel ISA in use (``tp_numa._ext.kernel_isa()``),
the read bandwidth of the project's probe at 1 and 2 threads (``ops.read_bandwidth_probe``,
the fastest of bench_matmul.py's read patterns), the THP mode and the commit; then every
table with the commands that produced it. Paste the output into docs/benchmarks.md.

``--quick`` runs fewer repetitions (a check that everything runs; noisier numbers).
The llama.cpp table needs the reference build (``bash scripts/setup_reference.sh``, found
through scripts/reference_paths.py as compare_llamacpp.py finds it, or ``$LCPP_PYTHON``);
when it is missing the table is skipped with a line saying so. Progress of the scripts goes to
stderr, the report to stdout (and to ``--output FILE``).

Every table runs its scripts one after another, never two at once; a full report takes
about 45 minutes on a 2-core machine, most of it the llama.cpp comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODELS = ("qwen2.5-coder-0.5b", "gemma3-270m")


# ---------------------------------------------------------------- formatting (no torch)


def markdown_tables(text: str) -> list[list[str]]:
    """The markdown tables in a script's output: runs of consecutive lines starting with '|'."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            cur.append(line.strip())
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def cells(line: str) -> list[str]:
    """'| a | b |' -> ['a', 'b']."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_with_header(text: str, first_column: str) -> list[str]:
    """The first markdown table in text whose first header cell is first_column ([] if none)."""
    for t in markdown_tables(text):
        if cells(t[0])[0] == first_column:
            return t
    return []


def md_row(values) -> str:
    return "| " + " | ".join(str(v) for v in values) + " |"


def md_table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """Lines of a markdown table; align: one character per column, 'l' or 'r' (default all left)."""
    align = align or "l" * len(header)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [md_row(header), rule] + [md_row(r) for r in rows]


def prefix_column(name: str, value: str, table: list[str]) -> list[str]:
    """table (markdown lines) with a first column `name` holding `value` on every data row."""
    if not table:
        return []
    out = [f"| {name} " + table[0], "|---" + table[1]]
    return out + [f"| {value} " + line for line in table[2:]]


def merge_tables(parts: list[tuple[str, list[str]]], name: str) -> list[str]:
    """One table from several of the same header, a first column `name` telling them apart."""
    parts = [(v, t) for v, t in parts if t]
    if not parts:
        return []
    merged = prefix_column(name, parts[0][0], parts[0][1])
    for value, t in parts[1:]:
        merged += prefix_column(name, value, t)[2:]
    return merged


ALLREDUCE_ROW = re.compile(r"^\s*(\d+ [KM]?B)\s*\|\s*([\d.]+)\s+([\d.]+)\s*\|\s*([\d.]+)\s+([\d.]+)\s*\|"
                           r"\s*([\d.]+)\s+([\d.]+)\s*$")


def allreduce_markdown(text: str) -> list[str]:
    """bench_allreduce.py's fixed-width table as markdown (times in us, ratio = MPI / shm)."""
    rows = [list(m.groups()) for m in map(ALLREDUCE_ROW.match, text.splitlines()) if m]
    return md_table(["size", "shm median (us)", "shm p99", "MPI median (us)", "MPI p99", "ratio median",
                     "ratio p99"], rows, "lrrrrrr") if rows else []


def attention_pair_table(outputs: dict[str, str]) -> list[str]:
    """bench_attention.py's decode tables of several cache types side by side:
    us/layer per cache type and each type's time relative to the first."""
    parsed = {}
    for ctype, text in outputs.items():
        t = table_with_header(text, "geometry")
        parsed[ctype] = {(c[0], c[1]): c[2] for c in map(cells, t[2:])}
    types = list(outputs)
    if not types or not parsed[types[0]]:
        return []
    base = types[0]
    rows = []
    for key, us in parsed[base].items():
        row = [key[0], key[1]] + [parsed[t].get(key, "–") for t in types]
        for t in types[1:]:
            other = parsed[t].get(key)
            row.append(f"{float(other) / float(us):.2f}" if other else "–")
        rows.append(row)
    header = ["geometry", "N_KV"] + [f"{t} decode us/layer" for t in types] + [f"{t} / {base}" for t in types[1:]]
    return md_table(header, rows, "lr" + "r" * (len(header) - 2))


def bench_json_ts(text: str) -> list[float]:
    """avg_ts of every record of ``tp-numa bench -o json`` (llama-bench's JSON)."""
    try:
        return [float(r["avg_ts"]) for r in json.loads(text)]
    except (ValueError, KeyError, TypeError):
        return []


def rounds_table(label: str, runs: dict[str, list[float]]) -> list[str]:
    """| label | round 1 (t/s) | ... | per variant, each round's t/s."""
    if not runs:
        return []
    n = max(len(v) for v in runs.values())
    rows = [[k] + [f"{x:.1f}" for x in v] + ["–"] * (n - len(v)) for k, v in runs.items()]
    return md_table([label] + [f"round {i + 1} (t/s)" for i in range(n)], rows, "l" + "r" * n)


def machine_header(info: dict) -> list[str]:
    """The report's first lines from a dict with cpu, cpus, numa_nodes, llc_mib, isa,
    simd (list), probe ({threads: (GB/s, pattern)}), probe_buffer_mib, window_mib, thp,
    torch, commit, dirty."""
    probe = ", ".join(f"{gbs:.1f} GB/s at {th} thread{'s' if th > 1 else ''} ({pat})"
                      for th, (gbs, pat) in sorted(info["probe"].items()))
    lines = [
        f"- CPU: {info['cpu']}, {info['cpus']} CPUs, {info['numa_nodes']} NUMA node(s), "
        f"LLC {info['llc_mib']:.0f} MiB" + (f"; SIMD: {' '.join(info['simd'])}" if info.get("simd") else ""),
        f"- kernel ISA in use: {info['isa']} (`tp_numa._ext.kernel_isa()`)",
        f"- read bandwidth (`ops.read_bandwidth_probe`, fastest of bench_matmul.py's read patterns, "
        f"{info['window_mib']} MiB windows of a {info['probe_buffer_mib']} MiB buffer in weight memory): "
        + (probe or "not measured"),
        f"- transparent huge pages: {info['thp']}; torch {info['torch']}",
        f"- commit: {info['commit']}" + (" (working tree with uncommitted changes)" if info.get("dirty") else ""),
    ]
    return lines


def display(argv: list[str], env: dict | None = None) -> str:
    """A command line as the page shows it: paths inside the repository relative to it,
    the interpreter as .venv/bin/python, only the environment variables the table sets."""
    def rel(a: str) -> str:
        if os.path.isabs(a) and (a == REPO or a.startswith(REPO + os.sep)):
            return os.path.relpath(a, REPO)
        if a == sys.executable:
            return ".venv/bin/python"
        return a
    words = [rel(a) for a in argv]
    pre = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(pre + [shlex.quote(w) if re.search(r"[^\w@%+=:,./-]", w) else w for w in words])


# ---------------------------------------------------------------- machine facts


def cpu_model() -> str:
    """Model name (and family/model numbers) from /proc/cpuinfo, else lscpu, else 'unknown'."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU is enough
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"^Model name:\s*(.+)$", out, re.M)
            name = m.group(1).strip() if m else None
        except (OSError, subprocess.SubprocessError):
            name = None
    if not name:
        return "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def simd_flags() -> list[str]:
    """The SIMD extensions the kernels care about, as /proc/cpuinfo names them."""
    want = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [w for w in want if w in flags]


def numa_nodes() -> int:
    try:
        return len([d for d in os.listdir("/sys/devices/system/node") if re.fullmatch(r"node\d+", d)]) or 1
    except OSError:
        return 1


def git_commit() -> tuple[str, bool]:
    """(short hash of HEAD, whether tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip() != ""
        return head or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def measure_machine(quick: bool) -> dict:
    """Machine facts and the probe's read bandwidth at 1 and 2 threads (in this process)."""
    import torch

    sys.path.insert(0, HERE)
    import bench_matmul as bm

    from tp_numa import _ext, memory

    buf_bytes = (256 if quick else 1024) << 20
    window = 64 << 20
    probe = {}
    buf = memory.empty_weight(buf_bytes).fill_(1)
    views = bm.probe_windows(buf, window)
    saved = torch.get_num_threads()
    for th in sorted({1, min(2, os.cpu_count() or 1)}):
        torch.set_num_threads(th)
        pat, gbs = bm.best_pattern(views, 0.2 if quick else 0.5)
        probe[th] = (gbs, bm.pattern_label(pat))
    torch.set_num_threads(saved)
    del views, buf
    commit, dirty = git_commit()
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "numa_nodes": numa_nodes(),
            "llc_mib": bm.llc_bytes() / 2 ** 20, "simd": simd_flags(), "isa": _ext.kernel_isa(),
            "probe": probe, "probe_buffer_mib": buf_bytes >> 20, "window_mib": window >> 20,
            "thp": memory.thp_mode() or "unknown", "torch": torch.__version__, "commit": commit, "dirty": dirty}


def reference_python() -> str | None:
    """The python with llama_cpp that compare_llamacpp.py uses by default: $LCPP_PYTHON, else
    the venv of scripts/setup_reference.sh (scripts/reference_paths.py); None when it is
    missing or cannot import llama_cpp."""
    py = os.environ.get("LCPP_PYTHON")
    if not py:
        sys.path.insert(0, HERE)
        try:
            import reference_paths

            py = reference_paths.python()
        except (ImportError, SystemExit):
            return None
    try:
        ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return py if ok else None


# ---------------------------------------------------------------- tables


@dataclass
class Run:
    label: str
    argv: list[str]
    env: dict = field(default_factory=dict)  # variables set on top of the environment


@dataclass
class Table:
    name: str
    title: str
    what: str
    runs: Callable[[bool], list[Run]]           # quick -> commands
    render: Callable[[dict[str, str]], list[str]]  # label -> stdout -> markdown lines
    needs: Callable[[], str | None] = lambda: None  # None, or why the table cannot run here


PY = sys.executable
SCRIPTS = {n: os.path.join(HERE, n) for n in ("compare_llamacpp.py", "bench_matmul.py", "bench_allreduce.py",
                                              "bench_attention.py", "bench_weight_memory.py")}
MATMUL_TYPES = ["Q4_0x4", "Q5_0x4", "Q8_0x4", "Q4_Kx4", "Q6_Kx4"]
ROW_TYPES = ["Q4_1", "Q5_1", "IQ4_NL", "IQ4_XS", "F16"]


def mpirun() -> str:
    here = os.path.join(os.path.dirname(PY), "mpirun")
    return here if os.path.exists(here) else (shutil.which("mpirun") or "mpirun")


def llamacpp_runs(quick: bool) -> list[Run]:
    return [Run(m, [PY, SCRIPTS["compare_llamacpp.py"], "-m", m, "-r", "1" if quick else "3",
                    "--tests", "pp512,tg128,tg128@d4096", "--configs", "t1,t2,tp2x1"]) for m in MODELS]


def llamacpp_render(out: dict[str, str]) -> list[str]:
    lines = merge_tables([(m, table_with_header(out[m], "config")) for m in out], "model")
    ratios = [f"- {m}, {line.strip()[len('tp-numa '):]}" for m in out for line in out[m].splitlines()
              if line.startswith("tp-numa tp2x1 / t2")]
    return lines + ([""] + ratios if ratios else [])


def llamacpp_needs() -> str | None:
    if reference_python() is None:
        return "the llama.cpp reference is not built: run `bash scripts/setup_reference.sh` (once, 15-30 min)"
    return None


def matmul_runs(types: list[str], rounds: int):
    def runs(quick: bool) -> list[Run]:
        return [Run("matmul", [PY, SCRIPTS["bench_matmul.py"], "--threads", "1", "2", "--types", *types,
                               "--no-gemm", "--rounds", "1" if quick else str(rounds)]
                    + (["--min-time", "0.15"] if quick else []))]
    return runs


def matmul_render(out: dict[str, str]) -> list[str]:
    text = out["matmul"]
    target = [line for line in text.splitlines() if line.startswith("target GEMV")]
    return table_with_header(text, "type") + ([""] + target if target else [])


def allreduce_runs(quick: bool) -> list[Run]:
    return [Run("allreduce", [mpirun(), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2",
                              PY, SCRIPTS["bench_allreduce.py"]] + (["--iters", "500"] if quick else []))]


def kvcache_runs(quick: bool) -> list[Run]:
    op = [Run(f"op {c}", [PY, SCRIPTS["bench_attention.py"], "-t", "1", "--ctx", "512,4096", "--cache-type", c]
              + (["--rounds", "2", "--reps", "5"] if quick else [])) for c in ("f16", "q8_0")]
    e2e = []
    for r in range(1 if quick else 2):
        for c in (("q8_0", "f16") if r % 2 == 0 else ("f16", "q8_0")):
            e2e.append(Run(f"e2e {c} {r}", [PY, "-m", "tp_numa.cli", "bench", "-m", MODELS[0], "-p", "0", "-n",
                                            "16" if quick else "32", "-r", "1" if quick else "3", "-t", "2",
                                            "-d", "4096", "-ctk", c, "-o", "json"]))
    return op + e2e


def kvcache_render(out: dict[str, str]) -> list[str]:
    op = attention_pair_table({c: out[f"op {c}"] for c in ("f16", "q8_0") if f"op {c}" in out})
    runs: dict[str, list[float]] = {}
    for label in sorted((k for k in out if k.startswith("e2e ")), key=lambda k: int(k.split()[2])):
        runs.setdefault(label.split()[1], []).extend(bench_json_ts(out[label]))
    e2e = rounds_table("cache", {k: runs[k] for k in ("q8_0", "f16") if k in runs})
    lines = []
    if op:
        lines += ["Attention decode op alone, 1 thread (bench_attention.py):", ""] + op
    if e2e:
        lines += ["", f"Decode at depth 4096, {MODELS[0]}, 2 threads (`tp-numa bench`), alternating:", ""] + e2e
    return lines


def hugepages_runs(quick: bool) -> list[Run]:
    return [Run("hugepages", [PY, SCRIPTS["bench_weight_memory.py"]]
                + (["--rounds", "2", "--min-time", "0.1"] if quick else []))]


def hugepages_render(out: dict[str, str]) -> list[str]:
    text = out["hugepages"]
    thp = [line for line in text.splitlines() if line.startswith("transparent huge pages")]
    return table_with_header(text, "type") + ([""] + thp if thp else [])


TABLES = [
    Table("llamacpp", "Decode and prefill against llama.cpp (t1, t2, tp2x1, depth 4096)",
          "tp-numa and llama.cpp on the same GGUF and threads, interleaved, t/s mean ± stddev",
          llamacpp_runs, llamacpp_render, llamacpp_needs),
    Table("matmul", "GEMV against the read probe, the x4 types the engine runs",
          "weight GB/s of one GEMV call from DRAM (ratio to the probe read alongside it), best of the rounds",
          matmul_runs(MATMUL_TYPES, 3), matmul_render),
    Table("matmul-rows", "GEMV against the read probe, types in the row layout",
          "as the x4 table, for the types the engine keeps in rows",
          matmul_runs(ROW_TYPES, 2), matmul_render),
    Table("allreduce", "All-reduce: shared memory against MPI",
          "fp32 in place, 2 ranks, the slowest rank's time per iteration", allreduce_runs,
          lambda out: allreduce_markdown(out["allreduce"])),
    Table("kvcache", "q8_0 KV cache against f16",
          "the attention op alone, and decode end to end at depth 4096", kvcache_runs, kvcache_render),
    Table("hugepages", "Weight memory on 2 MiB huge pages against 4 KiB pages",
          "the same weight bytes in both kinds of memory, alternating, median of the paired ratios",
          hugepages_runs, hugepages_render),
]


def run_table(table: Table, quick: bool) -> list[str]:
    """Runs a table's commands (stderr passed through) and returns its markdown section."""
    lines = [f"### {table.title}", "", f"`--only {table.name}`: {table.what}.", ""]
    why = table.needs()
    if why:
        return lines + [f"Skipped: {why}."]
    runs = table.runs(quick)
    lines += ["```"] + [display(r.argv, r.env) for r in runs] + ["```", ""]
    out, failed = {}, []
    for r in runs:
        print(f"bench_report: {display(r.argv, r.env)}", file=sys.stderr, flush=True)
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **r.env)
        p = subprocess.run(r.argv, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        if p.returncode != 0:
            failed.append(f"failed (exit {p.returncode}): `{display(r.argv, r.env)}` (its stderr is above)")
            continue
        out[r.label] = p.stdout
    body = table.render(out) if out else []
    return lines + (body or ["(no table: the commands printed none)"]) + ([""] + failed if failed else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [t.name for t in TABLES]
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help=f"run only this table (repeatable, or comma list): {', '.join(names)}")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and rounds (noisier)")
    ap.add_argument("--list", action="store_true", help="print the tables and their commands, run nothing")
    ap.add_argument("--output", metavar="FILE", help="also write the report to FILE")
    args = ap.parse_args()
    only = [n for o in (args.only or []) for n in o.split(",") if n]
    for n in only:
        if n not in names:
            ap.error(f"unknown table {n!r} (choose from {', '.join(names)})")
    tables = [t for t in TABLES if not only or t.name in only]
    if args.list:
        for t in tables:
            print(f"{t.name}: {t.title}")
            for r in t.runs(args.quick):
                print(f"    {display(r.argv, r.env)}")
        return 0

    sys.path.insert(0, REPO)
    info = measure_machine(args.quick)
    report = ["## Machine", ""] + machine_header(info) + [""]
    if args.quick:
        report += ["(`--quick`: fewer repetitions than the page's tables.)", ""]
    print("\n".join(report), flush=True)
    for t in tables:
        section = run_table(t, args.quick) + [""]
        print("\n".join(section), flush=True)
        report += section
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
