"""Ternary weights {-s, 0, +s} per group (TWN), as two binary planes.

t in {-1, 0, +1} is (B1 + B2) / 2 with B1 = B2 = t where t != 0 and B1 = +1, B2 = -1
where t = 0, so s*t = (s/2)*B1 + (s/2)*B2: two planes with the same scale h = s/2
and no offset. The kernel stores one scale per plane, so a group pays for h
twice: 2 + 32/G bits per weight.

Threshold: t = sign(w) where |w| > 0.7 * mean|w| of the group (TWN's estimate of
the optimal threshold for Gaussian-like weights), then s is the least-squares
scale for that support, the mean |w| over it. h is stored as float16 and s = 2h
exactly, so the values the kernel sees are exactly {-s, 0, +s}.
"""
from __future__ import annotations

import numpy as np

import lutkernels as lk

from .binary import Fit, concat, f16, grouped, resolve_group, row_blocks, to_packed, to_rows, ungroup

THRESHOLD = 0.7


def fit(W: np.ndarray, group: int = 64) -> Fit:
    G = resolve_group(W, group)
    return concat([_fit_block(W[rows], G) for rows in row_blocks(*W.shape)])


def quantize(W: np.ndarray, group: int = 64) -> lk.PackedLinear:
    """float32 W [M, K] -> PackedLinear of 2 planes encoding {-s, 0, +s} per group."""
    return to_packed(fit(W, group))


def _fit_block(W: np.ndarray, G: int) -> Fit:
    M, K = W.shape
    w = grouped(W, G)
    a = np.abs(w)
    t = np.sign(w) * (a > THRESHOLD * a.mean(-1, keepdims=True))
    n = np.abs(t).sum(-1)
    s = np.divide((t * w).sum(-1), n, out=np.zeros_like(n), where=n > 0)
    h = f16(s / 2)
    planes = np.stack([np.where(t >= 0, 1, -1), np.where(t > 0, 1, -1)]).astype(np.int8)
    return Fit(ungroup(planes, M, K), to_rows(np.stack([h, h], -1), M, K, G), None)
