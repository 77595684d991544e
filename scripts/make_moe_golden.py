#!/usr/bin/env python
"""llama.cpp golden data for the mixture-of-experts models derived from the shipped
Qwen2.5-Coder-0.5B by scripts/make_moe_from_dense.py (tests/test_moe_golden.py reads it).

    bash scripts/setup_reference.sh                      # once: the llama.cpp reference
    .venv/bin/python scripts/make_moe_golden.py          # every model of DERIVED
    .venv/bin/python scripts/make_moe_golden.py qwen2moe-from-qwen2.5-coder-0.5b

Per derived model SHORT it writes into tests/data (formats: tests/data/README.md), with
make_golden.py's own functions and settings (2 threads, seed 1234, n_ctx 1024, flash
attention off):

    golden_SHORT.json           meta, eog_ids, the 8 greedy prompts x 32 tokens with top-2
                                margins, ``derived`` (how to rebuild the GGUF: script, source
                                model, arch, seed, its SHA-256) and ``self_check``: llama.cpp
                                against its own batch data along two other numerical
                                paths, the ids one token at a time and one batch with
                                flash attention on (mean KL, top-1, top-1 where its batch
                                favourite leads by > 0.3 nats)
    golden_SHORT_logprobs.npz   teacher-forced passage (MOE_TEACHER_TEXT, ~900 positions):
                                ids, top-64 ids and log-probs

The tokenizer entries of make_golden.py (texts, pieces, chat) are left out: the derived
files carry the source's tokenizer and template byte for byte (make_moe_from_dense.py
checks it), whose golden data already has them. The GGUF itself is not stored: the test
rebuilds it and checks the SHA-256.

The derivation runs here (it needs tp_numa's header reader); the llama.cpp part runs this
script again under the reference venv's python (scripts/reference_paths.py), or under
``--lcpp-python PY`` (env LCPP_PYTHON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_golden  # noqa: E402
import reference_paths  # noqa: E402

SOURCE = "qwen2.5-coder-0.5b"
# short name -> (--arch of make_moe_from_dense.py, --seed)
DERIVED = {
    "qwen2moe-from-qwen2.5-coder-0.5b": ("qwen2moe", 0),
    "mixtral-from-qwen2.5-coder-0.5b": ("llama", 0),
}
# Teacher-forced passage: make_golden's TEACHER_TEXT (303 positions with the Qwen tokenizer)
# and a continuation to ~900 positions. At 303 positions one position is 0.33 points of
# top-1, and these near-tie-rich models move by 4-5 positions (1.5 points) with last-bit
# changes of summation order alone; three times the positions make the top-1 bound
# (llama.cpp's own agreement - 1 point) measure fidelity rather than that noise.
MOE_TEACHER_TEXT = make_golden.TEACHER_TEXT + (
    "\n\nA mixture-of-experts layer replaces the single feed-forward network with many "
    "smaller ones. A router scores every expert for the current token, keeps the best few, "
    "and mixes their outputs with weights taken from the same scores. Only the chosen "
    "experts are read, so a model with one hundred billion parameters may touch only ten "
    "billion of them for each token, and the speed of generation follows the active bytes "
    "rather than the size of the file.\n\n"
    "def route(scores, k):\n"
    "    order = sorted(range(len(scores)), key=lambda e: -scores[e])\n"
    "    chosen = order[:k]\n"
    "    total = sum(scores[e] for e in chosen)\n"
    "    return [(e, scores[e] / total) for e in chosen]\n\n"
    "On a machine with two sockets every expert is cut in two, like any other matrix: the "
    "first half of its rows on the first node, the second half on the second. Whichever "
    "experts the router picks, both sockets work on them at once, each reading its own "
    "memory, and one all-reduce per layer adds the halves together. Giving whole experts to "
    "each socket looks simpler, but the router does not spread its choices evenly, and one "
    "socket would often wait for the other.\n\n"
    "Serving many users at once changes the arithmetic again. When eight conversations decode "
    "together, each weight block is read from memory once and multiplied with eight "
    "activation rows while it sits in the cache, so the cost per token falls almost eight "
    "times until the processor, not the memory, becomes the limit. The scheduler admits new "
    "requests at every step, splits long prompts into chunks so that running conversations "
    "keep their pace, and reuses the cached keys and values of a prompt that starts like an "
    "earlier one.\n\n"
    "class Scheduler:\n"
    "    def __init__(self, slots):\n"
    "        self.free = list(range(slots))\n"
    "        self.running = {}\n\n"
    "    def admit(self, request):\n"
    "        if not self.free:\n"
    "            return False\n"
    "        self.running[request.id] = self.free.pop()\n"
    "        return True\n\n"
    "    def retire(self, request):\n"
    "        self.free.append(self.running.pop(request.id))\n\n"
    "A request must give the same answer whether it runs alone or beside seven others. That "
    "sounds obvious, yet it is easy to break: a kernel that adds its partial sums in a "
    "different order when it processes four rows instead of one changes the last bit of the "
    "result, and a last bit can decide between two words that the model finds almost equally "
    "likely. The fix is to make every row follow exactly the same sequence of operations, "
    "whatever else shares the call. Then the temperature zero output of a request depends "
    "only on its prompt, which is what people who test their prompts expect to see."
)
CONFIDENT_GAP = 0.3     # nats between llama.cpp's top-1 and top-2 (as tests/test_models_golden.py)
FORMAT_VERSION = 1


def derive_all(names: list[str], work: str) -> list[dict]:
    """Build each derived GGUF in ``work`` (project venv); returns the manifest entries."""
    sys.path.insert(0, REPO)
    import make_moe_from_dense as mmd
    from tp_numa import model_registry

    src = str(model_registry.resolve(SOURCE))
    out = []
    for name in names:
        arch, seed = DERIVED[name]
        path = os.path.join(work, f"{name}.gguf")
        sha = mmd.derive(src, path, arch, seed, log=lambda m: print(m, file=sys.stderr, flush=True))
        out.append({"short": name, "path": path,
                    "derived": {"script": "scripts/make_moe_from_dense.py", "source": SOURCE,
                                "source_sha256_head": make_golden.sha256_head(src), "arch": arch, "seed": seed,
                                "sha256": sha, "bytes": os.path.getsize(path)}})
    return out


def _agreement(tf: dict, logits: np.ndarray) -> dict:
    """Mean KL, top-1 and confident-position top-1 of ``logits`` against the batch data."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from golden import kl_and_top1

    kl, top1 = kl_and_top1(tf["topk_ids"], tf["topk_logprobs"], logits)
    gap = tf["topk_logprobs"][:, 0] - tf["topk_logprobs"][:, 1]
    confident = gap > CONFIDENT_GAP
    agree = logits.argmax(-1) == tf["topk_ids"][:, 0]
    return {"mean_kl": round(kl, 6), "top1": round(top1, 6), "positions": len(logits),
            "confident_positions": int(confident.sum()),
            "confident_top1": round(float(agree[confident].mean()), 6)}


def self_check(ref, path: str, tf: dict) -> dict:
    """llama.cpp against its own batch log-probs ``tf`` along two other numerical paths:
    ``one_token`` (the same ids evaluated one at a time: its decode kernels) and
    ``flash_attn`` (one batch with flash attention on). Both differ from the batch only by
    rounding, so their agreement is the noise floor of any comparison with the data."""
    ref.llm.reset()
    rows = []
    for t in tf["ids"].tolist():
        ref.llm.eval([t])
        rows.append(np.array(ref.llm.scores[ref.llm.n_tokens - 1], dtype=np.float32))
    out = {"one_token": _agreement(tf, np.stack(rows))}
    from llama_cpp import Llama

    fa = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=make_golden.N_THREADS,
               n_threads_batch=make_golden.N_THREADS, seed=make_golden.SEED, logits_all=True, verbose=False,
               flash_attn=True)
    fa.eval(tf["ids"].tolist())
    out["flash_attn"] = _agreement(tf, np.array(fa.scores[: len(tf["ids"])], dtype=np.float32))
    del fa
    return out


def golden_one(entry: dict, out_dir: str) -> None:
    """Greedy, teacher-forced and self-check data of one derived file (reference venv)."""
    import llama_cpp

    short, path = entry["short"], entry["path"]
    t0 = time.time()
    ref = make_golden.Reference(path, n_ctx=1024)
    greedy = make_golden.greedy_entries(ref, short)
    tf = make_golden.teacher_forced(ref, MOE_TEACHER_TEXT)
    check = self_check(ref, path, tf)
    print(f"[{short}] llama.cpp against its own batch: {check}", file=sys.stderr, flush=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": short,
        "model_file": os.path.basename(path),
        "model_sha256_head": make_golden.sha256_head(path),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
        "python": platform.python_version(),
        "n_threads": make_golden.N_THREADS, "seed": make_golden.SEED, "n_vocab": ref.n_vocab,
        "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    golden = {"meta": meta, "derived": entry["derived"], "self_check": check, "eog_ids": ref.eog_ids(),
              "greedy": greedy}
    del ref
    os.makedirs(out_dir, exist_ok=True)
    make_golden.write_json(os.path.join(out_dir, f"golden_{short}.json"), golden)
    np.savez_compressed(os.path.join(out_dir, f"golden_{short}_logprobs.npz"), meta=np.array(json.dumps(meta)),
                        **tf)
    print(f"[{short}] done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help=f"short names (default all: {', '.join(DERIVED)})")
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "data"))
    ap.add_argument("--keep", metavar="DIR", help="build the GGUFs in DIR and keep them (default: a temporary "
                                                  "folder, removed at the end)")
    ap.add_argument("--lcpp-python", default=os.environ.get("LCPP_PYTHON"),
                    help="python with llama_cpp (default: the venv of scripts/setup_reference.sh)")
    ap.add_argument("--child", metavar="MANIFEST", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:                                   # under the reference python
        with open(args.child, encoding="utf-8") as f:
            for entry in json.load(f):
                golden_one(entry, os.path.normpath(args.out))
        return 0
    names = args.models or list(DERIVED)
    unknown = [n for n in names if n not in DERIVED]
    if unknown:
        print(f"make_moe_golden: unknown model(s) {', '.join(unknown)} (known: {', '.join(DERIVED)})",
              file=sys.stderr)
        return 2
    py = args.lcpp_python or reference_paths.python()
    work = args.keep or tempfile.mkdtemp(prefix="moe_golden_")
    os.makedirs(work, exist_ok=True)
    try:
        manifest = os.path.join(work, "manifest.json")
        with open(manifest, "w", encoding="utf-8") as f:
            json.dump(derive_all(names, work), f)
        print(f"make_moe_golden: running llama.cpp under {py}", file=sys.stderr, flush=True)
        return subprocess.call([py, os.path.abspath(__file__), "--child", manifest, "--out", args.out])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
