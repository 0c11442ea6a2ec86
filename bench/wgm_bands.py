"""The seed paper's dynamic grouping (WGM) on real matrices: time, its bit count against the honest
one, and reconstruction error against round-to-nearest at equal honest bits.

Run from the repository root (models from the catalog, cached under $LUTENGINE_HOME):

    python -m bench.wgm_bands                    # SmolLM2-135M layers 0, 15, 29 and one Qwen2.5 MLP matrix
    python -m bench.wgm_bands --layers 0 --no-qwen

Method
------
* WGM as the authors run it: 32 bands, windows of 64, lam = 0.75, over all of a
  matrix's nonzero weights (engine/quant/wgm.py). Time is the whole of
  wgm.bands (sort, prefix sums, merging) on one thread: BLAS pools are set to one
  thread before numpy loads, and the work is single-threaded numpy and Python.
  "cpu s" is the process CPU time, which other load on the machine does not inflate.
* Bits per weight: the paper's 1 + 16*G/N; honest fixed-width, a sign bit, a
  ceil(log2 G)-bit band index and the 16-bit band values; honest entropy-coded,
  the index at its empirical entropy.
* Error: ||W - W_hat||_F / ||W||_F. WGM's band values are float16, as counted.
  RTN is engine.quant.rtn's asymmetric grid with a float16 scale and offset per
  group, b + 32/G bits when the scale is stored once per group (the uniform
  layout of lutkernels/layout.py). Equal honest bits: 6-bit G = 32 costs 7.0,
  WGM's fixed-width count on these matrices (they hold a few hundred exact zeros,
  which the paper keeps as zeros: a 33rd symbol, so 6 index bits); 5-bit G = 32
  costs 6.0, the fixed-width count were the zeros folded into the lowest band;
  5-bit G = 64 costs 5.5, about the entropy-coded count. msb is the executable
  multi-scale binary form (engine/quant/msb.py): 3 bits of levels + sign = 4
  planes with per-plane scales at G = 64, 5.0 bits.
* The catalog models come as GGUF: SmolLM2 Q4_1 (4-bit grids in blocks of 32),
  Qwen Q4_K_M. Their weights already lie on coarse grids, which favours RTN with
  groups aligned to those blocks (G = 32).
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from engine.quant import binary, msb, rtn, wgm  # noqa: E402
from models.load import open_source  # noqa: E402

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QWEN_MATRIX = "model.layers.12.mlp.gate_proj.weight"
RTN = ((6, 32), (5, 32), (5, 64))
COLUMNS = ["model", "matrix", "shape", "zeros", "WGM s", "cpu s", "paper bits", "honest fixed", "honest entropy",
           "err WGM", "err RTN6 g32 (7.0 b)", "err RTN5 g32 (6.0 b)", "err RTN5 g64 (5.5 b)",
           "err msb b3 g64 (5.0 b)"]


def rel_err(W: np.ndarray, Wq: np.ndarray) -> float:
    return float(np.linalg.norm(Wq.astype(np.float64) - W) / np.linalg.norm(W.astype(np.float64)))


def row(model: str, name: str, W: np.ndarray) -> list[str]:
    W = np.ascontiguousarray(W, np.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    boundaries, means = wgm.bands(W, groups=32, window=64)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    fixed, entropy = wgm.honest_bits(boundaries, W.size)
    errs = [rel_err(W, wgm.dequantize(W, boundaries, means))]
    errs += [rel_err(W, rtn.reconstruct(rtn.codes(W, b, g))) for b, g in RTN]
    errs.append(rel_err(W, binary.reconstruct(msb.fit(W, 3, 64)[0])))
    short = name.removeprefix("model.").removesuffix(".weight")
    return [model, short, "x".join(map(str, W.shape)), str(W.size - int(boundaries[-1])), f"{wall:.2f}", f"{cpu:.2f}",
            f"{wgm.paper_bits(boundaries):.4f}", f"{fixed:.3f}", f"{entropy:.3f}"] + [f"{e:.4f}" for e in errs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29], help="SmolLM2 layers (default: 0 15 29)")
    ap.add_argument("--no-qwen", action="store_true", help="skip the Qwen2.5 matrix (loading it takes 2 GB)")
    args = ap.parse_args(argv)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(COLUMNS) - 2))
    src = open_source(SMOL, progress=False, tokenizer=False)
    for i in args.layers:
        for proj in PROJ:
            name = f"model.layers.{i}.{proj}.weight"
            print("| " + " | ".join(row("SmolLM2-135M", name, src.tensors[name])) + " |", flush=True)
    del src
    if not args.no_qwen:
        W = open_source(QWEN, progress=False, tokenizer=False).tensors[QWEN_MATRIX]
        print("| " + " | ".join(row("Qwen2.5-Coder-0.5B", QWEN_MATRIX, W)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
