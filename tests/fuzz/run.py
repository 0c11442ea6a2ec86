"""Run a fuzz target: python -m tests.fuzz.run --target gguf --inputs 100000 [--seed 0] [--atheris].

Without --atheris the inputs are the corpus seeds, then tests/fuzz/mutate.py's
mutations of them from one seeded RNG (deterministic: the test suite's short runs).
With --atheris, libFuzzer picks and mutates the inputs, guided by coverage of the
models package, half of the time through the same structure-aware mutator.
Either way each input must finish within the hang limit (2 s), under an address-space
limit (a lying size that allocates fails as MemoryError), and load or raise a
one-line ModelError naming its file; any other outcome is printed and the input is
saved under --crashes. The last line is a JSON summary (libFuzzer's statistics with --atheris).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
HANG_S = 2.0
NAMES = ("gguf", "gguf_tokenizer", "qfile", "hf")  # targets.TARGETS, named before atheris instruments it


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"input ran past {HANG_S} s")


def limit_memory(headroom_mb: int) -> None:
    """Cap the address space at what the process maps now plus headroom_mb."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    limit = vm + (headroom_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / target).iterdir()) if p.is_file()]


def save(crashes: Path, target: str, data: bytes) -> Path:
    crashes.mkdir(parents=True, exist_ok=True)
    path = crashes / f"{target}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def check(target, data: bytes, alarm: bool = True) -> str | None:
    """targets.outcome with the hang rule: a SIGALRM interrupts Python code, a clock catches the rest."""
    from .targets import outcome

    if alarm:
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
    start = time.perf_counter()
    try:
        failure = outcome(target, data)
    except Hang as e:  # raised between the target's return and the timer's reset
        failure = f"hang: {e}"
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    elapsed = time.perf_counter() - start
    if failure and failure.startswith("Hang:"):
        failure = f"hang: input ran past {HANG_S} s"
    elif failure is None and elapsed > HANG_S and len(data) < 1 << 20:
        failure = f"hang: input took {elapsed:.2f} s"
    return failure


def campaign(name: str, inputs: int, seed: int = 0, crashes: Path | None = None, log=print) -> dict:
    """The deterministic campaign: every seed once, then mutated seeds up to `inputs` inputs."""
    from .mutate import Mutator
    from .targets import TARGETS

    target = TARGETS[name]
    corpus = seeds(name)
    mutator = Mutator(target.kind, corpus, seed)
    signal.signal(signal.SIGALRM, _alarm)
    failures, start = [], time.perf_counter()
    for i in range(inputs):
        data = corpus[i] if i < len(corpus) else mutator()
        failure = check(target, data)
        if failure:
            saved = save(crashes, name, data) if crashes else None
            failures.append({"input": i, "failure": failure, "saved": str(saved) if saved else None})
            log(f"FAIL input {i}: {failure}" + (f" (saved {saved})" if saved else ""))
    seconds = time.perf_counter() - start
    return {"target": name, "inputs": inputs, "seconds": round(seconds, 2),
            "exec_per_s": round(inputs / seconds, 1), "failures": failures, "seed": seed}


def atheris_campaign(name: str, inputs: int, seed: int, crashes: Path) -> None:
    """libFuzzer over the target: prints each failure as it happens; libFuzzer prints the runs and exec/s
    at the end (it exits without returning, so there is no JSON summary)."""
    import atheris

    with atheris.instrument_imports(include=["models"]):
        from .targets import TARGETS
    from .mutate import Mutator

    target = TARGETS[name]
    mutator = Mutator(target.kind, seeds(name), seed)
    count = [0]

    def one(data: bytes) -> None:
        count[0] += 1
        failure = check(target, data, alarm=False)  # libFuzzer's -timeout owns SIGALRM
        if failure:
            print(f"FAIL input {count[0]}: {failure} (saved {save(crashes, name, data)})", flush=True)

    def mutate(data: bytes, max_size: int, rng_seed: int) -> bytes:
        if rng_seed % 2:
            return atheris.Mutate(data, max_size)
        import random
        return mutator.mutate(data, random.Random(rng_seed))[:max_size]

    corpus_dir = crashes / f"atheris-corpus-{name}"  # libFuzzer adds the inputs it keeps here
    corpus_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], str(corpus_dir), str(CORPUS / name), f"-runs={inputs}", f"-seed={seed + 1}",
            f"-timeout={int(HANG_S)}", f"-max_len={1 << 20}", "-rss_limit_mb=4096", "-print_final_stats=1",
            f"-artifact_prefix={crashes}/{name}-"]
    atheris.Setup(argv, one, custom_mutator=mutate)
    atheris.Fuzz()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, choices=NAMES)
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"), help="where failing inputs are saved")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space allowed beyond the start's")
    p.add_argument("--atheris", action="store_true", help="coverage-guided, with libFuzzer (pip install atheris)")
    a = p.parse_args(argv)
    limit_memory(a.memory_mb)
    if a.atheris:
        atheris_campaign(a.target, a.inputs, a.seed, a.crashes.resolve())
        return 0
    result = campaign(a.target, a.inputs, a.seed, a.crashes)
    print(json.dumps({**result, "failures": len(result["failures"])}))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
