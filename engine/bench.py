"""`lutengine bench`: tokens per second of prompt processing and generation, as llama-bench
measures them, optionally side by side with llama.cpp on the same machine in one run.

Tests: ppN = one forward over N prompt tokens from an empty cache; tgN = one token
fed untimed, then N greedy (argmax) decode steps, only those timed. The tokens are
the start of --text (our tokenizer, no BOS), or seeded random ids as llama-bench
uses. Per model and thread count: one warm-up run of every (engine, test), then
-r rounds in which every engine runs every test once, the engine that goes first
rotating each round. tok/s is reported as mean ± sd over the rounds; the ratio
against llama.cpp is of the medians (PROTOCOL.md). Each run records the CPU other
processes used meanwhile (engine/measure.py), and a row with a disturbed run says so.
Peak RSS is the process's high-water mark from loading the model to the end of its
tests at that thread count (llama.cpp's: its worker process's).

This module also serves bench/speed.py (the longer protocol run behind bench/RESULTS.md),
so both time runs the same way.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

from . import llamacpp_peer as peer_mod
from .measure import peak_rss_bytes, reset_peak_rss

DISTURBED_CORES = 0.25  # other processes' CPU during a run above which its row is flagged
LINEAR_GGUF = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MD_COLUMNS = ("model", "format", "bpw", "size", "threads", "test", "tok/s", "peak RSS")


@dataclass(frozen=True)
class Test:
    kind: str  # "pp" or "tg"
    n: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.n}"


def tests_from(prompts: list[int], gens: list[int]) -> list[Test]:
    """llama-bench's convention: a size of 0 means no such test."""
    return [Test("pp", n) for n in prompts if n] + [Test("tg", n) for n in gens if n]


# ------------------------------------------------------------------------ what a decode step reads ----

def ours_bytes(tr) -> dict:
    """Bytes a decode step reads: every linear layer as the kernels see it, the head, one embedding row."""
    def nbytes(lin):
        return lin.layer.w.nbytes() if hasattr(lin, "layer") else lin.wt.nbytes

    def weights(lin):
        return lin.layer.w.M * lin.layer.w.K if hasattr(lin, "layer") else lin.wt.size

    lins = [getattr(b, n) for b in tr.blocks for n in ("q", "k", "v", "o", "gate", "up", "down")]
    linear = sum(nbytes(x) for x in lins)
    head = nbytes(tr.head)
    row = tr.embed.nbytes // tr.embed.shape[0]
    return {"linear": linear, "head": head, "embed_row": row, "total": linear + head + row,
            "bpw_linear": 8.0 * linear / sum(weights(x) for x in lins),
            "bpw_head": 8.0 * head / weights(tr.head)}


def gguf_bytes(path: str) -> dict:
    """The same count from a GGUF's tensor sizes: blk.*.{attn_q..ffn_down}, output (or the tied
    token_embd), one token_embd row; with the file type and the linear tensors' types."""
    from models.gguf_loader import _file_type_name, read_gguf

    md, raw = read_gguf(path)
    lin = [t for n, t in raw.items() if n.startswith("blk.") and n.split(".")[2] in LINEAR_GGUF
           and n.endswith(".weight")]
    linear = sum(t.data.nbytes for t in lin)
    emb = raw["token_embd.weight"]
    head_t = raw.get("output.weight", emb)
    row = emb.data.nbytes // emb.shape[0]
    types = {}
    for t in lin:
        types[t.type.name] = types.get(t.type.name, 0) + 1
    return {"linear": linear, "head": head_t.data.nbytes, "embed_row": row,
            "total": linear + head_t.data.nbytes + row,
            "bpw_linear": 8.0 * linear / sum(t.shape[0] * t.shape[1] for t in lin),
            "bpw_head": 8.0 * head_t.data.nbytes / (head_t.shape[0] * head_t.shape[1]),
            "linear_types": types, "head_type": head_t.type.name, "tied": "output.weight" not in raw,
            "file_type": str(_file_type_name(md.get("general.file_type"))).replace("MOSTLY_", "")}


# ---------------------------------------------------------------------------------------- runs ----

class Ours:
    """Our engine's side of a run: the Transformer's forward, timed by llamacpp_peer.timed."""

    def __init__(self, tr):
        import numpy as np

        self.tr, self.argmax = tr, np.argmax

    def pp(self, ids):
        self.tr.reset()
        t0 = time.perf_counter()
        self.tr.forward(ids, 0)
        return time.perf_counter() - t0

    def tg(self, first, n):
        tr, argmax = self.tr, self.argmax
        tr.reset()
        tok = int(argmax(tr.forward([first], 0)))
        out = []
        t0 = time.perf_counter()
        for i in range(n):
            tok = int(argmax(tr.forward([tok], i + 1)))
            out.append(tok)
        return time.perf_counter() - t0, out

    def run(self, test: Test, ids: list[int]) -> dict:
        return peer_mod.timed(test.kind, test.n, ids, self.pp, self.tg)


def bench_ids(model, n: int, text: str | None, seed: int) -> list[int]:
    """n token ids: the start of `text` by our tokenizer (no BOS, no special tokens), else seeded random ids."""
    import numpy as np

    if text is None:
        vocab = model.transformer.embed.shape[0]
        return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]
    from .tokenizer import read_text_file

    body = read_text_file(text)
    ids = []
    for cut in (20_000, 200_000, len(body)):  # enough text for n ids without tokenizing a whole book
        ids = model.tokenizer.encode(body[:cut], add_bos=False, special=False)
        if len(ids) >= n or cut >= len(body):
            break
    if len(ids) < n:
        raise ValueError(f"{text}: only {len(ids)} tokens, the tests need {n}")
    return [int(t) for t in ids[:n]]


def stats(runs: list[dict], n: int) -> dict:
    tps = [n / r["seconds"] for r in runs]
    return {"tok_s_mean": statistics.fmean(tps), "tok_s_sd": statistics.stdev(tps) if len(tps) > 1 else 0.0,
            "tok_s_median": statistics.median(tps), "runs_tok_s": tps,
            "other_cores_max": max(r["other_cores"] for r in runs),
            "steal_pct_max": max(r["steal_pct"] for r in runs)}


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(models: list[str | None], tests: list[Test], threads: list[int], reps: int, text: str | None = None,
        peers: list[str] = (), llama_python: str | None = None, seed: int = 0, progress=_progress) -> dict:
    """Every (model, threads, test) for our engine and each peer GGUF; {"machine", "settings", "rows"}."""
    import lutkernels as lk

    from .load import load

    ctx = max(t.n + (1 if t.kind == "tg" else 0) for t in tests)
    longest = max(t.n for t in tests)
    peer = None
    if peers:
        peer = peer_mod.LlamaPeer(llama_python or sys.executable)
    rows = []
    try:
        for name in models:
            reset_peak_rss()
            progress(f"loading {name or 'the default model'}")
            model = load(name, max_context=ctx, progress=True)
            ids = bench_ids(model, longest, text, seed)
            ours = Ours(model.transformer)
            nb = ours_bytes(model.transformer)
            path = model.info.get("path")
            ours_info = {"model": model.info.get("name"), "engine": "lutengine",
                         "format": model.info.get("quantization"), "bpw": nb["bpw_linear"],
                         "bpw_head": nb["bpw_head"], "size_bytes": os.path.getsize(path) if path else None}
            infos = {"ours": ours_info}
            for i, p in enumerate(peers):
                gb = gguf_bytes(p)
                infos[f"peer{i}"] = {"model": model.info.get("name"), "engine": "llama.cpp",
                                     "format": gb["file_type"], "bpw": gb["bpw_linear"], "bpw_head": gb["bpw_head"],
                                     "size_bytes": os.path.getsize(p), "path": p}
            engines = list(infos)
            for T in threads:
                lk.set_threads(T)
                for key in engines[1:]:
                    peer.call(op="load", key=key, path=infos[key]["path"], threads=T, n_ctx=ctx)

                def one(key, test):
                    if key == "ours":
                        return ours.run(test, ids)
                    return peer.call(op="run", key=key, kind=test.kind, n=test.n, ids=ids)

                for test in tests:  # warm-up
                    for key in engines:
                        one(key, test)
                runs = {(k, t): [] for k in engines for t in tests}
                for rep in range(reps):
                    order = engines[rep % len(engines):] + engines[:rep % len(engines)]
                    for test in tests:
                        for key in order:
                            r = one(key, test)
                            runs[key, test].append(r)
                            progress(f"{ours_info['model']} {infos[key]['engine']} {infos[key]['format']} T={T} "
                                     f"{test.name} run {rep + 1}/{reps}: {test.n / r['seconds']:.1f} tok/s")
                peaks = {"ours": peak_rss_bytes()}
                for key in engines[1:]:
                    peaks[key] = peer.call(op="peak_rss")["bytes"]
                    peer.call(op="unload", key=key)
                for test in tests:
                    for key in engines:
                        row = {**infos[key], "threads": T, "test": test.name, "n": test.n,
                               "peak_rss_bytes": peaks[key], **stats(runs[key, test], test.n)}
                        row.pop("path", None)
                        rows.append(row)
                    base, *others = rows[-len(engines):]
                    for row in others:
                        base.setdefault("vs_llama_cpp", {})[row["format"]] = base["tok_s_median"] / row["tok_s_median"]
            del model, ours
    finally:
        if peer is not None:
            peer.close()
    return {"machine": machine(), "llama_cpp": peer.hello if peer else None,
            "settings": {"tests": [t.name for t in tests], "threads": threads, "repetitions": reps,
                         "tokens": text or f"random ids (seed {seed})", "context": ctx},
            "rows": rows}


def machine() -> dict:
    """The CPU, the ISA path the kernels use and the CPU's SIMD flags that matter to either engine."""
    import platform

    import lutkernels as lk

    cpu, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "?":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [x for x in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                        "avx512_vbmi", "avx_vnni", "avx512_bf16", "asimd", "asimddp") if x in flags]
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "available": len(os.sched_getaffinity(0)),
            "isa": lk.get_isa(), "isa_supported": lk.supported_isas(), "flags": simd,
            "platform": platform.platform()}


# -------------------------------------------------------------------------------------- output ----

def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def markdown(result: dict) -> str:
    rows = result["rows"]
    ratios = sorted({f for r in rows for f in r.get("vs_llama_cpp", {})})
    cols = list(MD_COLUMNS) + [f"ours / llama.cpp {f}" for f in ratios]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("model", "format", "test") else "---:"
                                                               for c in cols) + "|"]
    disturbed = False
    for r in rows:
        flag = r["other_cores_max"] >= DISTURBED_CORES
        disturbed |= flag
        fmt = f"{r['format']}" if r["engine"] == "lutengine" else f"llama.cpp {r['format']}"
        cells = [str(r["model"]), fmt, f"{r['bpw']:.2f}", _mib(r["size_bytes"]), str(r["threads"]), r["test"],
                 f"{r['tok_s_mean']:.2f} ± {r['tok_s_sd']:.2f}" + (" *" if flag else ""), _mib(r["peak_rss_bytes"])]
        cells += [f"{r['vs_llama_cpp'][f]:.2f}" if f in r.get("vs_llama_cpp", {}) else "" for f in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    m, s = result["machine"], result["settings"]
    lines += ["", f"{m['cpu']}, {m['logical_cpus']} logical CPUs, ISA path {m['isa']}; {s['repetitions']} run{'s' * (s['repetitions'] != 1)} "
              f"after a warm-up, tokens: {s['tokens']}; bpw: linear layers, every stored bit."]
    if ratios:
        lines.append(f"ours / llama.cpp: ratio of median tok/s, engines alternating run by run "
                     f"(llama-cpp-python {result['llama_cpp']['version']}).")
    if disturbed:
        lines.append(f"* other processes used >= {DISTURBED_CORES} cores during a run of this row.")
    return "\n".join(lines)


def parse_sizes(flag: str, text: str, lowest: int) -> list[int]:
    """'128,512' -> [128, 512]; a ValueError names the flag and the bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < lowest:
            raise ValueError(f"{flag} takes a comma-separated list of integers >= {lowest}, got {text!r}")
        out.append(int(item))
    return out


def command(args) -> int:
    """`lutengine bench` (arguments from engine/cli.py)."""
    from .cli import UsageError

    try:
        prompts, gens = parse_sizes("-p", args.prompts, 0), parse_sizes("-n", args.gens, 0)
        threads = parse_sizes("-t", args.threads, 1)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.repetitions < 1:
        raise UsageError(f"-r takes an integer >= 1, got {args.repetitions}")
    tests = tests_from(prompts, gens)
    if not tests:
        raise UsageError("nothing to run: -p and -n are both 0")
    models = args.model or [None]
    peers = args.vs_llama_cpp or []
    if peers:
        if len(models) > 1:
            raise UsageError("--vs-llama-cpp compares one model: give a single -m")
        for p in peers:
            if not os.path.isfile(p):
                raise UsageError(f"{p}: no such GGUF file (--vs-llama-cpp)")
        python = args.llama_python or sys.executable
        if not peer_mod.has_llama_cpp(python):
            raise UsageError(f"--vs-llama-cpp needs llama-cpp-python, which {python} cannot import: "
                             f"{peer_mod.INSTALL_HINT}")
    result = run(models, tests, threads, args.repetitions, args.text, peers, args.llama_python, args.seed)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    if not peers:
        print("bench: to compare with llama.cpp on this machine, add --vs-llama-cpp FILE.gguf "
              f"({peer_mod.INSTALL_HINT})", file=sys.stderr)
    return 0
