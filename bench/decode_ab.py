"""Fused against unfused decode step (engine/model.py bind_linears), paired runs in one process.

    python -m bench.decode_ab [--model M ...] [--threads 1 2] [--runs 21] [--n 32]

The two decoders of one loaded model alternate run by run (tgN greedy from the first token of
wiki), so both see the same host: on a machine shared with other jobs the paired ratio (median
of fused/unfused over adjacent runs) is far steadier than either median. % roofline as
bench/speed.py: stream-read bandwidth at T threads / bytes read per token (engine.bench.ours_bytes).
"""
import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["smollm2-135m-instruct"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=21, help="paired runs per thread count (default %(default)s)")
    p.add_argument("--n", type=int, default=32, help="decode steps per run (default %(default)s)")
    p.add_argument("--stream-mib", type=int, default=1024, help="roofline buffer (default %(default)s MiB)")
    a = p.parse_args(argv)

    import engine
    import lutkernels as lk
    from bench.kernels import stream_seconds
    from engine import model as em
    from engine.bench import ours_bytes

    buf = np.ones((a.stream_mib << 20) // 4, np.float32)
    for name in a.model:
        tr = engine.load(name, max_context=a.n + 2).transformer
        nbytes = ours_bytes(tr)["total"]
        decoders = {"unfused": em._Decoder(tr, fuse=False), "fused": em._Decoder(tr, fuse=True)}
        first = 1

        def tg(dec):
            tr._decoder = dec
            tr.reset()
            tok = int(np.argmax(tr.forward([first], 0)))
            t0 = time.perf_counter()
            for i in range(a.n):
                tok = int(np.argmax(tr.forward([tok], i + 1)))
            return a.n / (time.perf_counter() - t0)

        print(f"{name}: isa {lk.get_isa()}, {nbytes / 1e6:.2f} MB read per token", flush=True)
        for T in a.threads:
            lk.set_threads(T)
            stream_seconds(lk.kernels, buf)
            bw = max(buf.nbytes / stream_seconds(lk.kernels, buf) for _ in range(3))
            roof = bw / nbytes
            runs = {k: [] for k in decoders}
            for _ in range(a.runs):
                for k, dec in decoders.items():
                    runs[k].append(tg(dec))
            ratio = statistics.median(f / u for f, u in zip(runs["fused"], runs["unfused"]))
            cols = ", ".join(f"{k} {statistics.median(v):.1f} tok/s ({100 * statistics.median(v) / roof:.0f}%)"
                             for k, v in runs.items())
            print(f"  T={T}: stream {bw / 1e9:.1f} GB/s, roofline {roof:.1f} tok/s; tg{a.n} medians of {a.runs}: "
                  f"{cols}; paired fused/unfused {ratio:.3f}", flush=True)
        tr._decoder = decoders["fused"]


if __name__ == "__main__":
    main()
