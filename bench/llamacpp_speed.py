"""llama.cpp (peer engine) speed per bench PROTOCOL.md "Speed", via llama-cpp-python.

Run with the llama venv's python (not lutengine's):

    /work/llama-venv/bin/python bench/llamacpp_speed.py \
        --gguf /work/cache/models/smollm2-135m-instruct.gguf \
        --q4_0 /work/cache/llamacpp/smollm2-135m-instruct-Q4_0.gguf \
        --text /work/shared/data/wiki.txt --out bench/llamacpp_speed.json

Variants: the GGUF as is, and a Q4_0 requantized from it by llama.cpp's own
quantizer (llama_model_quantize, allow_requantize; created if missing).

Tests (each: one warm-up, then --runs runs, median reported):
  tg128  from an empty cache feed the first token of the text (untimed), then
         128 greedy (argmax) decode steps ignoring EOS; only the 128 steps are
         timed, each ending when its logits are ready; tok/s = 128 / time.
  pp128, pp512  one forward pass over the first N tokens of the text from an
         empty cache; tok/s = N / time.
Threads 1 and 2 (n_threads = n_threads_batch = T), n_batch = 512.
The machine is shared: each timed run records the CPU used by other processes
meanwhile; runs are repeated (tests alternating, up to --max-rounds rounds) until
each test has --runs clean runs, and the median of those is reported.
"""

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script, too
from bench.llamacpp_ref import command_line, sha256_file  # noqa: E402

N_CTX = 512
N_BATCH = 512


@contextmanager
def capture_fd2(path):
    """Redirect the C-level stderr (fd 2) to a file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def machine_line():
    model, flags = "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = [x for x in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                       "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16") if x in flags]
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "isa_flags": isa,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat():
    """(busy jiffies of the whole machine, steal jiffies, total jiffies)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
    return busy, v[7], sum(v)


class Interference:
    """CPU used by other processes (in cores) and steal over an interval."""

    def __enter__(self):
        self.s0 = read_stat()
        self.c0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        s1 = read_stat()
        wall = time.perf_counter() - self.t0
        own = time.process_time() - self.c0
        busy = (s1[0] - self.s0[0]) / CLK_TCK
        self.other_cores = max(0.0, (busy - own) / max(wall, 1e-9))
        self.steal_pct = 100.0 * (s1[1] - self.s0[1]) / max(1, s1[2] - self.s0[2])
        return False


def wait_quiet(limit_cores, max_wait_s):
    """Wait (up to max_wait_s) until other processes use < limit_cores over 0.5 s."""
    t0 = time.time()
    while True:
        with Interference() as it:
            time.sleep(0.5)
        if it.other_cores < limit_cores or time.time() - t0 > max_wait_s:
            return round(time.time() - t0, 1)


def quantize(src, dst, log_path, nthread, ftype="Q4_0"):
    """Requantize src into dst with llama.cpp's quantizer; ftype is a LLAMA_FTYPE_MOSTLY_* suffix."""
    import llama_cpp
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
    params.allow_requantize = True
    params.nthread = nthread
    t0 = time.time()
    with capture_fd2(log_path):
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit("llama_model_quantize failed rc=%d (log %s)" % (rc, log_path))
    return {
        "function": "llama_cpp.llama_model_quantize",
        "ftype": "LLAMA_FTYPE_MOSTLY_" + ftype,
        "allow_requantize": True,
        "nthread": nthread,
        "source": src,
        "seconds": round(time.time() - t0, 2),
        "log": log_path,
    }


def model_info(path):
    """Load once verbosely and keep llama.cpp's summary lines (tensor types, size)."""
    from llama_cpp import Llama
    fd, log = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    with capture_fd2(log):
        llm = Llama(model_path=path, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1,
                    verbose=True)
        del llm
    keep = []
    with open(log, errors="replace") as f:
        for line in f:
            if re.search(r"- type +\w+:|file type|file size|model params|CPU_REPACK|system_info", line):
                keep.append(line.rstrip())
    os.unlink(log)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
        "llama_load_summary": keep,
    }


class Runner:
    def __init__(self, path, threads):
        from llama_cpp import Llama
        import llama_cpp
        self.llm = Llama(model_path=path, n_ctx=N_CTX, n_batch=N_BATCH, n_ubatch=N_BATCH,
                         n_threads=threads, n_threads_batch=threads,
                         logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self._ctx = self.llm._ctx.ctx
        self._get = llama_cpp.llama_get_logits_ith

    def last_logits(self):
        p = self._get(self._ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,))

    def pp(self, ids):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        self.last_logits()[0]  # logits ready (llama_get_logits_ith synchronizes)
        return time.perf_counter() - t0

    def tg(self, first, n=128):
        llm = self.llm
        llm.reset()
        llm.eval([first])
        tok = int(np.argmax(self.last_logits()))
        out = []
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = int(np.argmax(self.last_logits()))
            out.append(tok)
        dt = time.perf_counter() - t0
        return dt, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="source GGUF, measured as is")
    ap.add_argument("--model", help="catalog name (default: GGUF file stem)")
    ap.add_argument("--q4_0", help="path of the llama.cpp-requantized Q4_0 GGUF (made if missing)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=0.15,
                    help="a run counts as clean if other processes used fewer cores than this")
    ap.add_argument("--max-rounds", type=int, default=12)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import llama_cpp
    model = args.model or os.path.splitext(os.path.basename(args.gguf))[0]
    result = {
        "engine": "llama.cpp via llama-cpp-python",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "machine": machine_line(),
        "model": model,
        "text": os.path.basename(args.text),
        "settings": {"n_ctx": N_CTX, "n_batch": N_BATCH, "n_ubatch": N_BATCH,
                     "n_threads": "T", "n_threads_batch": "T", "logits_all": False,
                     "warmup": 1, "runs": args.runs, "statistic": "median",
                     "clean_run": "other processes used < %g cores during the run "
                                  "(/proc/stat busy minus own CPU time); up to %d rounds"
                                  % (args.quiet, args.max_rounds)},
        "command": command_line(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "variants": [],
    }

    variants = [("as-is", args.gguf, None)]
    if args.q4_0:
        qinfo = None
        if not os.path.exists(args.q4_0):
            qinfo = quantize(args.gguf, args.q4_0, args.q4_0 + ".quantize.log", 2)
        variants.append(("Q4_0 (llama.cpp requant)", args.q4_0, qinfo))

    with open(args.text, encoding="utf-8") as f:
        text = f.read()

    for name, path, qinfo in variants:
        vinfo = {"variant": name, "file": model_info(path), "quantize": qinfo, "results": []}
        print("== %s %s" % (name, path), flush=True)
        for T in args.threads:
            r = Runner(path, T)
            ids = r.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:512]
            ids = [int(t) for t in ids]
            tests = {
                "tg128": lambda: r.tg(ids[0], 128),
                "pp128": lambda: (r.pp(ids[:128]), None),
                "pp512": lambda: (r.pp(ids[:512]), None),
            }
            ntok = {"tg128": 128, "pp128": 128, "pp512": 512}
            runs = {k: [] for k in tests}  # every timed attempt: (seconds, other_cores, steal%)
            gen = None
            waited = 0.0
            # Round 0 is the warm-up; then rounds (tests alternating) until every test has
            # args.runs clean runs (other processes < args.quiet cores) or args.max_rounds.
            for rep in range(1 + args.max_rounds):
                need = [k for k in tests
                        if sum(1 for x in runs[k] if x[1] < args.quiet) < args.runs]
                if rep > 0 and not need:
                    break
                waited += wait_quiet(args.quiet, 30)
                for k in (tests if rep == 0 else need):
                    with Interference() as it:
                        dt, toks = tests[k]()
                    if toks is not None:
                        gen = toks
                    if rep > 0:
                        runs[k].append((dt, it.other_cores, it.steal_pct))
            for k in tests:
                clean = [x for x in runs[k] if x[1] < args.quiet]
                used = clean[:args.runs] if len(clean) >= args.runs else sorted(
                    runs[k], key=lambda x: x[1])[:args.runs]
                med = statistics.median([x[0] for x in used])
                row = {
                    "test": k, "threads": T,
                    "tok_s": round(ntok[k] / med, 2),
                    "median_s": round(med, 6),
                    "runs_s": [round(x[0], 6) for x in used],
                    "runs_tok_s": [round(ntok[k] / x[0], 2) for x in used],
                    "runs_other_cores": [round(x[1], 3) for x in used],
                    "runs_steal_pct": [round(x[2], 2) for x in used],
                    "clean": len(clean) >= args.runs,
                    "attempts": len(runs[k]),
                    "rejected_tok_s": [round(ntok[k] / x[0], 2) for x in runs[k] if x not in used],
                }
                vinfo["results"].append(row)
                print("  T=%d %-6s %8.2f tok/s  (runs %s; other cores %s; attempts %d%s)" % (
                    T, k, row["tok_s"], ", ".join("%.1f" % x for x in row["runs_tok_s"]),
                    ", ".join("%.2f" % x for x in row["runs_other_cores"]), row["attempts"],
                    "" if row["clean"] else ", NOT CLEAN"), flush=True)
            vinfo.setdefault("tg128_first_token", ids[0])
            vinfo.setdefault("tg128_generated_ids", {})[str(T)] = gen
            vinfo.setdefault("waited_for_quiet_s", {})[str(T)] = waited
            del r
        result["variants"].append(vinfo)

    result["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
