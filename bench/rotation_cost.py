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
f = sys.argv[1]
lk.set_threads(2)
a = Transformer.from_qfile(f, max_context=512)
orig = ops.bind_rotate
ops.bind_rotate = lambda x, s, m: (lambda: None)
b = Transformer.from_qfile(f, max_context=512)
ops.bind_rotate = orig
first = Tokenizer(a.tok).encode(read_text_file("../shared/data/wiki.txt"), add_bos=False)[0]
def tg128(m):
    m.reset(); logits = m.forward([first], 0)
    t = time.perf_counter()
    for i in range(1, 129):
        logits = m.forward([int(logits.argmax())], i)
    return 128 / (time.perf_counter() - t)
tg128(a); tg128(b)
r = {"rot": [], "stub": []}
for _ in range(3):
    r["rot"].append(tg128(a)); r["stub"].append(tg128(b))
x, y = np.median(r["rot"]), np.median(r["stub"])
print(f"tg128 2 threads: with rotation {x:.1f} tok/s, rotation stubbed {y:.1f} tok/s, ratio {x/y:.3f}")
