"""The MLP rotation's decode cost: tg128 (../shared/PROTOCOL.md, 2 threads, one warm-up, median of 3,
alternating) of a rotated quantized file as it is and with the rotation call stubbed out (wrong
logits, same everything else). Run from the repository root:

    python -m bench.rotation_cost FILE
"""
import sys
import time

import numpy as np

import engine  # noqa: F401 (OpenBLAS thread setting)
import lutkernels as lk
from engine.model import Transformer
from engine.tokenizer import Tokenizer, read_text_file
from lutkernels import ops

ROUNDS = 3


def tg128(m: Transformer, first: int) -> float:
    """Tokens per second of 128 greedy decode steps after the first token."""
    m.reset()
    logits = m.forward([first], 0)
    t = time.perf_counter()
    for i in range(1, 129):
        logits = m.forward([int(logits.argmax())], i)
    return 128 / (time.perf_counter() - t)


def main(path: str) -> None:
    lk.set_threads(2)
    rotated = Transformer.from_qfile(path, max_context=512)
    bind = ops.bind_rotate
    ops.bind_rotate = lambda x, signs, mix: (lambda: None)
    try:
        stubbed = Transformer.from_qfile(path, max_context=512)
    finally:
        ops.bind_rotate = bind
    first = Tokenizer(rotated.tok).encode(read_text_file("../shared/data/wiki.txt"), add_bos=False)[0]
    tg128(rotated, first)
    tg128(stubbed, first)
    runs = {"rot": [], "stub": []}
    for _ in range(ROUNDS):
        runs["rot"].append(tg128(rotated, first))
        runs["stub"].append(tg128(stubbed, first))
    x, y = np.median(runs["rot"]), np.median(runs["stub"])
    print(f"tg128 2 threads: with rotation {x:.1f} tok/s, rotation stubbed {y:.1f} tok/s, ratio {x / y:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
