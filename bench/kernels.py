"""Kernel benchmark: LUT GEMV against numpy float32 and a streaming-read roofline.

Run from the repository root:

    python -m bench.kernels                  # full run, writes bench/RESULTS.md
    python -m bench.kernels --quick --no-write

Method
------
* Each thread count runs in its own subprocess with OPENBLAS_NUM_THREADS,
  OMP_NUM_THREADS and MKL_NUM_THREADS set before numpy is imported, and
  lutkernels.set_threads(n): numpy and the LUT kernels get the same number of
  threads, with no dependency on threadpoolctl.
* A layer is lutkernels.pack() of random +-1 planes with positive scales and
  offsets (as uniform round-to-nearest quantization gives), G = 128 where it
  divides K, else 64.
* Time per GEMV: the C entry point lut_gemm called with prebuilt pointers (the
  lutkernels.gemv wrapper's argument checks are measured separately and
  reported once). Warm-up, then blocks of calls (each block >= ~200 us, so
  the timer is not what is measured) until ~0.2 s and at least 5 blocks have
  run; the median over blocks is one measurement. numpy is
  np.matmul(W, x, out=y) with W float32 [M, K] C-contiguous, timed the same
  way in the same process.
* Rounds: all layers are built first, then every case is measured once per
  round (3 rounds); the report keeps each case's fastest round's median. On a
  shared 2-vCPU machine a stall of a few seconds (host contention, an idle
  OpenBLAS thread still spinning) then spoils at most one round. After the
  numpy measurements of each round the worker sleeps 0.3 s so that OpenBLAS's
  spinning threads park before the LUT pool runs again.
* "warm" (the main columns) repeats one layer, so small layers sit in cache.
  "cold" cycles through copies of the layer that together span >= 4x the L3
  cache, so every GEMV streams its weights from memory, as in decoding a model
  larger than the cache.
* Roofline: best of 3 full reads per round of a 1 GiB float32 buffer by
  lutkernels.kernels.stream_read (c/roofline.c, on the kernel thread pool at
  the same thread count). Roofline time = PackedLinear.nbytes() / bandwidth;
  "% roofline" = roofline time / kernel time.
* Interference over each thread count's run is reported from /proc/stat: CPU
  steal (the host took the vCPUs away) and the average number of cores other
  processes kept busy. Either spoils 2-thread numbers on a 2-core machine.
  Not caught by either: on a shared VM the 2-thread times of small in-cache
  layers have shifted by up to ~1.5x between whole runs (576x576 avx2: 5.0 or
  7.5 us, stable for minutes), probably where the host places the two vCPUs.
"""
import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time

SECTION = "## Kernels (bench/kernels)"
SHAPES = [(576, 576), (1536, 576), (576, 1536), (4864, 896), (896, 4864), (4096, 4096), (11008, 4096)]
PLANES = [1, 2, 3, 4]
THREADS = [1, 2]
QUICK = {"shapes": [(576, 576), (1536, 576)], "planes": [1, 2], "budget": 0.02, "stream_mib": 256}
COLUMNS = ["shape", "P", "G", "bpw", "ISA", "threads", "us/GEMV", "GB/s", "x numpy", "% roofline",
           "cold us/GEMV", "cold % roofline"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_TAG = "BENCH_JSON "


def group_size(K: int) -> int:
    return 128 if K % 128 == 0 else 64


def parse_shapes(s: str):
    out = []
    for item in s.split(","):
        m, _, k = item.strip().lower().partition("x")
        if not (m.isdigit() and k.isdigit()):
            raise argparse.ArgumentTypeError(f"shape must look like 576x576, got {item!r}")
        out.append((int(m), int(k)))
    return out


def parse_ints(s: str):
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=parse_shapes, help="comma-separated MxK (default: all 7 shapes)")
    p.add_argument("--planes", type=parse_ints, help="comma-separated plane counts (default 1,2,3,4)")
    p.add_argument("--isa", type=lambda s: s.split(","), help="comma-separated ISAs (default: all supported)")
    p.add_argument("--threads", type=parse_ints, help="comma-separated thread counts (default 1,2)")
    p.add_argument("--quick", action="store_true", help="fast smoke run: 2 shapes, P=1,2, short timings")
    p.add_argument("--budget", type=float, help="seconds of timing per measurement (default 0.2)")
    p.add_argument("--stream-mib", type=int, help="roofline buffer size in MiB (default 1024)")
    p.add_argument("--rounds", type=int, help="timing rounds; each case keeps its fastest round (default 3)")
    p.add_argument("--out", default=os.path.join("bench", "RESULTS.md"), help="results file (default bench/RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON config for one thread count
    a = p.parse_args(argv)
    q = a.quick
    a.shapes = a.shapes or (QUICK["shapes"] if q else SHAPES)
    a.planes = a.planes or (QUICK["planes"] if q else PLANES)
    a.threads = a.threads or THREADS
    a.budget = a.budget if a.budget is not None else (QUICK["budget"] if q else 0.2)
    a.stream_mib = a.stream_mib or (QUICK["stream_mib"] if q else 1024)
    a.rounds = a.rounds or (1 if q else 3)
    for M, K in a.shapes:
        if M < 1 or K < 32 or K % 32:
            p.error(f"shape {M}x{K}: K must be a positive multiple of 32")
    if any(not 1 <= P <= 8 for P in a.planes):
        p.error("planes must be 1..8")
    if any(t < 1 for t in a.threads):
        p.error("threads must be >= 1")
    return a


def cache_bytes(level: int, default: int) -> int:
    """Size of the CPU's cache of this level from sysfs (per instance), or default."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            d = os.path.join(base, idx)
            with open(os.path.join(d, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "size")) as f:
                s = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return default


# ---------------------------------------------------------------- worker ----

def time_calls(fn, budget: float, min_blocks: int = 5) -> float:
    """Median seconds per call of fn: warm-up, then blocks of calls of >= ~200 us each."""
    pc = time.perf_counter
    warm_end, n = pc() + min(0.02, budget / 4), 0
    while n < 3 or pc() < warm_end:  # warm-up: caches, branch predictors, the pool's threads awake
        t0 = pc()
        fn()
        single, n = pc() - t0, n + 1
    batch = max(1, min(10000, math.ceil(200e-6 / max(single, 1e-9))))
    per_call, total = [], 0.0
    while total < budget or len(per_call) < min_blocks:
        t0 = pc()
        for _ in range(batch):
            fn()
        dt = pc() - t0
        per_call.append(dt / batch)
        total += dt
    per_call.sort()
    n = len(per_call)
    return per_call[n // 2] if n % 2 else 0.5 * (per_call[n // 2 - 1] + per_call[n // 2])


def stream_seconds(lk_kernels, buf) -> float:
    """One full read of buf on the kernel thread pool, in seconds."""
    t0 = time.perf_counter()
    s = lk_kernels.stream_read(buf)
    dt = time.perf_counter() - t0
    if s != float(buf.size):  # the buffer holds ones
        raise RuntimeError(f"stream_read returned {s}, expected {buf.size}")
    return dt


def cpu_times():
    """(steal, busy, total) seconds over all CPUs from /proc/stat, this process's CPU seconds, and the
    wall clock; or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    v += [0] * (8 - len(v))
    total = sum(v[:8])
    busy = total - v[3] - v[4]  # all but idle and iowait
    t = os.times()
    return {"steal": v[7] / tick, "busy": busy / tick, "total": total / tick, "self": t.user + t.system,
            "wall": time.monotonic()}


def interference(c0, c1):
    """Steal fraction of all CPU time, and the average number of cores that other processes kept
    busy, between two cpu_times() samples."""
    if not c0 or not c1 or c1["total"] <= c0["total"]:
        return None, None
    steal = (c1["steal"] - c0["steal"]) / (c1["total"] - c0["total"])
    others = ((c1["busy"] - c0["busy"]) - (c1["self"] - c0["self"])) / max(c1["wall"] - c0["wall"], 1e-9)
    return steal, max(others, 0.0)


def run_worker(cfg: dict) -> dict:
    import numpy as np

    import lutkernels as lk
    from lutkernels import kernels as lkk
    from lutkernels.kernels import ffi, lib

    threads, budget, rounds = cfg["threads"], cfg["budget"], cfg["rounds"]
    supported = lk.supported_isas()
    isas = cfg["isas"] or supported
    bad = [i for i in isas if i not in supported]
    if bad:
        raise SystemExit(f"ISA(s) {', '.join(bad)} not supported here (supported: {', '.join(supported)})")
    lk.set_threads(threads)
    log = lambda msg: print(f"[threads={threads}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    cpu0 = cpu_times()

    # Everything is built first, then measured in rounds: each round times every case once and the
    # report keeps each case's fastest round, so a stall of a few seconds (another tenant of the
    # host, a descheduled vCPU) spoils at most one round of a case.
    stream = np.empty((cfg["stream_mib"] << 20) // 4, np.float32)
    stream.fill(1.0)  # touch every page before timing
    cold_bytes = max(4 * cache_bytes(3, 32 << 20), 64 << 20)
    rng = np.random.default_rng(0)
    shapes, cases = [], []
    for M, K in cfg["shapes"]:
        G = group_size(K)
        W = rng.standard_normal((M, K), dtype=np.float32)
        x = rng.standard_normal(K, dtype=np.float32)
        y = np.empty(M, np.float32)
        xp, yp = ffi.cast("const float *", ffi.from_buffer(x)), ffi.cast("float *", ffi.from_buffer(y))
        shapes.append({"M": M, "K": K, "W": W, "x": x, "y": y, "times": []})
        for P in cfg["planes"]:
            planes = rng.integers(0, 2, (P, M, K), dtype=np.int8) * 2 - 1
            scales = rng.uniform(0.01, 0.1, (P, M, K // G)).astype(np.float32)
            offsets = rng.uniform(-0.1, 0.1, (M, K // G)).astype(np.float32)
            w = lk.pack(planes, scales, offsets)
            ref = lk.dense(w) @ x if M * K <= (1 << 20) else None
            del planes
            layer = lk.Layer(w)
            ncopies = max(2, math.ceil(cold_bytes / w.nbytes()))
            copies = [lk.Layer(lk.PackedLinear(M, K, P, G, w.planes.copy(), w.scales.copy(), w.offsets.copy()))
                      for _ in range(ncopies)]
            for isa in isas:
                lk.set_isa(isa)
                rc = lib.lut_gemm(layer.c, xp, 1, yp, 0, ffi.NULL)
                if rc != 0:
                    raise RuntimeError(f"lut_gemm failed with code {rc}")
                if ref is not None:  # a benchmark of a wrong kernel is worthless
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    if not err < 0.05:
                        raise RuntimeError(f"{M}x{K} P={P} {isa}: relative error {err:.3g} vs dense reference")
                cases.append({"shape": shapes[-1], "P": P, "G": G, "isa": isa, "w": w, "layer": layer,
                              "copies": copies, "xp": xp, "yp": yp, "warm": [], "cold": []})
    log(f"built {len(cases)} cases; {rounds} round(s) of ~{budget:g} s per measurement")
    time.sleep(0.3)  # let OpenBLAS threads woken by the reference check park (see the end of a round)

    best_stream, wrapper_us = 0.0, None
    for rnd in range(rounds):
        stream_seconds(lkk, stream)  # untimed: wakes the pool's workers and lets them settle on their cores
        for _ in range(3):  # best of 3 full reads per round, and of all rounds
            best_stream = max(best_stream, stream.nbytes / stream_seconds(lkk, stream))
        for c in cases:
            lk.set_isa(c["isa"])
            layer, xp, yp = c["layer"], c["xp"], c["yp"]
            c["warm"].append(time_calls(lambda: lib.lut_gemm(layer.c, xp, 1, yp, 0, ffi.NULL), budget))
            cptrs, it = [L.c for L in c["copies"]], iter(range(1 << 62))
            n = len(cptrs)
            c["cold"].append(time_calls(lambda: lib.lut_gemm(cptrs[next(it) % n], xp, 1, yp, 0, ffi.NULL), budget))
            if wrapper_us is None:  # cost of the Python gemv wrapper over the raw call (first case)
                x, y = c["shape"]["x"], c["shape"]["y"]
                wrapper_us = (time_calls(lambda: lk.gemv(layer, x, out=y), budget) - c["warm"][-1]) * 1e6
        for sh in shapes:
            W, x, y = sh["W"], sh["x"], sh["y"]
            sh["times"].append(time_calls(lambda: np.matmul(W, x, out=y), budget))
        # After a call OpenBLAS's worker threads spin (sched_yield) for ~0.1 s before they sleep; on
        # a 2-core machine they share a core with the LUT pool's worker and halve its speed.
        time.sleep(0.3)
        log(f"round {rnd + 1}/{rounds} done; roofline so far {best_stream / 1e9:.1f} GB/s")
    del stream

    rows = []
    for c in cases:
        sh, w = c["shape"], c["w"]
        rows.append({"M": sh["M"], "K": sh["K"], "P": c["P"], "G": c["G"], "bpw": w.bits_per_weight(),
                     "nbytes": w.nbytes(), "isa": c["isa"], "threads": threads, "us": min(c["warm"]) * 1e6,
                     "cold_us": min(c["cold"]) * 1e6, "numpy_us": min(sh["times"]) * 1e6,
                     "ncopies": len(c["copies"]),
                     "spread": max(c["warm"]) / min(c["warm"])})
        r = rows[-1]
        log(f"{r['M']}x{r['K']} P={r['P']} {r['isa']}: {r['us']:.1f} us (cold {r['cold_us']:.1f}), "
            f"numpy {r['numpy_us']:.1f} us; rounds (warm, us): " + ", ".join(f"{t * 1e6:.1f}" for t in c["warm"]))
    steal, others = interference(cpu0, cpu_times())
    return {"threads": threads, "bandwidth": best_stream, "rows": rows, "supported": supported,
            "wrapper_us": wrapper_us, "cold_bytes": cold_bytes, "numpy": numpy_info(np), "steal": steal,
            "others": others, "rounds": rounds}


def numpy_info(np) -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"numpy {np.__version__} ({blas.get('name')} {blas.get('version')})"
    except Exception:
        return f"numpy {np.__version__}"


# ---------------------------------------------------------------- parent ----

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def run_thread_count(args, threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cfg = {"threads": threads, "shapes": args.shapes, "planes": args.planes, "isas": args.isa,
           "budget": args.budget, "stream_mib": args.stream_mib, "rounds": args.rounds}
    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "--worker", json.dumps(cfg)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"benchmark worker for {threads} thread(s) failed with exit code {proc.returncode}")
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_TAG):
            return json.loads(line[len(JSON_TAG):])
    raise SystemExit(f"benchmark worker for {threads} thread(s) printed no results")


def fmt_row(r: dict, bw: float) -> list:
    roof_s = r["nbytes"] / bw
    return [f"{r['M']}x{r['K']}", str(r["P"]), str(r["G"]), f"{r['bpw']:.2f}", r["isa"], str(r["threads"]),
            f"{r['us']:.1f}", f"{r['nbytes'] / (r['us'] * 1e-6) / 1e9:.1f}", f"{r['numpy_us'] / r['us']:.2f}",
            f"{100 * roof_s / (r['us'] * 1e-6):.0f}%", f"{r['cold_us']:.1f}",
            f"{100 * roof_s / (r['cold_us'] * 1e-6):.0f}%"]


def targets(results: list, supported: list) -> list:
    bw = {res["threads"]: res["bandwidth"] for res in results}
    rows = [r for res in results for r in res["rows"]]
    order = ["scalar", "neon", "avx2", "avx512"]
    measured = {r["isa"] for r in rows}
    best = max(measured, key=order.index) if measured else None

    def find(M, K, P, threads, isa=best):
        return next((r for r in rows if (r["M"], r["K"], r["P"], r["threads"], r["isa"]) == (M, K, P, threads, isa)),
                    None)

    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    out = []
    r = find(11008, 4096, 2, 2)
    if r:
        roof = r["nbytes"] / bw[2]
        warm, cold = 100 * roof / (r["us"] * 1e-6), 100 * roof / (r["cold_us"] * 1e-6)
        out.append(f"- 11008x4096 P=2, 2 threads, {best}: {warm:.0f}% of roofline warm, {cold:.0f}% cold "
                   f"(target >= 85%): {verdict(warm >= 85)} warm, {verdict(cold >= 85)} cold")
    else:
        out.append("- 11008x4096 P=2, 2 threads: not measured in this run")
    for M, K in [(1536, 576), (4864, 896)]:
        for P, goal in [(2, 5.0), (1, 8.0)]:
            r = find(M, K, P, 1)
            if r:
                sp = r["numpy_us"] / r["us"]
                out.append(f"- {M}x{K} P={P}, 1 thread, {best}: {sp:.2f}x numpy "
                           f"(target >= {goal:.0f}x): {verdict(sp >= goal)}")
            else:
                out.append(f"- {M}x{K} P={P}, 1 thread: not measured in this run")
    if "avx512" not in supported:
        out.append("- AVX-512 vs AVX2 on in-cache shapes: not measurable: CPU lacks AVX-512")
    else:
        l2 = cache_bytes(2, 1 << 20)
        ratios = [a["us"] / b["us"] for a in rows if a["isa"] == "avx2" and a["nbytes"] <= l2
                  for b in [find(a["M"], a["K"], a["P"], a["threads"], "avx512")] if b]
        if ratios:
            gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
            out.append(f"- AVX-512 vs AVX2 on in-cache shapes (packed layer <= L2 {l2 >> 10} KiB, warm): "
                       f"AVX-512 is {gm:.2f}x AVX2 speed (geometric mean of {len(ratios)}, "
                       f"range {min(ratios):.2f}-{max(ratios):.2f})")
        else:
            out.append("- AVX-512 vs AVX2 on in-cache shapes: not measured in this run (needs both ISAs)")
    return out


def report(args, argv, results: list) -> str:
    first = results[0]
    supported = first["supported"]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ncpu = os.cpu_count()
    try:
        navail = len(os.sched_getaffinity(0))
    except AttributeError:
        navail = ncpu
    l3 = cache_bytes(3, 0)
    spreads = sorted(r["spread"] for res in results for r in res["rows"]) or [1.0]
    spread_med, spread_max = spreads[len(spreads) // 2], spreads[-1]
    cmd = "python -m bench.kernels" + ("" if not argv else " " + shlex.join(argv))
    lines = [SECTION, "",
             f"Command: `{cmd}`", "",
             f"Machine: {cpu_model()}, {ncpu} logical CPUs ({navail} available), ISAs: {', '.join(supported)}"
             + (f", L3 {l3 >> 20} MiB" if l3 else "") + f"; {first['numpy']}; {date}", "",
             "Roofline (streaming read of a {} MiB float32 buffer, best of 3 reads per round, c/roofline.c on "
             "the kernel pool): ".format(args.stream_mib)
             + ", ".join(f"{res['threads']} thread{'s' if res['threads'] > 1 else ''} "
                         f"{res['bandwidth'] / 1e9:.1f} GB/s" for res in results) + ". Interference during the run: "
             + "; ".join(f"{res['threads']}T " + ("n/a" if res["steal"] is None else
                                                  f"CPU steal {100 * res['steal']:.1f}%, other processes "
                                                  f"{res['others']:.2f} cores")
                         for res in results)
             + f". Round-to-round spread of warm times (slowest/fastest round): median {spread_med:.2f}x, "
             f"max {spread_max:.2f}x.", "",
             "Method: time per GEMV of the raw C call (lut_gemm, fast mode, prebuilt descriptor and "
             "pointers; the lutkernels.gemv Python wrapper adds "
             + (f"{first['wrapper_us']:.1f} us" if first["wrapper_us"] is not None else "a few us")
             + " per call): median over >= 5 timed blocks of calls after warm-up, "
             f"~{args.budget:g} s per measurement, fastest of {first['rounds']} round(s) (every case once per round). "
             "GB/s = PackedLinear.nbytes() / time. x numpy = time of np.matmul(W, x) "
             "(float32 W [M, K], same process, same thread count: each thread count is a subprocess with "
             "OPENBLAS/OMP/MKL_NUM_THREADS set before numpy is imported) / LUT time. % roofline = "
             "(nbytes / roofline bandwidth) / time. Warm columns repeat one layer (small layers stay in cache); "
             f"cold columns cycle through copies spanning >= {first['cold_bytes'] >> 20} MiB (>= 4x L3), so weights "
             "come from memory. Layers: lutkernels.pack of random +-1 planes with fp16 scales and offsets, "
             "G = 128 if it divides K else 64. On a shared VM the 2-thread times of small in-cache layers "
             "have shifted by up to ~1.5x between whole runs (host placement of the vCPUs), which neither the "
             "rounds nor the interference figures catch.", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i in (0, 4) else "---:" for i in range(len(COLUMNS))) + "|")
    by_threads = {res["threads"]: res for res in results}
    order = {isa: i for i, isa in enumerate(["scalar", "neon", "avx2", "avx512"])}
    allrows = [r for res in results for r in res["rows"]]
    shape_order = {s: i for i, s in enumerate(args.shapes)}
    allrows.sort(key=lambda r: (shape_order[(r["M"], r["K"])], r["P"], order.get(r["isa"], 9), r["threads"]))
    for r in allrows:
        lines.append("| " + " | ".join(fmt_row(r, by_threads[r["threads"]]["bandwidth"])) + " |")
    lines += ["", "### Targets", ""] + targets(results, supported) + [""]
    return "\n".join(lines)


def write_section(path: str, section: str) -> None:
    """Put section into the markdown file at path, replacing an existing section of the same
    heading (up to the next level-1 or level-2 heading) and keeping everything else."""
    try:
        with open(path) as f:
            lines = f.read().rstrip("\n").split("\n")
    except FileNotFoundError:
        lines = ["# lutengine benchmark results"]
    body = section.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        lines += [""] + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "# "))), len(lines))
        lines = lines[:start] + body + ([""] + lines[end:] if end < len(lines) else [])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        cfg["shapes"] = [tuple(s) for s in cfg["shapes"]]
        res = run_worker(cfg)
        print(JSON_TAG + json.dumps(res), flush=True)
        return 0
    t0 = time.perf_counter()
    results = [run_thread_count(args, t) for t in args.threads]
    text = report(args, argv, results)
    print(text)
    if not args.no_write:
        write_section(args.out, text)
        print(f"(written to {args.out}, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
