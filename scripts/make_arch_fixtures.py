#!/usr/bin/env python3
"""Small random GGUF fixtures of every architecture tp_numa supports, written and
evaluated by llama.cpp itself, for tests/test_arch_fixtures.py.

Why: the two shipped models cover one file each of qwen2 and gemma3. llama.cpp's own
test program ``test-llama-archs`` writes a tiny random model of ANY architecture with the
metadata keys and tensor names llama.cpp's saver produces (2 layers, d_model 256, vocab
128, every optional tensor its loader accepts: biases, rope_freqs, output.bias, ...), so
each architecture tp_numa claims is checked against llama.cpp's forward on the same file,
without a real checkpoint. The test then runs in CI without llama.cpp.

For every entry of FIXTURES this script

1. runs ``test-llama-archs -a '^ARCH$' -s SEED -d STDEV -o DIR`` (the reference build of
   scripts/setup_reference.sh), which writes ``ARCH-dense.gguf`` / ``ARCH-moe.gguf``
   (float32, 4-8 MB);
2. rewrites it with gguf-py: drops the NVFP4 per-tensor scales (DROP_SUFFIXES) and
   conditions a few random values (Edit: COMMON_EDITS, GEMMA3_EDITS; reasons there);
3. requantizes it with ``llama-quantize --pure`` to QUANT (Q4_0: 0.6-1.2 MB per fixture,
   small enough to commit; the quantized weights are what both sides read);
4. evaluates it with llama-cpp-python (reference venv, ``logits_all=True``, 2 threads,
   float32 KV cache, no flash attention) on N_SEQS fixed random sequences of SEQ_LEN token
   ids (the vocabulary is a bare test one), teacher-forced from position 0: once as one
   batch, and once one token at a time, which gives llama.cpp's own batch-vs-one-token
   agreement (its noise floor);
5. stores in tests/data/arch_fixtures/: ``NAME.gguf`` and ``NAME.npz`` with ``ids`` (int32
   [N_SEQS, SEQ_LEN]), ``logprobs`` (float32 [N_SEQS, SEQ_LEN, V], log_softmax of the
   batch logits over the full vocabulary: [s, t] predicts the token after ids[s, t]) and
   ``meta`` (JSON: commands, seed, stdev, dropped and edited tensors, versions, sha256 of
   the GGUF, ``self_kl`` / ``self_top1`` = llama.cpp's one-token path against its batch
   path).

Usage (in the project's .venv, which has gguf-py; the llama.cpp parts run under the
reference venv):
    bash scripts/setup_reference.sh
    .venv/bin/python scripts/make_arch_fixtures.py                 # all fixtures
    .venv/bin/python scripts/make_arch_fixtures.py qwen3 olmoe     # some
    .venv/bin/python scripts/make_arch_fixtures.py --out SCRATCH_DIR --drop attn_output.bias llama
                                                  # diagnosis: which tensor makes a difference

Adding an architecture: one line in FIXTURES (name, llama.cpp arch, dense or MoE file);
the test picks it up from the files. Runs are deterministic for one llama.cpp version
(a few seconds per fixture on 2 cores).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

import reference_paths

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT_DIR = os.path.join(REPO, "tests", "data", "arch_fixtures")

SEED = 42           # test-llama-archs weights and the token ids
STDEV = 0.5         # weight init stdev (test-llama-archs' default 0.1 gives near-uniform logits)
QUANT = "Q4_0"
N_SEQS = 6          # independent sequences, each from position 0 ...
SEQ_LEN = 64        # ... of this many tokens (fixture context_length is 256; gemma3's window is 32)
N_THREADS = 2
# KV cache in float32 on both sides (the test uses setup_cache(float32)). With llama.cpp's
# default f16 cache, its non-flash attention also rounds q and the softmax weights to f16
# (the f16 x f32 matmuls convert their f32 side): on these random weights that alone moves
# its log-probs by KL 0.001-0.005 from a float64 evaluation of the same file (which
# tp_numa matches to KL 1e-9 on the first 40 positions of the qwen3 fixture) and changes
# 1.5-4% of the top-1 choices, hiding the architecture differences this test is for. The
# f16 path is covered by the real-model golden tests.
GGML_TYPE_F32 = 0
FORMAT_VERSION = 1


# test-llama-archs gives every matmul the optional per-tensor scales llama.cpp multiplies
# in for NVFP4 checkpoints (`<weight>.scale`, `<weight>.input_scale`, random values here).
# No type tp_numa loads comes with them, and keeping them would fail every architecture for
# that one reason, so they are dropped (see --keep-all); every other optional tensor
# llama.cpp writes (biases, rope_freqs, output.bias, ...) stays in the fixture.
DROP_SUFFIXES = (".scale", ".input_scale")


@dataclass(frozen=True)
class Edit:
    """New float32 values for the tensors whose names end in ``suffix``: ``scale * x``, or
    ``1 + |x|`` with ``abs_plus_one``. Names, shapes and metadata stay llama.cpp's; only
    random values that make a poorly conditioned test are changed."""
    suffix: str
    scale: float = 1.0
    abs_plus_one: bool = False

    def __call__(self, x):
        return 1.0 + np.abs(x) if self.abs_plus_one else x * self.scale

    def __str__(self) -> str:
        return f"{self.suffix}: " + ("1 + |x|" if self.abs_plus_one else f"x * {self.scale:g}")


# rope_freqs.weight, llama's optional frequency factors (they divide the rotary
# frequencies), is random N(0, stdev) as written, so some factors are near 0 and the angles
# huge, where two float32 cos/sin implementations disagree; real factors are >= 1.
COMMON_EDITS = (Edit("rope_freqs.weight", abs_plus_one=True),)
# gemma3 scales the embedding by sqrt(n_embd) = 16 and normalizes each block's output
# (post_attention_norm, post_ffw_norm) with random weights of stdev 0.5, so the blocks add
# little to the residual stream and the logits barely depend on attention (ignoring the
# sliding window moved them by KL 0.002, top-1 0.979 only). x3 makes them count (the same
# bug: KL 0.02, top-1 0.95; rope style swapped: top-1 0.94) without amplifying float32
# rounding differences (from x4 on, tp_numa and llama.cpp disagreed on ~2% of the top-1).
GEMMA3_EDITS = (Edit("post_attention_norm.weight", scale=3.0), Edit("post_ffw_norm.weight", scale=3.0))


@dataclass(frozen=True)
class Fixture:
    name: str       # file stem in tests/data/arch_fixtures
    arch: str       # llama.cpp architecture (general.architecture)
    moe: bool       # test-llama-archs' MoE variant (ARCH-moe.gguf) instead of ARCH-dense.gguf
    note: str = ""
    drop: tuple[str, ...] = DROP_SUFFIXES   # tensor-name suffixes removed before quantizing
    edits: tuple[Edit, ...] = COMMON_EDITS   # value changes before quantizing


# Every architecture tp_numa supports or is adding; extend here.
FIXTURES = [
    Fixture("llama", "llama", False),
    Fixture("qwen2", "qwen2", False),
    Fixture("qwen3", "qwen3", False, "1 KV head (MQA), q/k norms"),
    Fixture("gemma3", "gemma3", False, "sliding window 32 on layer 0, final logit softcap 30",
            edits=COMMON_EDITS + GEMMA3_EDITS),
    Fixture("llama-moe", "llama", True, "Mixtral-style: llama with routed experts"),
    Fixture("qwen2moe", "qwen2moe", True, "routed experts + gated shared expert"),
    Fixture("qwen3moe", "qwen3moe", True),
    Fixture("olmoe", "olmoe", True),
]


def log(msg: str) -> None:
    print(f"make_arch_fixtures: {msg}", file=sys.stderr, flush=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shown(argv: list[str], tmp: str) -> list[str]:
    """argv with this machine's paths replaced by placeholders (for the stored meta)."""
    ref = str(reference_paths.reference_dir())
    return [a.replace(ref, "$TP_NUMA_REFERENCE_DIR").replace(tmp, "$TMP") for a in argv]


def rewrite_gguf(src: str, dst: str, drop: tuple[str, ...], edits: tuple[Edit, ...]) -> tuple[list[str], list[str]]:
    """Copy the GGUF src to dst without the tensors whose names end in one of ``drop``
    and with the matching ``edits`` applied to float32 tensors; returns (dropped names,
    edited names). Metadata is copied as is, except empty arrays (such as
    tokenizer.ggml.merges of the test vocabulary), which gguf-py cannot write and llama.cpp
    reads as absent. Uses gguf-py (the project's .venv)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        if kind == gguf.GGUFValueType.ARRAY and not field.data:
            continue
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    keep = [t for t in reader.tensors if not (drop and t.name.endswith(drop))]
    data, edited = {}, []
    for t in keep:
        arr = t.data
        for e in edits:
            if t.name.endswith(e.suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise SystemExit(f"make_arch_fixtures: cannot edit {t.name} of type {t.tensor_type.name}")
                arr = np.ascontiguousarray(e(np.array(arr, dtype=np.float32)), dtype=np.float32)
                edited.append(t.name)
        data[t.name] = arr
        writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in keep:
        writer.write_tensor_data(data[t.name], tensor_endianess=reader.endianess)
    writer.close()
    return sorted(t.name for t in reader.tensors if drop and t.name.endswith(drop)), sorted(edited)


def run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"make_arch_fixtures: {' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


# ---------------------------------------------------------------- llama.cpp side (reference venv)


def evaluate(gguf_path: str, npz_path: str, meta_json: str) -> None:
    """Teacher-forced llama.cpp log-probs of the fixture on N_SEQS random sequences, each
    evaluated from position 0 as one batch and one token at a time."""
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=256, n_batch=512, n_ubatch=512, n_threads=N_THREADS,
                n_threads_batch=N_THREADS, seed=SEED, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
    n_vocab = llm.n_vocab()
    rng = random.Random(SEED)
    ids = [[rng.randrange(n_vocab) for _ in range(SEQ_LEN)] for _ in range(N_SEQS)]

    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    batch, single = [], []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        batch.append(log_softmax(np.array(llm.scores[:SEQ_LEN], dtype=np.float32)))
        llm.reset()
        rows = []
        for t in seq:
            llm.eval([t])
            rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        single.append(log_softmax(np.stack(rows)))
    batch, single = np.stack(batch), np.stack(single)           # (N_SEQS, SEQ_LEN, V)
    kl = float(np.mean((np.exp(batch) * (batch - single)).sum(axis=-1)))
    top1 = float(np.mean(batch.argmax(-1) == single.argmax(-1)))
    top2 = np.sort(batch, axis=-1)[..., -2:]
    meta = json.loads(meta_json)
    meta.update({
        "n_vocab": n_vocab, "n_seqs": N_SEQS, "seq_len": SEQ_LEN, "n_threads": N_THREADS, "kv_cache": "f32",
        "flash_attn": False, "self_kl": round(kl, 7), "self_top1": round(top1, 4),
        "mean_top1_prob": round(float(np.exp(batch.max(-1)).mean()), 4),
        "median_top2_gap": round(float(np.median(top2[..., 1] - top2[..., 0])), 4),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
        "python": platform.python_version(),
    })
    np.savez_compressed(npz_path, ids=np.asarray(ids, dtype=np.int32), logprobs=batch.astype(np.float32),
                        meta=np.array(json.dumps(meta)))
    print(json.dumps({"self_kl": kl, "self_top1": top1, "mean_top1_prob": meta["mean_top1_prob"]}))


# ---------------------------------------------------------------- driver


def make_one(fx: Fixture, out_dir: str, py: str, *, stdev: float = STDEV, keep_float: bool = False,
             keep_all: bool = False, extra_drop: tuple[str, ...] = ()) -> dict:
    """Writes tests/data/arch_fixtures/NAME.gguf and NAME.npz for one fixture; returns
    llama.cpp's self-agreement and the file sizes."""
    archs, quantize = reference_paths.binary("test-llama-archs"), reference_paths.binary("llama-quantize")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="arch_fixture_") as tmp:
        gen = [archs, "-a", f"^{fx.arch}$", "-s", str(SEED), "-d", str(stdev), "-o", tmp]
        run(gen)
        raw = os.path.join(tmp, f"{fx.arch}-{'moe' if fx.moe else 'dense'}.gguf")
        if not os.path.exists(raw):
            made = ", ".join(sorted(os.listdir(tmp))) or "nothing"
            raise SystemExit(f"make_arch_fixtures: test-llama-archs wrote {made}, not {os.path.basename(raw)} "
                             f"(is '{fx.arch}' {'MoE' if fx.moe else 'dense'} supported by this llama.cpp?)")
        commands = [_shown(gen, tmp)]
        drop = (() if keep_all else fx.drop) + tuple(extra_drop)
        rewritten = os.path.join(tmp, "rewritten.gguf")
        dropped, edited = rewrite_gguf(raw, rewritten, drop, fx.edits)
        raw = rewritten
        commands.append(["drop tensors ending in", *drop] if drop else ["drop no tensors"])
        commands.append(["edit values", *map(str, fx.edits)])
        final = os.path.join(tmp, f"{fx.name}.gguf")
        if keep_float:
            shutil.copyfile(raw, final)
        else:
            quant = [quantize, "--pure", raw, final, QUANT]
            run(quant)
            commands.append(_shown(quant, tmp))
        os.makedirs(out_dir, exist_ok=True)
        dest = os.path.join(out_dir, f"{fx.name}.gguf")
        shutil.copyfile(final, dest)
    meta = {"format_version": FORMAT_VERSION, "name": fx.name, "arch": fx.arch, "moe": fx.moe, "note": fx.note,
            "seed": SEED, "stdev": stdev, "weights": "F32 (test-llama-archs)" if keep_float else QUANT,
            "commands": commands, "dropped_tensors": dropped, "edited_tensors": edited,
            "gguf_sha256": sha256(dest), "gguf_bytes": os.path.getsize(dest),
            "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    npz = os.path.join(out_dir, f"{fx.name}.npz")
    out = subprocess.run([py, os.path.abspath(__file__), "--evaluate", dest, npz, json.dumps(meta)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"make_arch_fixtures: llama.cpp could not evaluate {dest}:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(gguf_kib=os.path.getsize(dest) / 1024, npz_kib=os.path.getsize(npz) / 1024, secs=time.time() - t0)
    log(f"{fx.name}: {res['gguf_kib']:.0f} KiB gguf, {res['npz_kib']:.0f} KiB npz; llama.cpp one-token vs batch: "
        f"KL {res['self_kl']:.5f}, top-1 {res['self_top1']:.3f} (mean top-1 p {res['mean_top1_prob']:.2f}) "
        f"[{res['secs']:.1f}s]")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"fixtures to make (default all: {', '.join(f.name for f in FIXTURES)})")
    ap.add_argument("--out", default=OUT_DIR, help="output folder (default tests/data/arch_fixtures)")
    ap.add_argument("--lcpp-python", default=os.environ.get("LCPP_PYTHON"),
                    help="python with llama_cpp (env LCPP_PYTHON; default: the venv of scripts/setup_reference.sh)")
    ap.add_argument("--keep-float", action="store_true",
                    help="store test-llama-archs' float weights instead of requantizing (large files)")
    ap.add_argument("--stdev", type=float, default=STDEV, help=f"weight init stdev (default {STDEV})")
    ap.add_argument("--keep-all", action="store_true",
                    help=f"keep the tensors ending in {', '.join(DROP_SUFFIXES)} (dropped by default)")
    ap.add_argument("--drop", action="append", default=[], metavar="SUFFIX",
                    help="also drop the tensors whose names end in SUFFIX (repeatable; for diagnosis: "
                         "which tensor makes a difference)")
    ap.add_argument("--evaluate", nargs=3, metavar=("GGUF", "NPZ", "META"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.evaluate:
        evaluate(*args.evaluate)
        return 0
    by_name = {f.name: f for f in FIXTURES}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        raise SystemExit(f"make_arch_fixtures: unknown fixture(s) {', '.join(unknown)} "
                         f"(known: {', '.join(by_name)})")
    py = args.lcpp_python or reference_paths.python()
    for name in args.names or list(by_name):
        make_one(by_name[name], args.out, py, stdev=args.stdev, keep_float=args.keep_float, keep_all=args.keep_all,
                 extra_drop=tuple(args.drop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
