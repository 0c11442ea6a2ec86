"""Multi-scale binary: the seed paper's magnitude bands made executable by the LUT kernel.

WGM gives every weight a sign and one of G free band magnitudes, which no
bit-plane kernel can run. Constrain the magnitudes of a group of G weights to
2^b levels a0 + sum_k gamma_k * bit_k (bit_k in {0, 1}); with c_k = 2*bit_k - 1:

    |w| = beta0 + sum_k beta_k * c_k,   beta0 = a0 + sum_k gamma_k / 2,  beta_k = gamma_k / 2
    w   = beta0 * S + sum_k beta_k * P_k,   S = sign(w),  P_k = S * c_k in {-1, +1}

that is b + 1 binary planes with one float16 scale per plane and group and no
offset: (b + 1) + 16*(b + 1)/G bits per weight, counted honestly.

Fit: a start, then `iters` rounds of
    assign  every weight to the nearest of the values +-level its group can take;
    scales  least squares of the group's b + 1 scales given the planes.
Both steps are exact minimisers, but scales are stored as float16 and rounding
could undo a step, so a group takes a step only where it lowers the group's
error: the error never increases.

Starts. "wgm" (the seed paper's bands): WGM (engine/quant/wgm.py) cuts the whole
matrix's magnitudes, each divided by its group's mean |w| so that one set of
bands fits every group, into 2^b bands; band j (in rising magnitude) takes the
code whose bits are j's, a rising grid of levels. "uniform": code j where |w| is
nearest j/(2^b - 1) of the group's largest |w|, the sign-magnitude analogue of
round-to-nearest.

keep_max. A least-squares fit gives up a group's largest weight to fit the many
small ones: on SmolLM2-135M at 3 planes that alone takes perplexity from about
110 to over 1000 at the same Frobenius error, and restoring each group's largest
|w| undoes it. Round-to-nearest keeps a group's extremes on its grid by
construction; keep_max does the same here by pinning the all-ones level to the
group's largest |w| (least squares under that one equality constraint).
"""
from __future__ import annotations

import numpy as np

import lutkernels as lk

from . import hlq, wgm
from .binary import (Fit, check_planes, concat, f16, grouped, lstsq, resolve_group, row_blocks, signs, to_packed,
                     to_rows, ungroup)

ITERS = 10


def fit(W: np.ndarray, bits: int = 1, group: int = 64, iters: int = ITERS, keep_max: bool = True,
        init: str = "wgm", window: int = 64, lam: float = wgm.LAMBDA) -> tuple[Fit, list[float]]:
    """(fit of bits + 1 planes, squared error of the start and after each iteration).
    keep_max pins each group's top level to its largest |w| (with bits >= 1: one plane has one level)."""
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool):
        raise ValueError(f"bits must be an integer, got {bits!r}")
    check_planes(bits + 1)
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    if init not in INITS:
        raise ValueError(f"unknown start {init!r} (known: {', '.join(INITS)})")
    G = resolve_group(W, group)
    codes = INITS[init](W, G, bits, window, lam)
    fits, errors = [], np.zeros(iters + 1)
    for rows in row_blocks(*W.shape):
        f, e = _fit_block(W[rows], codes[rows], bits, G, iters, keep_max and bits > 0)
        fits.append(f)
        errors += e
    return concat(fits), errors.tolist()


def quantize(W: np.ndarray, bits: int = 1, group: int = 64, iters: int = ITERS, keep_max: bool = True,
             init: str = "wgm") -> lk.PackedLinear:
    """float32 W [M, K] -> PackedLinear of bits + 1 planes, per-plane scales, no offsets."""
    return to_packed(fit(W, bits, group, iters, keep_max, init)[0])


def grid(Wg: np.ndarray, bits: int) -> hlq.Grid:
    """The fitted levels of each row of Wg [R, G] (one group per row) as a grid gptq can round to:
    bits + 1 plane scales and no offset, the form hlq's grids have."""
    f, _ = fit(Wg, bits, Wg.shape[1])
    return hlq.Grid(np.ascontiguousarray(f.scales[:, :, 0]), None)


def wgm_codes(W: np.ndarray, G: int, bits: int, window: int, lam: float) -> np.ndarray:
    """uint8 [M, K]: each weight's WGM band among 2^bits, on group-normalised magnitudes."""
    w = grouped(W, G)
    mean = np.abs(w).mean(-1, keepdims=True)
    norm = np.divide(w, mean, out=np.zeros_like(w), where=mean > 0).reshape(W.shape).astype(np.float32)
    if bits == 0 or not norm.any():
        return np.zeros(W.shape, np.uint8)
    boundaries, _ = wgm.bands(norm, 2**bits, window, lam)
    return np.maximum(wgm.band_index(norm, boundaries), 0).astype(np.uint8)


def uniform_codes(W: np.ndarray, G: int, bits: int, window: int, lam: float) -> np.ndarray:
    """uint8 [M, K]: round(|w| / max|w| of the group * (2^bits - 1))."""
    a = np.abs(grouped(W, G))
    top = a.max(-1, keepdims=True)
    q = np.rint(np.divide(a, top, out=np.zeros_like(a), where=top > 0) * (2**bits - 1))
    return q.reshape(W.shape).astype(np.uint8)


INITS = {"wgm": wgm_codes, "uniform": uniform_codes}


def _fit_block(W: np.ndarray, codes: np.ndarray, bits: int, G: int, iters: int,
               keep_max: bool) -> tuple[Fit, np.ndarray]:
    M, K = W.shape
    w = grouped(W, G)
    top = np.abs(w).max(-1) if keep_max else None
    A = _design(signs(w), grouped(codes, G).astype(np.int64), bits)
    beta = f16(_scales(A, w, top))
    err = _sse(A, beta, w)
    errors = [err.sum()]
    for _ in range(iters):
        A2 = _design(*_nearest(w, beta, bits), bits)
        e2 = _sse(A2, beta, w)
        take = e2 < err
        A[take], err[take] = A2[take], e2[take]
        beta2 = f16(_scales(A, w, top))
        e2 = _sse(A, beta2, w)
        take = e2 < err
        beta[take], err[take] = beta2[take], e2[take]
        errors.append(err.sum())
    planes = ungroup(np.moveaxis(A, -1, 0), M, K).astype(np.int8)
    return Fit(planes, to_rows(beta, M, K, G), None), np.array(errors)


def _scales(A: np.ndarray, w: np.ndarray, top: np.ndarray | None) -> np.ndarray:
    """Least-squares scales; with `top`, subject to the all-ones level beta0 + sum_k beta_k = top,
    solved by substituting beta0 = top - sum_k beta_k (columns P_k - S, target w - top*S)."""
    if top is None:
        return lstsq(A, w)
    S = A[..., 0]
    rest = lstsq(A[..., 1:] - S[..., None], w - top[:, None] * S)
    return np.concatenate([top[:, None] - rest.sum(-1, keepdims=True), rest], -1)


def _code_signs(bits: int) -> np.ndarray:
    """c_k(j) = 2*bit_k(j) - 1: float64 [2^bits, bits]."""
    j = np.arange(2**bits)[:, None]
    return 2.0 * ((j >> np.arange(bits)) & 1) - 1.0


def _design(S: np.ndarray, codes: np.ndarray, bits: int) -> np.ndarray:
    """The planes as columns, float64 [n, G, bits + 1]: S, then S * c_k(code)."""
    A = np.empty(S.shape + (bits + 1,))
    A[..., 0] = S
    for k in range(bits):
        A[..., k + 1] = np.where((codes >> k) & 1, S, -S)
    return A


def _sse(A: np.ndarray, beta: np.ndarray, w: np.ndarray) -> np.ndarray:
    r = w - (A @ beta[..., None])[..., 0]
    return (r * r).sum(-1)


def _nearest(w: np.ndarray, beta: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, code) of the nearest value each weight can take. The values are +-level_j,
    so the nearest is w's sign times the level whose |level| is nearest |w|; a
    negative level flips S."""
    level = beta[:, :1] + beta[:, 1:] @ _code_signs(bits).T  # [n, 2^bits]
    mag = np.abs(level)
    order = np.argsort(mag, axis=1)
    srt = np.take_along_axis(mag, order, 1)
    cuts = (srt[:, 1:] + srt[:, :-1]) / 2
    a = np.abs(w)
    pos = np.zeros(w.shape, np.int64)
    for j in range(cuts.shape[1]):
        pos += a > cuts[:, j:j + 1]
    code = np.take_along_axis(order, pos, 1)
    S = signs(w) * signs(np.take_along_axis(level, code, 1))
    return S, code
