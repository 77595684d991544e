#!/usr/bin/env python3
"""`tp-numa serve` against llama.cpp's llama-server: aggregate decode rate with 1..8
concurrent streams and time to first token, same GGUF, threads, slots and load generator.

    bash scripts/setup_reference.sh                 # once: the llama.cpp reference build
    .venv/bin/python scripts/bench_serve.py [--model qwen2.5-coder-0.5b] [-t 2] [-r 3]

Both servers run side by side (each idle while the other is measured: tp-numa's followers
sleep between polls, llama-server waits on its queue), with ``--parallel`` slots of
``--ctx`` positions each (llama-server: ``-np P -c P*ctx``), f16 KV cache, temperature 0.
The load generator is one thread per stream, streaming ``/v1/completions`` with
``ignore_eos`` so every request makes exactly ``--tokens`` tokens; each prompt starts with
a unique tag so neither server can reuse a cached prefix.

Per wave of S simultaneous requests:
  decode t/s   = sum over requests of (tokens - 1) / (last token of any - first token of any)
  TTFT         = first token - submission, per request (median)
The waves run in interleaved rounds (each stream count, the two servers in alternating
order), and the table shows medians over ``--rounds``.

Goals (the server issue): tp-numa at 8 streams >= 4x tp-numa at 1 stream, >= 1.5x
llama-server at 8 streams; TTFT at 4 concurrent requests <= llama-server's.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import httpx  # noqa: E402

import reference_paths  # noqa: E402

PROMPT_BODY = ("Write a short, well commented Python module that parses a CSV file of "
               "sensor readings, removes outliers with a rolling median filter, and prints "
               "the mean, the minimum and the maximum of every column. ")


def log(msg: str) -> None:
    print(f"bench_serve: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1 and its base URL; ``wait`` polls /health."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: str):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench_serve: {self.name} exited with {self.proc.returncode} "
                                 f"(log: {self.log.name})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"bench_serve: {self.name} not healthy after {timeout:.0f} s (log: {self.log.name})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def one_stream(url: str, prompt: str, tokens: int, out: list, i: int, start: threading.Barrier) -> None:
    """POST a streaming completion; out[i] = (t_submit, t_first, t_last, n_tokens)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "cache_prompt": False}
    start.wait()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if chunk["choices"][0].get("finish_reason") and not chunk["choices"][0].get("text"):
                last = last or now
                continue
            n += 1
            first = first or now
            last = now
    out[i] = (t0, first, last, n)


def wave(server: Server, streams: int, tokens: int, tag: str, prompt_repeat: int) -> dict:
    """S simultaneous streams -> decode t/s over the wave, median TTFT, tokens seen."""
    out: list = [None] * streams
    start = threading.Barrier(streams)
    threads = [threading.Thread(target=one_stream,
                                args=(server.url, f"[{tag}-{i}] " + PROMPT_BODY * prompt_repeat, tokens, out, i,
                                      start))
               for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = [o[1] for o in out]
    lasts = [o[2] for o in out]
    ns = [o[3] for o in out]
    return {"decode_tps": sum(n - 1 for n in ns) / (max(lasts) - min(firsts)),
            "ttft": statistics.median(o[1] - o[0] for o in out), "tokens": ns}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b", help="GGUF path or short name")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-np", "--parallel", type=int, default=8, help="slots of both servers")
    ap.add_argument("--ctx", type=int, default=512, help="positions per slot")
    ap.add_argument("--streams", default="1,2,4,8", help="concurrent streams per wave")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request (decode waves)")
    ap.add_argument("--ttft-streams", type=int, default=4)
    ap.add_argument("--ttft-repeat", type=int, default=6, help="prompt body repeats of the TTFT requests "
                                                              "(6: about 200 tokens)")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="write the raw results here")
    args = ap.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    if max(streams + [args.ttft_streams]) > args.parallel:
        ap.error("--streams and --ttft-streams must not exceed --parallel")

    from tp_numa import model_registry

    model = str(model_registry.resolve(args.model)) if not os.path.exists(args.model) else args.model
    logs = os.path.join(REPO, "build", "bench_serve")
    os.makedirs(logs, exist_ok=True)
    tp_port, ll_port = free_port(), free_port()
    servers = {
        "tp-numa": Server("tp-numa", [os.path.join(os.path.dirname(sys.executable), "tp-numa"), "serve", "-m", model,
                                      "-t", str(args.threads), "-np", str(args.parallel), "-c", str(args.ctx),
                                      "--port", str(tp_port), "-q"], tp_port, os.path.join(logs, "tp-numa.log")),
        "llama-server": Server("llama-server", [reference_paths.binary("llama-server"), "-m", model,
                                                "-t", str(args.threads), "-tb", str(args.threads),
                                                "-np", str(args.parallel), "-c", str(args.parallel * args.ctx),
                                                "-ctk", "f16", "-ctv", "f16", "--host", "127.0.0.1",
                                                "--port", str(ll_port)], ll_port,
                               os.path.join(logs, "llama-server.log")),
    }
    results: dict = {name: {"decode": {s: [] for s in streams}, "ttft": []} for name in servers}
    try:
        for s in servers.values():
            s.wait()
        log(f"both servers up ({model}, {args.threads} threads, {args.parallel} slots x {args.ctx}); warm-up")
        for s in servers.values():
            wave(s, 2, 8, "warmup", 1)
        names = list(servers)
        for r in range(args.rounds):
            for k, S in enumerate(streams):
                order = names if (r + k) % 2 == 0 else names[::-1]
                for name in order:
                    w = wave(servers[name], S, args.tokens, f"r{r}s{S}", 1)
                    bad = [n for n in w["tokens"] if n != args.tokens]
                    if bad:
                        log(f"warning: {name} gave {bad} tokens instead of {args.tokens}")
                    results[name]["decode"][S].append(w["decode_tps"])
                    log(f"round {r + 1}/{args.rounds} {name:>12} {S} streams: {w['decode_tps']:.1f} t/s")
            for name in (names if r % 2 == 0 else names[::-1]):
                w = wave(servers[name], args.ttft_streams, 4, f"r{r}ttft", args.ttft_repeat)
                results[name]["ttft"].append(w["ttft"])
                log(f"round {r + 1}/{args.rounds} {name:>12} TTFT at {args.ttft_streams}: {w['ttft'] * 1e3:.0f} ms")
    finally:
        for s in servers.values():
            s.stop()

    med = {n: {S: statistics.median(v) for S, v in res["decode"].items()} for n, res in results.items()}
    ttft = {n: statistics.median(res["ttft"]) for n, res in results.items()}
    print(f"\nmodel {os.path.basename(model)}, {args.threads} threads, {args.parallel} slots, "
          f"{args.tokens} tokens per request, medians of {args.rounds} interleaved rounds\n")
    print("| streams | tp-numa t/s | llama-server t/s | tp-numa / llama-server | tp-numa vs 1 stream |")
    print("|---|---|---|---|---|")
    for S in streams:
        a, b = med["tp-numa"][S], med["llama-server"][S]
        print(f"| {S} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {a / med['tp-numa'][streams[0]]:.2f}x |")
    print(f"\nTTFT at {args.ttft_streams} concurrent requests (~{args.ttft_repeat * 34} prompt tokens): "
          f"tp-numa {ttft['tp-numa'] * 1e3:.0f} ms, llama-server {ttft['llama-server'] * 1e3:.0f} ms")
    top = max(streams)
    goals = [(f"{top} streams >= 4x 1 stream", med["tp-numa"][top] / med["tp-numa"][streams[0]], 4.0),
             (f"{top} streams >= 1.5x llama-server", med["tp-numa"][top] / med["llama-server"][top], 1.5),
             (f"TTFT at {args.ttft_streams} <= llama-server's (ratio llama / ours >= 1)",
              ttft["llama-server"] / ttft["tp-numa"], 1.0)]
    print()
    for what, value, need in goals:
        print(f"goal {what}: {value:.2f} -> {'met' if value >= need else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "medians": med, "ttft": ttft}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
