"""HLQ (ELUTQ's hierarchical linear quantization): one scale per bit plane per group.

    w ~= sum_p s_p * B_p + z,    B_p in {-1, +1}

A b-bit code c stands for the level sum_p s_p * (2*bit_p(c) - 1) + z of its
group. Each group starts from its round-to-nearest grid (s_p = s * 2^(p-1)) and
alternates two steps, each a minimiser of the group's squared error, until
they stop paying (at most ITERS rounds):

    fit      least squares of [s_1..s_b, z] given the codes: a (b+1)x(b+1)
             normal system per group, from per-code counts and weight sums;
    assign   every weight to the nearest of its group's 2^b levels.

Scales are stored as float16, and rounding them can undo a step, so every
candidate is scored with its float16 scales and a group keeps the best grid it
has seen: never worse than its rtn start. The same grids serve GPTQ
(engine/quant/gptq.py), which fixes one per group from error-updated weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import lutkernels as lk

from . import rtn

ITERS = 10
TOL = 1e-3  # a group stops once an iteration lowers its squared error by less than this fraction
RIDGE = 1e-6  # relative to the group size: keeps groups whose planes are collinear solvable


class Grid:
    """The 2^P levels of R groups, sorted once so that rounding is a binary search."""

    def __init__(self, scales: np.ndarray, offset: np.ndarray | None):
        self.scales = scales  # float32 [P, R], float16 values
        self.offset = offset  # float32 [R], float16 values, or None (symmetric)
        lev = levels(scales, offset)
        R, L = lev.shape
        order = np.argsort(lev, axis=1, kind="stable")
        # flat arrays, as loops.nearest takes them
        self.order = order.astype(np.uint8).ravel()
        self.sorted = np.take_along_axis(lev, order, 1).ravel()
        srt = self.sorted.reshape(R, L).astype(np.float64)
        self.mids = ((srt[:, 1:] + srt[:, :-1]) / 2).ravel()
        self.L = L

    def round(self, Wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest level of each weight of Wg [R, n]: (codes uint8, values float32)."""
        from . import loops

        codes, values = np.empty(Wg.shape, np.uint8), np.empty(Wg.shape, np.float32)
        loops.nearest(np.ascontiguousarray(Wg, np.float32), self.mids, self.order, self.sorted, self.L, codes, values)
        return codes, values


@dataclass(frozen=True)
class Planes:
    """A layer in the kernel's form: codes whose bit p is set where plane p is +1, and the grid."""
    codes: np.ndarray  # uint8 [M, K]
    scales: np.ndarray  # float32 [P, M, K/G], float16 values
    offset: np.ndarray | None  # float32 [M, K/G], float16 values

    @property
    def G(self) -> int:
        return self.codes.shape[1] // self.scales.shape[2]

    def dense(self) -> np.ndarray:
        """The float32 matrix, with the arithmetic of lutkernels.dense."""
        M, K = self.codes.shape
        P, _, ng = self.scales.shape
        lev = levels(self.scales.reshape(P, M * ng), None if self.offset is None else self.offset.reshape(-1))
        return np.take_along_axis(lev, self.codes.reshape(M * ng, self.G), 1).reshape(M, K)

    def packed(self, scale8: bool = False, int_grid: bool = False) -> lk.PackedLinear:
        """Grids whose plane scales are h * 2^p everywhere store h alone (uniform). scale8: the
        grid's scales and offsets are 8-bit values (rtn_grid with scale8), stored as such;
        int_grid: the integer grid (rtn_grid with int_grid), whose offsets -h are not stored."""
        P = self.scales.shape[0]
        planes = ((self.codes[None] >> np.arange(P, dtype=np.uint8)[:, None, None]) & 1).astype(bool)
        h = self.scales[:1]
        if np.array_equal(self.scales, h * np.float32(2.0) ** np.arange(P, dtype=np.float32)[:, None, None]):
            if int_grid:
                if not np.array_equal(self.offset, -h[0]):
                    raise ValueError("offsets off the integer grid: each must be minus its plane-0 scale")
                return lk.pack(planes, h, None, uniform=True, int_grid=True)
            return lk.pack(planes, h, self.offset, uniform=True, scale8=scale8)
        return lk.pack(planes, self.scales, self.offset, scale8=scale8)


def stack_rows(parts: list[Planes]) -> Planes:
    """One layer from row blocks quantized apart."""
    offset = None if parts[0].offset is None else np.concatenate([p.offset for p in parts])
    return Planes(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts], axis=1), offset)


def levels(scales: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """float32 [R, 2^P]: the level of each code, summed plane by plane as lutkernels.dense sums."""
    P, R = scales.shape
    signs = _signs(P)
    lev = np.zeros((R, 2**P), np.float32)
    for p in range(P):
        lev += scales[p][:, None] * signs[p]
    if offset is not None:
        lev += offset[:, None]
    return lev


def rtn_grid(Wg: np.ndarray, bits: int, symmetric: bool = False, scale8: bool = False,
             int_grid: bool = False) -> Grid:
    """Round-to-nearest grid of each row of Wg [R, G] (one group per row), on 8-bit scales if
    scale8, the integer grid if int_grid."""
    c = rtn.codes(Wg, bits, Wg.shape[1], symmetric, scale8, int_grid)
    step = np.float32(2.0) ** (np.arange(bits, dtype=np.float32) - 1)
    return Grid(c.scale[:, 0][None] * step[:, None], None if c.offset is None else c.offset[:, 0])


def fit_groups(Wg: np.ndarray, bits: int, symmetric: bool = False, iters: int = ITERS) -> tuple[Grid, np.ndarray]:
    """HLQ grid and codes of each row of Wg [R, G] (one group per row), from the rtn grid,
    by loops.hlq_refine. Each group stops on its own, so its result never depends on
    which groups are fitted with it."""
    from . import loops

    Wg = np.ascontiguousarray(Wg, np.float32)
    grid = rtn_grid(Wg, bits, symmetric)
    codes, values = grid.round(Wg)
    d = values.astype(np.float64) - Wg
    err = np.einsum("rg,rg->r", d, d)
    scales = np.ascontiguousarray(grid.scales)
    offset = np.zeros(len(Wg), np.float32) if symmetric else grid.offset.copy()
    a = _signs(bits).T.astype(np.float64)  # [2^b, b]: design row of each code, then 1 for the offset
    if not symmetric:
        a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    loops.hlq_refine(Wg, a, RIDGE * Wg.shape[1], iters, TOL, scales, offset, codes, err)
    return Grid(scales, None if symmetric else offset), codes


def fit(W: np.ndarray, bits: int, G: int, symmetric: bool = False, iters: int = ITERS) -> Planes:
    """HLQ of W [M, K] in groups of G columns."""
    M, K = W.shape
    lk.check_shape(M, K, bits, G)
    grid, codes = fit_groups(np.asarray(W, np.float32).reshape(M * K // G, G), bits, symmetric, iters)
    offset = None if grid.offset is None else grid.offset.reshape(M, K // G)
    return Planes(codes.reshape(M, K), grid.scales.reshape(bits, M, K // G), offset)


def quantize(W: np.ndarray, bits: int = 4, group: int = 128, symmetric: bool = False) -> lk.PackedLinear:
    """float32 W [M, K] -> PackedLinear; group is lowered to a kernel group size dividing K, as in rtn."""
    return fit(W, bits, rtn.group_size(W.shape[1], group), symmetric).packed()


def _signs(P: int) -> np.ndarray:
    """[P, 2^P] float32: +1 where bit p of the code is set, else -1."""
    c = np.arange(2**P)
    return (((c[None] >> np.arange(P)[:, None]) & 1) * 2 - 1).astype(np.float32)
