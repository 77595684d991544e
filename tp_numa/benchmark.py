"""llama-bench compatible results: model description, statistics, markdown / JSON / sweep output.

No model code here: ``tp_numa.commands.bench`` measures, this module formats, so the
formats can be tested on their own against llama-bench's conventions:

- markdown ``| model | size | params | backend | threads | test | t/s |`` (plus ``ranks``
  under mpirun); size ``%.2f MiB`` below 1 GiB else ``%.2f GiB``; params ``%.2f M`` below
  1e9 else ``%.2f B``; test ``pp512``, ``tg128``, ``pp512 @ d4096``; t/s ``mean ± stddev``;
- JSON: a list of records with llama-bench's keys (``avg_ts`` etc., ns as integers);
- llama-sweep-bench: ``| PP | TG | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s |``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

# general.file_type -> llama.cpp's ftype name (llama_model_ftype_name)
_FTYPE_NAMES = {
    0: "all F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K - Medium", 11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large",
    14: "Q4_K - Small", 15: "Q4_K - Medium", 16: "Q5_K - Small", 17: "Q5_K - Medium",
    18: "Q6_K", 19: "IQ2_XXS - 2.0625 bpw", 20: "IQ2_XS - 2.3125 bpw", 21: "Q2_K - Small",
    22: "IQ3_XS - 3.3 bpw", 23: "IQ3_XXS - 3.0625 bpw", 24: "IQ1_S - 1.5625 bpw",
    25: "IQ4_NL - 4.5 bpw", 26: "IQ3_S - 3.4375 bpw", 27: "IQ3_S mix - 3.66 bpw",
    28: "IQ2_S - 2.5 bpw", 29: "IQ2_M - 2.7 bpw", 30: "IQ4_XS - 4.25 bpw",
    31: "IQ1_M - 1.75 bpw", 32: "BF16",
}


@dataclass
class ModelInfo:
    """What llama-bench reports about a model file."""

    filename: str
    arch: str
    n_bytes: int      # sum of tensor data bytes
    n_params: int     # sum of tensor elements
    ftype: str        # e.g. "Q4_K - Medium"
    size_label: str   # e.g. "0.5B", "270M"

    @property
    def desc(self) -> str:
        """llama-bench's model column / model_type: ``"{arch} {size} {ftype}"``."""
        return f"{self.arch} {self.size_label} {self.ftype}".strip()


def params_label(n: int) -> str:
    """Rounded parameter count as in model names: 494e6 -> '494M', 1.54e9 -> '1.5B'."""
    if n >= 1e9:
        v = n / 1e9
        return f"{v:.1f}B".replace(".0B", "B") if v < 10 else f"{v:.0f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def model_info(gguf_file) -> ModelInfo:
    """ModelInfo of an opened ``tp_numa.gguf_loader.GGUFFile``."""
    n_bytes = sum(t.n_bytes for t in gguf_file.tensors.values())
    n_params = sum(math.prod(t.shape) for t in gguf_file.tensors.values())
    ft = gguf_file.metadata("general.file_type")
    ftype = _FTYPE_NAMES.get(int(ft), f"ftype {ft}") if ft is not None else "unknown"
    label = gguf_file.metadata("general.size_label") or params_label(n_params)
    return ModelInfo(os.path.abspath(gguf_file.path), gguf_file.arch, n_bytes, n_params, ftype, str(label))


def decode_bytes_per_token(header) -> int:
    """Bytes of weights one decode step reads (all ranks together), from a GGUF header.

    Every weight matrix is read once per token; the token embedding only by one row,
    unless it doubles as the output matrix (tied), when it is read in full. A MoE layer's
    routed experts (``*_exps`` tensors) are read for the k chosen of E experts only:
    k / E of their bytes."""
    tensors = header.tensors
    arch = header.metadata("general.architecture", "")
    n_expert = int(header.metadata(f"{arch}.expert_count", 0) or 0)
    k = int(header.metadata(f"{arch}.expert_used_count", 0) or 0)
    total = 0
    for name, t in tensors.items():
        if name == "token_embd.weight" and "output.weight" in tensors:
            continue
        if "_exps." in name and n_expert > 0:
            total += t.n_bytes * k // n_expert
        else:
            total += t.n_bytes
    return total


def format_size(n_bytes: int) -> str:
    """llama-bench's size column."""
    if n_bytes < 1024 ** 3:
        return f"{n_bytes / 1024 ** 2:.2f} MiB"
    return f"{n_bytes / 1024 ** 3:.2f} GiB"


def format_params(n: int) -> str:
    """llama-bench's params column."""
    if n < 1e9:
        return f"{n / 1e6:.2f} M"
    return f"{n / 1e9:.2f} B"


def test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """'pp512', 'tg128', 'pp512+tg128', with ' @ d4096' when the test runs at a depth."""
    if n_prompt and n_gen:
        name = f"pp{n_prompt}+tg{n_gen}"
    elif n_prompt:
        name = f"pp{n_prompt}"
    else:
        name = f"tg{n_gen}"
    return f"{name} @ d{n_depth}" if n_depth else name


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single sample), as llama-bench."""
    if not xs:
        return 0.0, 0.0
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class TestResult:
    """One test (one row): the per-repetition wall times of its timed part."""

    model: ModelInfo
    n_threads: int
    n_ranks: int
    n_prompt: int
    n_gen: int
    n_depth: int
    samples_ns: list[int] = field(default_factory=list)
    backend: str = "CPU"
    type_kv: str = "f16"
    n_batch: int = 512
    test_time: str = ""

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns if ns > 0]

    @property
    def name(self) -> str:
        return test_name(self.n_prompt, self.n_gen, self.n_depth)

    def to_json(self) -> dict:
        """A llama-bench JSON record (plus n_ranks)."""
        avg_ns, std_ns = mean_std([float(x) for x in self.samples_ns])
        avg_ts, std_ts = mean_std(self.samples_ts)
        return {
            "build_commit": "tp_numa",
            "backends": self.backend,
            "model_filename": self.model.filename,
            "model_type": self.model.desc,
            "model_size": self.model.n_bytes,
            "model_n_params": self.model.n_params,
            "n_batch": self.n_batch,
            "n_threads": self.n_threads,
            "n_ranks": self.n_ranks,
            "type_k": self.type_kv,
            "type_v": self.type_kv,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "n_depth": self.n_depth,
            "test_time": self.test_time,
            "avg_ns": int(round(avg_ns)),
            "stddev_ns": int(round(std_ns)),
            "avg_ts": avg_ts,
            "stddev_ts": std_ts,
            "samples_ns": [int(x) for x in self.samples_ns],
            "samples_ts": self.samples_ts,
        }


def _md_table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    """A markdown table with columns padded to their widest cell; ':' marks right alignment."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def markdown_table(results: list[TestResult], show_ranks: bool) -> str:
    """llama-bench's markdown table; a ``ranks`` column before ``threads`` under mpirun."""
    header = ["model", "size", "params", "backend"] + (["ranks"] if show_ranks else []) + ["threads", "test", "t/s"]
    rows = []
    for r in results:
        ts, sd = mean_std(r.samples_ts)
        rows.append([r.model.desc, format_size(r.model.n_bytes), format_params(r.model.n_params), r.backend]
                    + ([str(r.n_ranks)] if show_ranks else [])
                    + [str(r.n_threads), r.name, f"{ts:.2f} ± {sd:.2f}"])
    right = {i for i, h in enumerate(header) if h in ("size", "params", "ranks", "threads", "test", "t/s")}
    return _md_table(header, rows, right)


def json_output(results: list[TestResult]) -> str:
    return json.dumps([r.to_json() for r in results], indent=2, ensure_ascii=False)


@dataclass
class SweepRow:
    """One llama-sweep-bench step: PP tokens prefilled and TG tokens generated at depth n_kv."""

    pp: int
    tg: int
    n_kv: int
    t_pp: float   # seconds
    t_tg: float

    @property
    def s_pp(self) -> float:
        return self.pp / self.t_pp if self.t_pp > 0 else 0.0

    @property
    def s_tg(self) -> float:
        return self.tg / self.t_tg if self.t_tg > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.t_tg / self.tg if self.tg else 0.0


SWEEP_HEADER = "|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |"
SWEEP_RULE = "|-------|--------|--------|----------|----------|----------|----------|"


def sweep_line(r: SweepRow) -> str:
    """One row in llama-sweep-bench's fixed-width format."""
    return f"| {r.pp:5d} | {r.tg:6d} | {r.n_kv:6d} | {r.t_pp:8.3f} | {r.s_pp:8.2f} | {r.t_tg:8.3f} | {r.s_tg:8.2f} |"


def sweep_table(rows: list[SweepRow]) -> str:
    return "\n".join([SWEEP_HEADER, SWEEP_RULE] + [sweep_line(r) for r in rows])
