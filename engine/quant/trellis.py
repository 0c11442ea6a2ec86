"""Trellis-coded quantization (lutkernels/trellis.py is the format): each column's
stream is the Viterbi path that minimises the column's squared error, and GPTQ's
error compensation runs over the columns as for any grid (gptq.py).

A column is a sequence down the rows, so GPTQ's step (quantize one column of
every row, push its error onto the later columns) is unchanged: the Viterbi
algorithm replaces rounding, and its cost sum_i s_i^2 (w_i/s_i - value(u_i))^2
is exactly the column's squared error that GPTQ's update assumes. Each row's
scale s_i is fixed before the first column: the row's RMS (of the weights GPTQ
aims at) times alpha(k) / VALUE_STD, the spread at which the computed codebook
best fits Gaussian data of unit variance: of 0.9, 1.0, 1.1 and 1.2 on 30 x 576
samples, 0.9 at 1 bit (mean squared error 0.282) and 1.1 at 2, 3 and 4 bits
(0.0735, 0.0192, 0.0049; at 2 bits 1.0 gives 0.0736).

The rows form one sequence per column, so a layer's rows cannot be split
between threads as rounding grids can: layers reading the same inputs run in
parallel instead (engine/quant/__init__.py).
"""
from __future__ import annotations

import numpy as np

from lutkernels import trellis as fmt

from . import gptq


def alpha(k: int) -> float:
    return 0.9 if k == 1 else 1.1


def scales(W: np.ndarray, k: int) -> np.ndarray:
    """float32 [M]: each row's scale, as stored."""
    rms = np.sqrt(np.mean(np.square(W, dtype=np.float64), axis=1))
    return (rms * alpha(k) / fmt.VALUE_STD).astype(np.float32)


def quantize(W: np.ndarray, f: gptq.Factor, k: int) -> fmt.TrellisLinear:
    """float32 W [M, K] -> a trellis layer of k bits per weight, GPTQ over the columns in f's order."""
    from .loops import viterbi  # numba: off the inference import path

    M, K = W.shape
    fmt.check_shape(M, K, k)
    C = fmt.codebook(k)
    s = scales(W, k).astype(np.float64)
    live = s > 0
    inv = np.where(live, 1 / np.where(live, s, 1), 0)
    w2 = s * s
    Wt = np.array(W[:, f.perm].T, np.float64)  # [K, M]: a column is a contiguous row
    U = f.U.astype(np.float64)
    win = np.empty((K, M), np.int64)
    for i1 in range(0, K, gptq.BLOCK):
        i2 = min(i1 + gptq.BLOCK, K)
        E = np.empty((i2 - i1, M))
        for j in range(i1, i2):
            win[j] = viterbi(Wt[j] * inv, w2, C, k, fmt.MEMORY)
            E[j - i1] = (Wt[j] - s * C[win[j]]) / U[j, j]
            Wt[j + 1:i2] -= np.outer(U[j, j + 1:i2], E[j - i1])
        Wt[i2:] -= U[i1:i2, i2:].T @ E
    out = np.empty((M, K), np.int64)
    out[:, f.perm] = win.T
    return fmt.pack(out, s.astype(np.float32), k)
