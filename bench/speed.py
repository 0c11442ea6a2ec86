"""End-to-end speed: lutengine against llama.cpp, per ../shared/PROTOCOL.md "Speed".

Run from the repository root:

    python -m bench.speed                                  # smollm2-135m-instruct, threads 1 2, writes bench/RESULTS.md
    python -m bench.speed --model smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
    python -m bench.speed --model m --peer-gguf a.gguf b.gguf   # other llama.cpp files to compare with
    python -m bench.speed --quick --no-write --no-peer     # smoke run, our engine only

Engines
-------
* lutengine: engine.load(model, threads=T, max_context=512): a catalog name runs
  its cached file in the default quantized format; a GGUF or HF path is
  quantized to the default format in memory. Timed through
  model.transformer.forward(tokens, pos) in this process.
* llama.cpp: llama-cpp-python in its own venv (--llama-python), driven as a
  long-lived worker subprocess (this file with --llama-worker, which reuses
  engine/llamacpp_peer.py, the same worker `lutengine bench --vs-llama-cpp` uses)
  that takes one JSON command per line on stdin and answers one JSON line on
  stdout. Both engines therefore alternate run by run inside one script, and both
  are timed by the same code (engine/bench.py's Ours and llamacpp_peer.timed). Default peers: the
  catalog GGUF as is, plus <LUTENGINE_HOME>/llamacpp/<model>-Q4_0.gguf
  (llama.cpp's own requantization) where it exists. n_threads = n_threads_batch
  = T, n_batch = n_ubatch = 512, n_ctx = 512.

Tests (PROTOCOL)
----------------
* tg128: from an empty cache feed the first token of the text (untimed), then
  128 greedy (argmax) decode steps ignoring EOS; only the 128 steps are timed.
* pp128, pp512: one forward pass over the first N tokens from an empty cache.
* The same token ids for both engines: the text tokenized by our tokenizer (no
  BOS, special tokens not parsed), which matches llama.cpp's exactly.
* Per thread count: one warm-up round (every engine and test once), then rounds
  in which every (engine, test) still short of --runs clean runs runs once,
  engines alternating run by run (the first engine rotates each round). A run
  is clean when other processes used < --quiet cores and CPU steal was
  < --max-steal % during it (/proc/stat busy minus the timed process's own CPU
  time); before each run the script waits (up to --max-wait s) for the machine
  to be quiet. The median of the first --runs clean runs is reported; after
  --max-rounds rounds the least-disturbed runs stand in, marked NOT CLEAN.
* Roofline: bytes of weights read per decoded token (every linear layer as
  stored, plus the head and one embedding row) / streaming-read bandwidth
  (lutkernels.kernels.stream_read of a >= 1 GiB float32 buffer on the kernel
  pool at the same thread count, best of 3, measured right before that thread
  count's runs). Our bytes come from the packed arrays in memory, llama.cpp's
  from the GGUF tensor sizes (models.gguf_loader.read_gguf).
* Profile (ours, untimed, after the runs): one decode step per category
  (LUT GEMV, head GEMV, attention step, norms, SiLU, Python glue) by timing
  each bound C call of the decoder, and one pp512 under cProfile (lut_gemm,
  attention, RoPE, RMSNorm, SiLU, the rest).
"""
import os

# As engine/__init__.py does, before numpy is imported anywhere in this process: OpenBLAS's
# spinning threads would otherwise fight the LUT pool for the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

SECTION = "## End-to-end speed (bench/speed)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ("tg128", "pp128", "pp512")
NTOK = {"tg128": 128, "pp128": 128, "pp512": 512}
MAX_CONTEXT = 512
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_LLAMA_PYTHON = "/work/llama-venv/bin/python"
DEFAULT_TEXT = "/work/shared/data/wiki.txt"
COLUMNS = ["engine / format", "bpw linear", "threads", "tg128 tok/s", "pp128 tok/s", "pp512 tok/s",
           "tg128 ours/peer", "pp128 ours/peer", "pp512 ours/peer", "MB read/token", "roofline tok/s",
           "tg128 % roofline"]
LINEAR_GGUF = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ------------------------------------------------------------------------------- measurements ----

def machine() -> dict:
    from bench.kernels import cache_bytes
    from engine.bench import machine as bench_machine

    m = bench_machine()
    l3 = cache_bytes(3, 0)
    return {**m, "l3_mib": l3 >> 20}


def stream_bandwidth(mib: int, quiet: float, max_steal: float, max_wait: float, tries: int = 3) -> dict:
    """Best of 3 full reads of a float32 buffer by lutkernels.kernels.stream_read (current thread
    count); repeated (up to `tries` times) while other processes disturbed it."""
    import numpy as np

    from bench.kernels import stream_seconds
    from engine.measure import Interference, wait_quiet
    from lutkernels import kernels as lkk

    buf = np.empty((mib << 20) // 4, np.float32)
    buf.fill(1.0)  # every page touched before timing
    stream_seconds(lkk, buf)  # wakes the pool
    out = None
    for attempt in range(tries):
        waited = wait_quiet(quiet, max_wait) if max_wait > 0 else 0.0
        with Interference() as it:
            best = max(buf.nbytes / stream_seconds(lkk, buf) for _ in range(3))
        r = {"bytes_per_s": best, "mib": mib, "other_cores": it.other_cores, "steal_pct": it.steal_pct,
             "waited_s": waited, "attempts": attempt + 1}
        if out is None or (r["other_cores"], r["steal_pct"]) < (out["other_cores"], out["steal_pct"]):
            out = r
        if it.other_cores < quiet and it.steal_pct < max_steal or max_wait <= 0:
            break
    out["attempts"] = attempt + 1
    del buf
    return out


def profile_decode(tr, ids: list, steps: int = 32) -> dict | None:
    """Seconds per decode step by category, timing each bound call of engine.model._Decoder.
    None if the decoder is not laid out as expected."""
    import numpy as np

    dec = getattr(tr, "_decoder", None)
    if dec is None or not hasattr(dec, "blocks") or not hasattr(dec, "final"):
        return None

    def category(fn, is_head=False):
        q = getattr(fn, "__qualname__", "")
        if "bind_gemv" in q or "Dense.bind" in q:
            return "head GEMV" if is_head else "LUT GEMV (linear layers)"
        if "rmsnorm" in q:
            return "RMSNorm (+residual)"
        if "silu" in q:
            return "SiLU*up"
        if "attention" in q:
            return "attention step"
        return "other C calls"

    calls = []  # (category, fn, takes_pos)
    for pre, attn, post in dec.blocks:
        calls += [(category(f), f, False) for f in pre] + [(category(attn), attn, True)]
        calls += [(category(f), f, False) for f in post]
    calls += [(category(f, i == len(dec.final) - 1), f, False) for i, f in enumerate(dec.final)]
    cats = {}
    pc = time.perf_counter
    tr.reset()
    tok = int(np.argmax(tr.forward([ids[0]], 0)))
    total = 0.0
    for i in range(steps):
        pos = i + 1
        t_step = pc()
        np.copyto(dec.x[0], dec.embed[tok])
        for cat, fn, takes_pos in calls:
            t0 = pc()
            fn(pos) if takes_pos else fn()
            cats[cat] = cats.get(cat, 0.0) + pc() - t0
        tok = int(np.argmax(dec.logits[0]))
        total += pc() - t_step
        tr.filled = pos + 1
    out = {k: v / steps for k, v in cats.items()}
    out["Python glue, embedding row, argmax"] = total / steps - sum(out.values())
    return {"per_step_s": out, "total_s": total / steps, "steps": steps}


def profile_prompt(tr, ids: list, n: int = 512) -> dict:
    """Seconds of one n-token forward by category, from cProfile's cumulative times."""
    import cProfile
    import pstats

    tr.reset()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    tr.forward(ids[:n], 0)
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    want = {("lutkernels/kernels.py", "gemm"): "lut_gemm (integer GEMM, linear layers + head)",
            ("lutkernels/ops.py", "attention_prompt"): "attention (C: QK^T, softmax, AV)",
            ("engine/model.py", "rope"): "RoPE (numpy)",
            ("engine/model.py", "rmsnorm"): "RMSNorm (numpy)",
            ("engine/model.py", "silu"): "SiLU (numpy)"}
    cats = {}
    for (file, _, name), (_, _, _, ct, _) in st.items():
        f = file.replace(os.sep, "/")
        for (suffix, fn), cat in want.items():
            if f.endswith(suffix) and name == fn:
                cats[cat] = cats.get(cat, 0.0) + ct
    cats["other (embedding, residual adds, SiLU*up product, biases, reshapes)"] = wall - sum(cats.values())
    return {"n": n, "wall_s": wall, "by_category_s": cats}


# -------------------------------------------------------------------------------------- driver ----

def default_peers(name: str, peer) -> list:
    """The catalog GGUF as is and llama.cpp's own Q4_0 of it (requantized by the worker if missing)."""
    from models import catalog

    out = []
    if name in catalog.CATALOG:
        p = catalog.model_path(name)
        if p.exists():
            out.append(str(p))
            q = catalog.cache_dir() / "llamacpp" / f"{name}-Q4_0.gguf"
            if not q.exists():
                print(f"[{name}] requantizing {p} to Q4_0 with llama.cpp -> {q}", file=sys.stderr)
                peer.call(op="quantize", src=str(p), dst=str(q), threads=os.cpu_count())
            out.append(str(q))
    elif name.endswith(".gguf") and os.path.exists(name):
        out.append(name)
    return out


def pick(runs: list, n: int, quiet: float, max_steal: float) -> tuple:
    clean = [r for r in runs if r["other_cores"] < quiet and r["steal_pct"] < max_steal]
    if len(clean) >= n:
        return clean[:n], True
    return sorted(runs, key=lambda r: (r["other_cores"], r["steal_pct"]))[:n], False


def bench_model(args, name: str, peer_paths: list, peer) -> dict:
    import engine
    import lutkernels as lk
    from engine.bench import Ours, Test, bench_ids, gguf_bytes, ours_bytes
    from engine.measure import wait_quiet

    log = lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    tok_model = engine.load(name, threads=args.threads[0], max_context=MAX_CONTEXT, progress=True)
    ids = bench_ids(tok_model, MAX_CONTEXT, args.text, 0)
    ours_label = f"lutengine {tok_model.info.get('quantization')}"
    ours_info = {"label": ours_label, "path": tok_model.info.get("path"), "bytes": ours_bytes(tok_model.transformer)}
    del tok_model
    peers = []
    if peer is not None:
        for i, p in enumerate(peer_paths):
            gb = gguf_bytes(p)
            info = peer.call(op="info", path=p)
            repack = any("CPU_REPACK model buffer" in s for s in info.get("llama_load_summary", []))
            peers.append({"key": f"peer{i}", "path": p, "bytes": gb, "info": info, "repack": repack,
                          "label": f"llama.cpp {gb['file_type']} ({os.path.basename(p)})"})
    engines = ["ours"] + [p["key"] for p in peers]
    labels = {"ours": ours_label, **{p["key"]: p["label"] for p in peers}}
    result = {"name": name, "ids_n": len(ids), "first_token": ids[0], "ours": ours_info, "peers": peers,
              "threads": []}

    for T in args.threads:
        lk.set_threads(T)
        bw = stream_bandwidth(args.stream_mib, args.quiet, args.max_steal, args.max_wait)
        log(f"T={T}: stream read {bw['bytes_per_s'] / 1e9:.1f} GB/s")
        model = engine.load(name, threads=T, max_context=MAX_CONTEXT)
        tr = model.transformer
        for p in peers:
            peer.call(op="load", key=p["key"], path=p["path"], threads=T, n_ctx=MAX_CONTEXT)
        ours = Ours(tr)

        def run(e, test):
            t = Test(test[:2], NTOK[test])
            if e == "ours":
                return ours.run(t, ids)
            return peer.call(op="run", key=e, kind=t.kind, n=t.n, ids=ids)

        runs = {(e, k): [] for e in engines for k in TESTS}
        gen = {}
        waited = 0.0
        for rnd in range(1 + args.max_rounds):
            need = [(e, k) for e in engines for k in TESTS
                    if not pick(runs[e, k], args.runs, args.quiet, args.max_steal)[1]]
            if rnd > 0 and not need:
                break
            order = engines[rnd % len(engines):] + engines[:rnd % len(engines)]
            for k in TESTS:
                for e in order:
                    if rnd > 0 and (e, k) not in need:
                        continue
                    # the waiting process is the one about to run, so its own idle threads do not count
                    if args.max_wait > 0:
                        waited += (wait_quiet(args.quiet, args.max_wait) if e == "ours" else
                                   peer.call(op="wait_quiet", limit=args.quiet, max_wait=args.max_wait)["waited_s"])
                    r = run(e, k)
                    if r.get("tokens") is not None:
                        gen[e] = r["tokens"]
                    r.pop("tokens", None)
                    if rnd > 0:
                        runs[e, k].append(r)
                        log(f"T={T} round {rnd} {e:5s} {k}: {NTOK[k] / r['seconds']:8.2f} tok/s "
                            f"(other {r['other_cores']:.2f} cores, steal {r['steal_pct']:.1f}%)")
        rows = {}
        for e in engines:
            for k in TESTS:
                used, clean = pick(runs[e, k], args.runs, args.quiet, args.max_steal)
                med = statistics.median(r["seconds"] for r in used)
                rows[e, k] = {"tok_s": NTOK[k] / med, "median_s": med, "clean": clean,
                              "runs_tok_s": [NTOK[k] / r["seconds"] for r in used],
                              "other_cores": [r["other_cores"] for r in used],
                              "steal_pct": [r["steal_pct"] for r in used], "attempts": len(runs[e, k])}
        prof = None
        if not args.no_profile:
            lk.set_threads(T)
            prof = {"decode": profile_decode(tr, ids), "prompt": profile_prompt(tr, ids, MAX_CONTEXT)}
        for p in peers:
            peer.call(op="unload", key=p["key"])
        agree = {}
        for p in peers:
            a, b = gen.get("ours"), gen.get(p["key"])
            if a and b:
                agree[p["key"]] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        result["threads"].append({"T": T, "bandwidth": bw, "rows": rows, "profile": prof, "waited_s": waited,
                                  "greedy_agree": agree})
        del model, tr, ours
    result["labels"] = labels
    result["engines"] = engines
    return result


# -------------------------------------------------------------------------------------- report ----

def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "—"


def model_report(res: dict) -> list:
    engines, labels = res["engines"], res["labels"]
    binfo = {"ours": res["ours"]["bytes"], **{p["key"]: p["bytes"] for p in res["peers"]}}
    lines = [f"### {res['name']}", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|---|" + "|".join("---:" for _ in COLUMNS[1:]) + "|")
    for th in res["threads"]:
        T, rows, bw = th["T"], th["rows"], th["bandwidth"]["bytes_per_s"]
        for e in engines:
            b = binfo[e]
            cells = [labels[e], f"{b['bpw_linear']:.2f}", str(T)]
            for k in TESTS:
                r = rows[e, k]
                cells.append(f"{r['tok_s']:.1f}" + ("" if r["clean"] else " (NOT CLEAN)"))
            for k in TESTS:
                cells.append("—" if e == "ours" else fmt_ratio(rows["ours", k]["tok_s"], rows[e, k]["tok_s"]))
            roof = bw / b["total"]
            cells += [f"{b['total'] / 1e6:.1f}", f"{roof:.1f}", f"{100 * rows[e, 'tg128']['tok_s'] / roof:.0f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    # what is read per token
    lines.append("Bytes read per decoded token: " + "; ".join(
        f"{labels[e]}: linear {binfo[e]['linear'] / 1e6:.1f} MB ({binfo[e]['bpw_linear']:.2f} bpw) + head "
        f"{binfo[e]['head'] / 1e6:.1f} MB ({binfo[e]['bpw_head']:.2f} bpw"
        + (f", {binfo[e]['head_type']}" if "head_type" in binfo[e] else "") + ")"
        f" + embedding row {binfo[e]['embed_row']} B" for e in engines) + ".")
    for p in res["peers"]:
        lines.append("")
        lines.append(f"{p['label']}: {p['path']}, {p['info']['bytes'] / 2**20:.1f} MiB, linear tensor types "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(p["bytes"]["linear_types"].items()))
                     + (" (tied head = token_embd)" if p["bytes"]["tied"] else "")
                     + ("; llama.cpp repacks its weights for AVX2 at load (CPU_REPACK)" if p["repack"] else "")
                     + ".")
    lines.append("")
    lines.append("Roofline (stream_read of a {} MiB float32 buffer, best of 3, kernel pool at T threads): ".format(
        res["threads"][0]["bandwidth"]["mib"]) + "; ".join(
        f"T={th['T']} {th['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s (other processes "
        f"{th['bandwidth']['other_cores']:.2f} cores, steal {th['bandwidth']['steal_pct']:.1f}%, "
        f"{th['bandwidth']['attempts']} attempt(s))"
        for th in res["threads"]) + ".")
    agree = [f"T={th['T']} " + ", ".join(f"{labels[k]} {v}/128" for k, v in th["greedy_agree"].items())
             for th in res["threads"] if th["greedy_agree"]]
    if agree:
        lines += ["", "tg128 greedy continuation identical to ours for the first n tokens: " + "; ".join(agree) + "."]
    # profile
    profs = [th for th in res["threads"] if th["profile"]]
    if profs:
        lines += ["", "Profile of our engine (untimed runs after the timed ones; Python-level timers / cProfile, "
                  "so the sums carry a little instrumentation overhead):", ""]
        for th in profs:
            T, pr = th["T"], th["profile"]
            bw = th["bandwidth"]["bytes_per_s"]
            d = pr["decode"]
            if d:
                ps = d["per_step_s"]
                gemv = ps.get("LUT GEMV (linear layers)", 0.0)
                head = ps.get("head GEMV", 0.0)
                ob = res["ours"]["bytes"]
                lines.append(f"- T={T} decode step {d['total_s'] * 1e3:.2f} ms (mean of {d['steps']}): "
                             + ", ".join(f"{k} {v * 1e3:.2f} ms ({100 * v / d['total_s']:.0f}%)"
                                         for k, v in sorted(ps.items(), key=lambda kv: -kv[1]))
                             + f". Linear-layer GEMVs run at {ob['linear'] / gemv / 1e9:.1f} GB/s "
                             f"({100 * ob['linear'] / bw / gemv:.0f}% of the stream-read bandwidth), "
                             f"the head at {ob['head'] / head / 1e9:.1f} GB/s." if gemv and head else ".")
            p = pr["prompt"]
            lines.append(f"- T={T} pp{p['n']} forward {p['wall_s']:.2f} s ({p['n'] / p['wall_s']:.1f} tok/s under "
                         "cProfile): " + ", ".join(
                             f"{k} {v:.2f} s ({100 * v / p['wall_s']:.0f}%)"
                             for k, v in sorted(p["by_category_s"].items(), key=lambda kv: -kv[1])) + ".")
    # interference record
    lines += ["", "Interference record (each reported run: tok/s, other processes' CPU in cores, steal %; "
              "attempts = timed runs made, the first clean --runs of them reported):", "",
              "| engine / format | threads | test | runs tok/s | other cores | steal % | attempts | clean |",
              "|---|---:|---|---|---|---|---:|---|"]
    for th in res["threads"]:
        for e in engines:
            for k in TESTS:
                r = th["rows"][e, k]
                lines.append(f"| {labels[e]} | {th['T']} | {k} | " + ", ".join(f"{x:.1f}" for x in r["runs_tok_s"])
                             + " | " + ", ".join(f"{x:.2f}" for x in r["other_cores"]) + " | "
                             + ", ".join(f"{x:.1f}" for x in r["steal_pct"]) + f" | {r['attempts']} | "
                             + ("yes" if r["clean"] else "NO") + " |")
    lines.append("")
    return lines


def report(args, argv, results: list, mach: dict, hello: dict | None, note: str | None) -> str:
    """The section: a method paragraph, then one self-contained subsection per model (its command,
    machine line, table, profile and interference record)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m bench.speed" + ("" if not argv else " " + shlex.join(argv))
    head = [f"Command: `{cmd}`", "",
            f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs ({mach['available']} available), "
            f"ISA path: {mach['isa']} (supported: {', '.join(mach['isa_supported'])}; CPU flags "
            f"{' '.join(mach['flags'])})" + (f", L3 {mach['l3_mib']} MiB" if mach["l3_mib"] else "")
            + (f"; llama-cpp-python {hello['version']}" if hello else "") + f"; {date}", ""]
    if hello:
        head += [f"llama.cpp system info: `{hello['system_info']}`", ""]
    if note:
        head += [note, ""]
    lines = [SECTION, "",
             "Method (PROTOCOL.md, Speed): tg128 = first token of the text fed untimed, then 128 greedy decode "
             "steps ignoring EOS, only those timed; ppN = one forward over the first N tokens from an empty "
             "cache. Same token ids for both engines (our tokenizer, no BOS). Ours: engine.load(model, "
             f"threads=T, max_context={MAX_CONTEXT}), default quantized format, "
             "model.transformer.forward; llama.cpp: llama-cpp-python in a worker process, n_threads = "
             "n_threads_batch = T, n_batch = n_ubatch = 512. One warm-up round, then runs alternating engine "
             "by engine until each has the wanted number of clean runs (other processes below a CPU limit and "
             "steal below a limit during the run, both given per model below); median; ratio = ours / peer of "
             "the medians. Roofline tok/s = stream-read bandwidth at T threads / bytes read per decoded token "
             "(linear layers as stored + head + one embedding row); % roofline = tg128 / roofline tok/s.", ""]
    for res in results:
        body = model_report(res)
        crit = (f"Runs: warm-up + {args.runs} clean run(s) per engine and test, clean = other processes "
                f"< {args.quiet:g} cores and steal < {args.max_steal:g}%, at most {args.max_rounds} rounds.")
        lines += body[:2] + head + [crit, ""] + body[2:]
    return "\n".join(lines).rstrip("\n") + "\n"


def _subsections(lines: list) -> tuple:
    """Split a section body into (intro lines, {### heading: lines}) in order."""
    intro, subs, cur = [], {}, None
    for line in lines:
        if line.startswith("### "):
            cur = line.rstrip()
            subs[cur] = []
        if cur is None:
            intro.append(line)
        else:
            subs[cur].append(line)
    return intro, subs


def _trim(block: list) -> list:
    while block and not block[-1].strip():
        block = block[:-1]
    return block


def write_section(path: str, text: str) -> None:
    """Put our section into the markdown file, everything outside it kept. Inside it, the intro is
    this run's; a model subsection (### name) this run measured replaces the old one in place, and
    the others stay (each carries its own command and machine line)."""
    try:
        with open(path) as f:
            lines = f.read().rstrip("\n").split("\n")
    except FileNotFoundError:
        lines = ["# lutengine benchmark results"]
    new = text.rstrip("\n").split("\n")
    intro, new_subs = _subsections(new[1:])
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        lines += [""] + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "# "))), len(lines))
        _, old_subs = _subsections(lines[start + 1:end])
        merged = dict(old_subs)
        merged.update(new_subs)  # replaces in place, appends new models at the end
        section = [new[0]] + _trim(intro) + [""]
        for block in merged.values():
            section += _trim(block) + [""]
        section = _trim(section)
        lines = lines[:start] + section + ([""] + lines[end:] if end < len(lines) else [])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="catalog name(s), GGUF or lutengine file path(s) (default %(default)s)")
    p.add_argument("--peer-gguf", nargs="+", help="llama.cpp GGUF file(s) to compare with (one --model only; "
                   "default: the catalog GGUF as is and <cache>/llamacpp/<model>-Q4_0.gguf if present)")
    p.add_argument("--no-peer", action="store_true", help="time our engine only")
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON,
                   help="python of the venv with llama-cpp-python (default %(default)s)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--text", default=DEFAULT_TEXT, help="prompt text (default %(default)s)")
    p.add_argument("--runs", type=int, help="timed runs per test (default 3; --quick 1)")
    p.add_argument("--quiet", type=float, default=0.15,
                   help="a run is clean if other processes used fewer cores than this (default %(default)s)")
    p.add_argument("--max-steal", type=float, default=2.0, help="and CPU steal was below this %% (default %(default)s)")
    p.add_argument("--max-wait", type=float, help="seconds to wait for a quiet machine before each run "
                   "(default 30; --quick 0)")
    p.add_argument("--max-rounds", type=int, help="rounds after the warm-up at most (default 12; --quick 1)")
    p.add_argument("--stream-mib", type=int, help="roofline buffer in MiB (default 1024; --quick 64)")
    p.add_argument("--no-profile", action="store_true", help="skip the profile of our engine")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run, no waiting, small roofline buffer")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    q = a.quick
    a.runs = a.runs or (1 if q else 3)
    a.max_wait = a.max_wait if a.max_wait is not None else (0.0 if q else 30.0)
    a.max_rounds = a.max_rounds or (1 if q else 12)
    a.stream_mib = a.stream_mib or (64 if q else 1024)
    if a.peer_gguf and len(a.model) > 1:
        p.error("--peer-gguf goes with a single --model")
    if any(t < 1 for t in a.threads):
        p.error("threads must be >= 1")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import engine  # noqa: F401  (sets OPENBLAS_NUM_THREADS before numpy, too)
    from engine.llamacpp_peer import LlamaPeer

    t0 = time.perf_counter()
    peer, note = None, None
    if args.no_peer:
        note = "llama.cpp not run (--no-peer): our engine only."
    elif not os.path.exists(args.llama_python):
        note = f"llama.cpp not run: {args.llama_python} does not exist (see --llama-python); our engine only."
    else:
        peer = LlamaPeer(args.llama_python)
    if note:
        print(note, file=sys.stderr)
    try:
        mach = machine()
        results = []
        for name in args.model:
            paths = [] if peer is None else (args.peer_gguf or default_peers(name, peer))
            if peer is not None and not paths:
                print(f"[{name}] no llama.cpp GGUF found for it (--peer-gguf): our engine only", file=sys.stderr)
            results.append(bench_model(args, name, paths, peer))
    finally:
        if peer is not None:
            peer.close()
    text = report(args, argv, results, mach, peer.hello if peer else None, note)
    print(text)
    if not args.no_write:
        write_section(args.out, text)
        print(f"(written to {args.out}, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
