"""Decode speed per KV cache type: tg128 after a prompt of START tokens, the types alternating
run by run in one process (bench/RESULTS.md "KV cache types").

    python -m bench.kv_speed [--types f32,f16,q8] [--threads 1] [--start 0 1024] [--runs 5]

Per PROTOCOL.md's tg128, but from START positions (the prompt untimed), so attention reads a
long cache; one warm-up round. Reports the median of wall-clock and of process CPU time: on
a machine shared with other jobs the CPU time is the steadier of the two.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--text", default="/work/shared/data/wiki.txt")
    p.add_argument("--types", default="f32,f16,q8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--start", type=int, nargs="+", default=[0, 1024])
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args(argv)
    from engine import load

    types = a.types.split(",")
    models = {t: load(a.model, threads=a.threads, max_context=max(a.start) + 130, kv_type=t) for t in types}
    with open(a.text, encoding="utf-8") as f:
        ids = models[types[0]].tokenize(f.read()[:50_000])
    for start in a.start:
        prompt = ids[:max(start, 1)]
        wall, cpu = {t: [] for t in types}, {t: [] for t in types}
        for r in range(a.runs + 1):
            for t in types:
                m = models[t].transformer
                m.reset()
                logits = m.forward(prompt, 0)
                w0, c0 = time.perf_counter(), time.process_time()
                for i in range(128):
                    logits = m.forward([int(np.argmax(logits))], len(prompt) + i)
                if r:  # round 0 warms up
                    wall[t].append(128 / (time.perf_counter() - w0))
                    cpu[t].append(128 / (time.process_time() - c0))
        for t in types:
            print(f"kv {t}: threads {a.threads}, cache {len(prompt)}..{len(prompt) + 127}: tg128 median "
                  f"{statistics.median(wall[t]):.1f} tok/s wall, {statistics.median(cpu[t]):.1f} tok per CPU-second "
                  f"({a.runs} runs)")


if __name__ == "__main__":
    main()
