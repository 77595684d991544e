#!/usr/bin/env python
"""Generate llama.cpp reference ("golden") data for the tp_numa tests.

Runs llama.cpp through llama-cpp-python (a separate environment; CI never needs it) on
GGUF models and writes, per model, into tests/data (formats: tests/data/README.md):

    golden_<short>.json          token ids of a text set (with/without BOS, parse_special
                                 on/off), llama.cpp's detokenized text, end-of-generation
                                 ids, a digest of every token's piece, 32-token greedy
                                 continuations of 8 raw prompts, chat-template renderings
    golden_<short>_logprobs.npz  teacher-forced text: token ids and, per position, the
                                 top-64 token ids with log-probabilities normalised over
                                 the full vocabulary (log_softmax of llama.cpp's logits)

Usage (one or more models: a tp-numa short name, or PATH, or SHORT=PATH; the short name
comes from the file name unless given):
    bash scripts/setup_reference.sh        # once: the llama.cpp reference build
    .venv/bin/python scripts/make_golden.py qwen2.5-coder-0.5b gemma3-270m
    .venv/bin/python scripts/make_golden.py qwen2.5-coder-0.5b=/path/q.gguf

Run by an interpreter without llama_cpp (such as the project's .venv), it resolves short
names there and runs itself again under the reference venv's python (found by
scripts/reference_paths.py), or under ``--lcpp-python PY`` (env LCPP_PYTHON).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np

import reference_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = "TP_NUMA_MAKE_GOLDEN_CHILD"  # set when this script runs itself under the reference python

N_THREADS = 2
SEED = 1234
N_GREEDY = 32
TOPK = 64

# (name, text) pairs: each exercises a tokenizer path. Special-token strings of both
# model families appear so that each model sees both its own and foreign ones.
TEXTS = [
    ("english", "Hello world"),
    ("english_punct", "Hello, world! How are you doing today? I'm fine, thanks."),
    ("leading_space", " leading space"),
    ("leading_spaces3", "   three leading spaces"),
    ("inner_spaces", "multiple    spaces   inside  words"),
    ("trailing_spaces", "trailing spaces   "),
    ("empty", ""),
    ("single_space", " "),
    ("newline", "\n"),
    ("lines", "line one\nline two\n\nline four\r\nwindows line\n\n\n"),
    ("python", 'def fib(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
               '        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint([fib(i) for i in range(10)])\n'),
    ("c_tabs", 'int main(void) {\n\tint x = 42;\n\t\tprintf("%d\\n", x);\n\treturn 0;\n}\n'),
    ("numbers", "3.14159 2718281828 1,000,000 0x1F 1e-9 -42 007 1234567890123"),
    ("cjk", "日本語のテキストと中文文本，还有한국어 텍스트。"),
    ("emoji", "Emoji: 😀🎉👍🏽 👨‍👩‍👧 ❤️ done"),
    ("accents", "Café naïve résumé Ærøskøbing Straße Ελληνικά Русский текст"),
    ("chatml_special", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    ("gemma_special", "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"),
    ("misc_special", "<bos><eos><pad> <|endoftext|> </s> <s> <unk> <tool_call>x</tool_call> <start_of_image> [multimodal]"),
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis " + "supercalifragilisticexpialidocious" * 6
                  + " " + "x" * 300),
    ("punct_runs", "!!!??? ... ,,,;;; --- *** ((([[[{{{}}}]]]))) @#$%^&* ~~~ ==> <=> ///"),
    ("contractions", "I'm sure you're right, it's what they've said; we'll see, he'd know. DON'T SHOUT 'S 'Ll"),
    ("url", "Visit https://example.com/path?q=1&r=2#frag or mail me@example.org today."),
    ("math", "∑_{i=1}^{n} x_i² ≈ ∫ f(x) dx, α β γ → ∞ ≤ ≥ ≠"),
    ("markdown_html", '# Title\n\n* item **bold** `code`\n<div class="a">text</div>\n'),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null, "b": true, "c": "str"}}'),
    ("mixed_ws", "a\tb\t\tc \t d\u00a0e\u3000f\u2009g \n \n  \n"),
    ("rare_chars", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x01\x1f\x7f \u200b zero\u200dwidth \ufeff bom ᚠᛇᚻ 𓀀"),
    ("spm_escape", "literal ▁ and ▁▁ marks"),
    ("prose", "The tensor-parallel engine splits every weight matrix between the sockets of a "
              "machine, so that each socket reads only half of the bytes from its own memory. "
              "Decoding one token is bound by memory bandwidth: the arithmetic is cheap, but every "
              "weight must be streamed from RAM once per token. On a two-socket server that doubles "
              "the available bandwidth, provided the two halves only meet at the all-reduces."),
    ("whitespace_combo", "a  \n  b\n\n\n   c   \n\t\n"),
]

# Raw prompts (no chat template) for greedy continuations.
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n\n# compute the mean of a list\ndef mean(xs):\n",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
    "A list of prime numbers: 2, 3, 5, 7,",
]

# Teacher-forced text: long enough for >= 300 tokens with either tokenizer.
TEACHER_TEXT = (
    "Memory bandwidth, not arithmetic, limits how fast a large language model can generate "
    "text on a CPU. For every new token the processor must read each weight of the network "
    "once, so a model of one gigabyte needs one gigabyte of traffic per token. A server with "
    "two sockets has two memory controllers, and each socket reaches its own memory faster "
    "than the memory attached to its neighbour. If one process owns all the weights, half of "
    "the reads cross the slow link between the sockets.\n\n"
    "Tensor parallelism removes that problem. Each weight matrix is cut into two halves, one "
    "per socket; the first half of the attention heads and of the feed-forward columns lives "
    "on the first node, the second half on the second. Each process multiplies its own slice "
    "and the partial results are summed with an all-reduce through shared memory.\n\n"
    "def all_reduce(parts):\n"
    "    total = parts[0].copy()\n"
    "    for p in parts[1:]:\n"
    "        total += p\n"
    "    return total\n\n"
    "The sum is exact up to rounding, so the output of the split model matches the output of "
    "the whole model. Quantized weights stay quantized: the kernels read blocks of four or "
    "six bits, unpack them in registers, and accumulate dot products in integers before "
    "scaling. That keeps the number of bytes per token as small as the file itself, which is "
    "the whole point of running a quantized model in the first place. Finally, the tokens are "
    "sampled on the first rank and broadcast to the others, and the loop starts again."
)

CHAT_MESSAGES = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about memory bandwidth."},
     {"role": "assistant", "content": "Bytes crawl through the bus"},
     {"role": "user", "content": "Another one, please."}],
]
BUILTIN_TEMPLATES = ["chatml", "gemma", "llama3", "llama2"]


def short_name_of(path: str) -> str:
    base = os.path.basename(path).lower()
    if "gemma" in base and "270m" in base:
        return "gemma3-270m"
    if "qwen2.5-coder-0.5b" in base:
        return "qwen2.5-coder-0.5b"
    return os.path.splitext(base)[0]


class Reference:
    """One llama.cpp model (vocab and context) driven through llama-cpp-python."""

    def __init__(self, path: str, n_ctx: int, vocab_only: bool = False):
        import llama_cpp
        from llama_cpp import Llama

        self.lc = llama_cpp
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=N_THREADS,
                         n_threads_batch=N_THREADS, seed=SEED, logits_all=True, verbose=False,
                         vocab_only=vocab_only)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def piece(self, tok: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.lc.llama_token_to_piece(self.vocab, tok, buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self.vocab, tok, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (self.lc.llama_token * max(len(ids), 1))(*ids)
        size = 64 + 64 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = self.lc.llama_detokenize(self.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lc.llama_detokenize(self.vocab, arr, len(ids), buf, -n, remove_special, unparse_special)
        return buf.raw[:n]

    def eog_ids(self) -> list[int]:
        return [i for i in range(self.n_vocab) if self.lc.llama_vocab_is_eog(self.vocab, i)]

    def logits_of(self, ids: list[int]) -> np.ndarray:
        """llama.cpp logits (float32 [len(ids), n_vocab]) for a fresh sequence."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt_ids: list[int], n: int):
        """Argmax decoding for n tokens (no stop at end-of-generation tokens). Returns the
        ids and, per step, the gap between the best and second-best logit."""
        self.llm.reset()
        self.llm.eval(prompt_ids)
        out, margins = [], []
        for _ in range(n):
            logits = np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            top2 = np.argpartition(-logits, 2)[:2]
            top2 = top2[np.argsort(-logits[top2], kind="stable")]
            nxt = int(np.argmax(logits))
            out.append(nxt)
            margins.append(float(logits[top2[0]] - logits[top2[1]]))
            self.llm.eval([nxt])
        return out, margins

    def chat_builtin(self, template: str | None, messages: list[dict], add_ass: bool) -> str | None:
        lc = self.lc
        msgs = (lc.llama_chat_message * len(messages))()
        keep = []
        for k, m in enumerate(messages):
            r, c = m["role"].encode(), m["content"].encode()
            keep += [r, c]
            msgs[k].role, msgs[k].content = r, c
        if template is None:
            tmpl = lc.llama_model_chat_template(self.llm.model, None)
            if not tmpl:
                return None
        else:
            tmpl = template.encode()
        size = 8192
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_chat_apply_template(tmpl, msgs, len(messages), add_ass, buf, size)
        if n < 0:
            return None
        return buf.raw[:n].decode("utf-8")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chat_entries(ref: Reference) -> list[dict]:
    """llama.cpp's built-in templates and the GGUF's Jinja template on CHAT_MESSAGES."""
    chat = []
    for messages in CHAT_MESSAGES:
        for tmpl in [None] + BUILTIN_TEMPLATES:
            for add_ass in (True, False):
                r = ref.chat_builtin(tmpl, messages, add_ass)
                if r is not None:
                    chat.append({"template": tmpl or "model", "messages": messages,
                                 "add_generation_prompt": add_ass, "text": r})
    # The GGUF's own Jinja template as llama-cpp-python renders it (transformers' rules).
    gguf_template = ref.llm.metadata.get("tokenizer.chat_template")
    if gguf_template:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos = ref.piece(ref.llm.token_bos(), True).decode("utf-8", "replace")
        eos = ref.piece(ref.llm.token_eos(), True).decode("utf-8", "replace")
        for messages in CHAT_MESSAGES:
            for add_ass in (True, False):
                fmt = Jinja2ChatFormatter(gguf_template, eos_token=eos, bos_token=bos,
                                          add_generation_prompt=add_ass)
                chat.append({"template": "jinja", "messages": messages, "add_generation_prompt": add_ass,
                             "text": fmt(messages=messages).prompt})
    return chat


def text_entries(ref: Reference) -> list[dict]:
    """Token ids of TEXTS in the four add_special x parse_special variants + detokenizations."""
    texts = []
    for name, text in TEXTS:
        entry = {"name": name, "text": text}
        for ps in (True, False):
            key = "special" if ps else "nospecial"
            entry[f"ids_{key}"] = ref.tokenize(text, add_special=True, parse_special=ps)
            entry[f"ids_{key}_raw"] = ref.tokenize(text, add_special=False, parse_special=ps)
        ids = entry["ids_special"]
        entry["detok"] = ref.detokenize(ids, remove_special=True, unparse_special=False).decode("utf-8", "replace")
        entry["detok_unparse"] = ref.detokenize(ids, remove_special=False, unparse_special=True).decode("utf-8", "replace")
        texts.append(entry)
    return texts


def piece_entries(ref: Reference, texts: list[dict]) -> tuple[str, dict]:
    """Digest of every token's piece (special=True): sha256 over (u32 LE length, bytes) for
    ids 0..n_vocab-1; and the hex pieces (special on/off) of the ids used in ``texts`` plus
    every (n_vocab/500)-th id."""
    h = hashlib.sha256()
    for i in range(ref.n_vocab):
        p = ref.piece(i, True)
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    used = {t for e in texts for k in ("ids_special", "ids_nospecial") for t in e[k]}
    sample = sorted(used | set(range(0, ref.n_vocab, max(1, ref.n_vocab // 500))))
    return h.hexdigest(), {str(i): [ref.piece(i, True).hex(), ref.piece(i, False).hex()] for i in sample}


def greedy_entries(ref: Reference, short: str) -> list[dict]:
    greedy = []
    for prompt in GREEDY_PROMPTS:
        pids = ref.tokenize(prompt, add_special=True, parse_special=True)
        ids, margins = ref.greedy(pids, N_GREEDY)
        text = ref.detokenize(ids, remove_special=True, unparse_special=False).decode("utf-8", "replace")
        greedy.append({"prompt": prompt, "prompt_ids": pids, "ids": ids, "text": text,
                       "top2_margin": [round(m, 5) for m in margins]})
        print(f"[{short}] greedy {prompt!r} -> {text!r}", file=sys.stderr)
    return greedy


def teacher_forced(ref: Reference, text: str = TEACHER_TEXT) -> dict:
    """``text``'s ids and, per position, the TOPK most probable next tokens with
    log-probabilities over the full vocabulary."""
    ids = ref.tokenize(text, add_special=True, parse_special=True)
    lp = log_softmax(ref.logits_of(ids))
    top = np.argpartition(-lp, TOPK, axis=-1)[:, :TOPK]
    order = np.argsort(-np.take_along_axis(lp, top, axis=-1), axis=-1, kind="stable")
    top = np.take_along_axis(top, order, axis=-1)
    return {"ids": np.asarray(ids, dtype=np.int32), "topk_ids": top.astype(np.int32),
            "topk_logprobs": np.take_along_axis(lp, top, axis=-1).astype(np.float32),
            "text": np.array(text)}


def make_one(short: str, path: str, out_dir: str) -> None:
    import llama_cpp

    t0 = time.time()
    ref = Reference(path, n_ctx=1024)
    print(f"[{short}] loaded {path} in {time.time() - t0:.1f}s, vocab {ref.n_vocab}", file=sys.stderr)
    texts = text_entries(ref)
    digest, pieces = piece_entries(ref, texts)
    greedy = greedy_entries(ref, short)
    chat = chat_entries(ref)
    tf = teacher_forced(ref)
    meta = {
        "format_version": 1,
        "model": short,
        "model_file": os.path.basename(path),
        "model_sha256_head": sha256_head(path),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
        "python": platform.python_version(),
        "n_threads": N_THREADS, "seed": SEED, "n_vocab": ref.n_vocab,
        "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    golden = {"meta": meta, "eog_ids": ref.eog_ids(), "texts": texts,
              "piece_digest": digest, "pieces": pieces, "greedy": greedy, "chat": chat}
    del ref  # frees llama.cpp's model and context
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"golden_{short}.json"), golden)
    np.savez_compressed(os.path.join(out_dir, f"golden_{short}_logprobs.npz"),
                        meta=np.array(json.dumps(meta)), **tf)
    print(f"[{short}] done in {time.time() - t0:.1f}s: {len(texts)} texts, {len(greedy)} prompts, "
          f"{len(tf['ids'])} teacher-forced positions", file=sys.stderr)


def write_json(name: str, data: dict) -> None:
    with open(name, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")


def update_chat(short: str, path: str, out_dir: str) -> None:
    """Recompute only the ``chat`` entries of an existing golden file (vocabulary only)."""
    name = os.path.join(out_dir, f"golden_{short}.json")
    with open(name, encoding="utf-8") as f:
        golden = json.load(f)
    golden["chat"] = chat_entries(Reference(path, n_ctx=512, vocab_only=True))
    write_json(name, golden)
    print(f"[{short}] chat entries: {len(golden['chat'])}", file=sys.stderr)


def self_check(short: str, path: str, out_dir: str) -> None:
    """Noise floor of the teacher-forced data: llama.cpp evaluating the same ids one token
    at a time (its decode path) against the stored batch (prefill path) log-probabilities.
    Prints mean KL and top-1 agreement; writes nothing."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from golden import kl_and_top1

    with np.load(os.path.join(out_dir, f"golden_{short}_logprobs.npz")) as z:
        ids, top_ids, top_lp = z["ids"].tolist(), z["topk_ids"], z["topk_logprobs"]
    ref = Reference(path, n_ctx=1024)
    ref.llm.reset()
    rows = []
    for t in ids:
        ref.llm.eval([t])
        rows.append(np.array(ref.llm.scores[ref.llm.n_tokens - 1], dtype=np.float32))
    kl, top1 = kl_and_top1(top_ids, top_lp, np.stack(rows))
    print(f"[{short}] llama.cpp token-by-token vs stored batch: mean KL {kl:.5f} nats, "
          f"top-1 agreement {top1:.4f} over {len(ids)} positions")


def sha256_head(path: str, n: int = 1 << 20) -> str:
    """SHA-256 of the first MiB (identifies the file without hashing all of it)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def resolve_spec(spec: str) -> str:
    """'qwen2.5-coder-0.5b' (a tp-numa short name, not a file) -> 'qwen2.5-coder-0.5b=PATH'
    through tp_numa.model_registry (installs/joins the model on first use); anything else
    is returned unchanged."""
    if "=" in spec or os.path.isfile(spec):
        return spec
    sys.path.insert(0, REPO)
    try:
        from tp_numa import model_registry
    except ImportError:
        return spec
    finally:
        sys.path.remove(REPO)
    if not model_registry.is_short_name(spec):
        return spec
    return f"{spec}={model_registry.resolve(spec)}"


def reexec_under_reference(args, specs: list[str]) -> int:
    """Run this script again, with the resolved model specs, under the python that has
    llama_cpp (--lcpp-python, else the reference venv of scripts/setup_reference.sh)."""
    py = args.lcpp_python or reference_paths.python()
    argv = [py, os.path.abspath(__file__), *specs, "--out", args.out]
    argv += ["--chat-only"] if args.chat_only else []
    argv += ["--self-check"] if args.self_check else []
    print(f"make_golden: running under {py}", file=sys.stderr, flush=True)
    import subprocess

    return subprocess.call(argv, env=dict(os.environ, **{CHILD_ENV: "1"}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="SHORT_NAME, PATH.gguf or SHORT=PATH.gguf")
    ap.add_argument("--chat-only", action="store_true",
                    help="only recompute the chat-template entries of existing files (fast)")
    ap.add_argument("--self-check", action="store_true",
                    help="print llama.cpp's own token-by-token vs batch agreement on the stored data")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data"))
    ap.add_argument("--lcpp-python", default=os.environ.get("LCPP_PYTHON"),
                    help="python with llama_cpp to run under (env LCPP_PYTHON; default: this one if it "
                         "has llama_cpp, else the venv of scripts/setup_reference.sh)")
    args = ap.parse_args(argv)
    args.models = [resolve_spec(s) for s in args.models]
    for spec in args.models:
        if not os.path.isfile(spec.rpartition("=")[2]):
            print(f"make_golden: {spec.rpartition('=')[2]}: no such file", file=sys.stderr)
            return 2
    if not os.environ.get(CHILD_ENV) and (args.lcpp_python or importlib.util.find_spec("llama_cpp") is None):
        return reexec_under_reference(args, args.models)
    for spec in args.models:
        short, _, path = spec.rpartition("=")
        fn = update_chat if args.chat_only else self_check if args.self_check else make_one
        fn(short or short_name_of(path), path, os.path.normpath(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
