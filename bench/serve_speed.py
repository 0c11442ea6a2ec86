"""Serving throughput: `lutengine serve` against llama-cpp-python's server on the same GGUF,
1, 2, 4 and 8 concurrent streams, the two servers alternating round by round in one run.

    python -m bench.serve_speed [--model smollm2-135m-instruct] [--gguf PATH] [--threads 2]
                                [--llama-python /work/llama-venv/bin/python] [--rounds 2] [--out bench/RESULTS.md]

Each stream is one streamed /v1/completions request (greedy, 128 tokens: ignore_eos for
ours, min_tokens for llama-cpp-python, which knows no ignore_eos), each with its own
prompt; all of a round's streams start together. Reported per server and concurrency:
aggregate generated tok/s (tokens of all streams / wall time from the first request to
the last token) and p50/p95 time to first token. Tokens are counted as the SSE chunks
carrying text (both servers send one token a chunk). Ours runs with --parallel 8 and a
512-token context per slot; llama-cpp-python's server with n_ctx 2048, n_threads =
n_threads_batch = --threads and interrupt_requests off (by default a new request cuts
the running one short; without it the server serves one request after another).
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

CONCURRENCY = (1, 2, 4, 8)
TOKENS = 128
TOPICS = ["a lighthouse keeper", "the first snow", "a lost key", "an old map", "a train at night",
          "a garden robot", "the last library", "a quiet harbour"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc, timeout=300.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not come up in {timeout:.0f} s")


def stream(port: int, body: dict, out: dict):
    """One streamed completion: out gets ttft (s), tokens, end (perf_counter)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
        return
    tokens, ttft = 0, None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        if choice.get("text"):
            tokens += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
    out.update(ttft=ttft, tokens=tokens, end=time.perf_counter())


def round_of(port: int, n: int, extra: dict) -> dict:
    outs = [{} for _ in range(n)]
    bodies = [{"model": "m", "prompt": f"Once upon a time there was {TOPICS[i % len(TOPICS)]}.",
               "max_tokens": TOKENS, "temperature": 0, "stream": True, **extra} for i in range(n)]
    threads = [threading.Thread(target=stream, args=(port, b, o)) for b, o in zip(bodies, outs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise SystemExit(f"port {port}: {errors[0]}")
    wall = max(o["end"] for o in outs) - t0
    return {"tokens": sum(o["tokens"] for o in outs), "wall_s": wall, "ttft": [o["ttft"] for o in outs]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gguf", help="llama.cpp's file (default <cache>/llamacpp/<model>-Q4_0.gguf)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default="/work/llama-venv/bin/python")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    from models import catalog

    gguf = a.gguf or str(catalog.cache_dir() / "llamacpp" / f"{a.model}-Q4_0.gguf")
    ours_port, peer_port = free_port(), free_port()
    log = open("/tmp/bench-serve.log", "w")
    ours = subprocess.Popen([sys.executable, "-m", "engine", "serve", "-m", a.model, "--port", str(ours_port),
                             "--parallel", "8", "--ctx", "512", "-t", str(a.threads)], stdout=log, stderr=log)
    peer = subprocess.Popen([a.llama_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(peer_port),
                             "--n_ctx", "2048", "--n_threads", str(a.threads), "--n_threads_batch",
                             str(a.threads), "--interrupt_requests", "False"], stdout=log, stderr=log)
    servers = {"lutengine serve": (ours_port, {"ignore_eos": True}),
               "llama-cpp-python server": (peer_port, {"min_tokens": TOKENS})}
    results = {(s, n): [] for s in servers for n in CONCURRENCY}
    try:
        for port, proc in ((ours_port, ours), (peer_port, peer)):
            wait_up(port, proc)
        for s, (port, extra) in servers.items():  # warm-up
            round_of(port, 1, extra)
        for rnd in range(a.rounds):
            for n in CONCURRENCY:
                order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                for s in order:
                    port, extra = servers[s]
                    r = round_of(port, n, extra)
                    results[s, n].append(r)
                    print(f"round {rnd + 1} {s} x{n}: {r['tokens'] / r['wall_s']:.1f} tok/s, "
                          f"{r['tokens']} tokens", file=sys.stderr, flush=True)
    finally:
        for p in (ours, peer):
            p.terminate()
            p.wait(timeout=30)
    lines = [f"Command: `python -m bench.serve_speed --model {a.model} --threads {a.threads} "
             f"--rounds {a.rounds}` (llama.cpp file {os.path.basename(gguf)})", "",
             "| server | streams | aggregate tok/s | tokens | p50 TTFT | p95 TTFT |", "|---|---:|---:|---:|---:|---:|"]
    single = {}
    for s in servers:
        for n in CONCURRENCY:
            rs = results[s, n]
            tps = statistics.median(r["tokens"] / r["wall_s"] for r in rs)
            single.setdefault(s, tps)
            ttft = sorted(t for r in rs for t in r["ttft"] if t is not None)
            p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]
            lines.append(f"| {s} | {n} | {tps:.1f} ({tps / single[s]:.2f}x its 1 stream) | "
                         f"{statistics.median(r['tokens'] for r in rs):.0f} | {statistics.median(ttft) * 1e3:.0f} ms | "
                         f"{p95 * 1e3:.0f} ms |")
    ours4 = statistics.median(r["tokens"] / r["wall_s"] for r in results["lutengine serve", 4])
    peer4 = statistics.median(r["tokens"] / r["wall_s"] for r in results["llama-cpp-python server", 4])
    lines += ["", f"At 4 streams: ours / llama-cpp-python server = {ours4 / peer4:.2f}."]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
