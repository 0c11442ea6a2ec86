"""One-token GEMV time of two builds of the kernels, alternating in one run: this checkout's and
another checkout's (its own venv's python), on the default format's layers.

    python -m bench.gemv_ab --other /path/to/other/venv/bin/python [--rounds 3] [--calls 200]

(each venv with its checkout installed editable, `pip install -e`)

Each round times every shape once in each build (a child process per build and round, the
builds alternating), 1 kernel thread, CPU time of the calling thread, best of 5 x `calls`
calls; a shape's figure is its best round. Layers as bench/gemm_pp makes them (uniform 4-bit
planes, G = 32, 8-bit scales, integer grid), SmolLM2-135M's and Qwen2.5-0.5B's shapes.
"""
import argparse
import json
import subprocess
import sys
import tempfile

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4864, 896), (896, 4864)]

CHILD = """
import json, sys, time
import numpy as np
import lutkernels as lk
lk.set_threads(1)
rng = np.random.default_rng(0)
out = {}
for M, K in SHAPES:
    planes = rng.choice(np.array([-1, 1], np.int8), size=(4, M, K))
    h = rng.uniform(0.01, 0.02, size=(1, M, K // 32)).astype(np.float32)
    L = lk.Layer(lk.pack(planes, h, None, uniform=True, scale8=True, int_grid=True))
    x, y = rng.standard_normal((1, K)).astype(np.float32), np.empty((1, M), np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.thread_time()
        for _ in range(CALLS):
            lk.gemm(L, x, out=y)
        best = min(best, (time.thread_time() - t) / CALLS)
    out[f"{M}x{K}"] = best
print(json.dumps(out))
"""


def run(python: str, calls: int) -> dict:
    """Times in a child of `python`, run outside any checkout so it imports its own venv's build."""
    code = f"SHAPES = {SHAPES!r}\nCALLS = {calls}\n" + CHILD
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(), check=True)
    return json.loads(p.stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--other", required=True, help="python of the other build's venv")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()
    best = {"this": {}, "other": {}}
    for _ in range(a.rounds):
        for name, py in (("this", sys.executable), ("other", a.other)):
            for shape, t in run(py, a.calls).items():
                best[name][shape] = min(best[name].get(shape, float("inf")), t)
    print("| shape | this build us | other build us | this / other time |")
    print("|---|---:|---:|---:|")
    for shape in best["this"]:
        t, o = best["this"][shape], best["other"][shape]
        print(f"| {shape} | {t * 1e6:.1f} | {o * 1e6:.1f} | {t / o:.3f} |")


if __name__ == "__main__":
    main()
