"""GPTQ (Frantar et al. 2022): quantize a layer column by column, pushing each
column's rounding error onto the columns not yet quantized so that the layer's
output on calibration inputs X moves as little as possible.

With H = XᵀX/N (engine/quant/calib.py), damped by 1% of its mean diagonal, and
U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), quantizing column j to q moves
every later column k by -(w_j - q)/U[j,j] * U[j,k]. Columns go in blocks of 128:
inside a block the updates are immediate, the rest of the layer gets the
block's errors at once as one matrix product.

The grid of a group (rtn or hlq, engine/quant/hlq.py) is fixed when the group's
first column comes up, from the group's current, error-updated weights. With
act_order columns go by decreasing H diagonal (the most active inputs first);
groups stay runs of G columns in the original order, as the packed format needs.

Rows are independent given U, so a layer's rows can run in parallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import hlq

BLOCK = 128
DAMP = 0.01  # SmolLM2 gptq-rtn3g576s8-ao, wiki / c4: 20.617 / 75.169; at 0.1 21.239 / 78.152, at 0.002 20.674 / 75.900
BASE = 256  # triangular inverses below this size go to LAPACK directly

GridFit = Callable[[np.ndarray], hlq.Grid]  # a group's weights [M, G] -> its grid


@dataclass(frozen=True)
class Factor:
    """What every layer reading the same inputs shares: the column order and U in that order."""
    perm: np.ndarray  # intp [K]: processing order of the columns
    U: np.ndarray  # float32 [K, K], upper triangular


def damped(H: np.ndarray) -> np.ndarray:
    """float64 H with DAMP of its mean diagonal added to the diagonal. Inputs never active
    (zero diagonal) get H[k,k] = 1: their columns are rounded without moving the others."""
    H = np.array(H, np.float64)
    d = np.diag(H).copy()
    d[d == 0] = 1
    H[np.diag_indices_from(H)] = d + DAMP * d.mean()
    return H


def factor(H: np.ndarray, act_order: bool = False) -> Factor:
    """H float64 [K, K], undamped."""
    H = damped(H)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(len(H))
    H = H[np.ix_(perm, perm)]
    # H = Ũ Ũᵀ with Ũ upper (a Cholesky of H with rows and columns reversed); then U = Ũ⁻¹
    Ut = np.linalg.cholesky(H[::-1, ::-1])[::-1, ::-1]
    return Factor(perm, _inv_upper(np.ascontiguousarray(Ut, np.float32)))


def aim(W: np.ndarray, f: Factor, D: np.ndarray, mix: float, workers=None) -> np.ndarray:
    """The weight GPTQ aims at: `mix` of the way from W [M, K] to the one whose output on the
    inputs X best matches the dense model's W on its own inputs Xd,
    V = argmin ||X Vᵀ - Xd Wᵀ||² + N·damping·||V - W||² = W + (H⁻¹ D)ᵀ, with H damped as
    factor() damps it and H⁻¹ = UᵀU from f; D = Xᵀ (Xd - X) Wᵀ / N (calib.dense_products).
    Since ||X Vᵀ - Xd Wᵀ||² = ||X (V - V*)ᵀ||² + const for the undamped best V*, GPTQ towards it
    on H also undoes the error the layer's inputs carry from upstream. Where they carry none,
    V = W. D may come from a subset of X's rows (the dense stream runs on some of the
    sequences): a noisier estimate of the same correction. All the way it fits the calibration
    set too closely: SmolLM2 gptq-rtn3g64s8-ao (3.25 bpw) wiki 22.289 at mix 0 and 19.983 at
    0.15 (bench/quality); a scan in a script whose float sums differ gave 20.408 at 0.15,
    20.566 at 0.3, 20.697 at 0.5 and 29.353 at 1 (all with the earlier form W·C·H⁻¹, which
    damping pulled towards 0 rather than towards W). workers (calib.Workers): the products
    split by columns of D over its threads."""
    D = np.asarray(D, np.float32)[f.perm]
    product = lambda Dc: f.U.T @ (f.U @ Dc)  # noqa: E731
    step = np.empty_like(D)
    step[f.perm] = np.concatenate(workers.map(product, np.array_split(D, workers.n, axis=1)) if workers
                                  else [product(D)], axis=1)
    return (W + mix * step.T).astype(np.float32)


def quantize(W: np.ndarray, f: Factor, G: int, fit_grid: GridFit) -> hlq.Planes:
    """W float32 [M, K] -> codes and grids, in groups of G columns."""
    from . import loops

    M, K = W.shape
    ng = K // G
    group = f.perm // G
    Wt = np.array(W[:, f.perm].T, np.float32)  # [K, M]: a column is a contiguous row
    codes = np.empty((K, M), np.uint8)
    grids: dict[int, hlq.Grid] = {}
    for i1 in range(0, K, BLOCK):
        i2 = min(i1 + BLOCK, K)
        U1 = np.ascontiguousarray(f.U[i1:i2, i1:i2])
        E = np.empty((i2 - i1, M), np.float32)
        j = 0
        while j < i2 - i1:  # runs of columns of one group: a grid, then loops.gptq_columns
            g = group[i1 + j]
            if g not in grids:
                grids[g] = fit_grid(_current(Wt, E[:j], f.U, i1, i2, np.flatnonzero(group == g)).T)
            end = j + 1
            while end < i2 - i1 and group[i1 + end] == g:
                end += 1
            grid = grids[g]
            loops.gptq_columns(Wt, E, U1, i1, j, end, grid.mids, grid.order, grid.sorted, grid.L, codes)
            j = end
        Wt[i2:] -= f.U[i1:i2, i2:].T @ E
    P = grids[0].scales.shape[0]
    scales = np.empty((P, M, ng), np.float32)
    offset = None if grids[0].offset is None else np.empty((M, ng), np.float32)
    for g, grid in grids.items():
        scales[:, :, g] = grid.scales
        if offset is not None:
            offset[:, g] = grid.offset
    out = np.empty((M, K), np.uint8)
    out[:, f.perm] = codes.T
    return hlq.Planes(out, scales, offset)


def _current(Wt, E, U, i1, i2, cols) -> np.ndarray:
    """The group's columns [G, M] as they stand now: those past the block still lack
    the block's errors so far (E, the first len(E) columns of the block)."""
    cur = Wt[cols]
    late = cols >= i2
    if len(E) and late.any():
        cur[late] -= U[i1:i1 + len(E), cols[late]].T @ E
    return cur


def _inv_upper(T: np.ndarray) -> np.ndarray:
    """Inverse of an upper triangular matrix by halves: numpy has no triangular inverse,
    and a general one costs twice the work of these matrix products."""
    n = len(T)
    if n <= BASE:
        return np.linalg.inv(T)
    h = n // 2
    A, D = _inv_upper(T[:h, :h]), _inv_upper(T[h:, h:])
    out = np.zeros_like(T)
    out[:h, :h], out[h:, h:] = A, D
    out[:h, h:] = -(A @ T[:h, h:]) @ D
    return out
