"""Dynamic grouping of a whole matrix's magnitudes (the seed paper, arXiv 2509.03054), faithfully.

All nonzero weights of the matrix are sorted by |w| and the sorted order is cut
into bands (runs of consecutive magnitudes). Each weight keeps its sign and
takes its band's mean |w| as magnitude. A band of n values costs

    n * Var(|w|) + lam / n        (lam = 0.75, the authors' default)

and a partition costs the sum over its bands. Prefix sums of |w| and |w|^2
give any band's cost in O(1). Three solvers, as in the authors' code:

    dp      exact dynamic programming over partitions into at most `groups`
            bands: O(groups * n^2) time, O(n^2) memory, toy sizes only;
    greedy  start from single values, repeatedly merge the adjacent pair whose
            merged band is cheapest (the merged band's own cost is the priority,
            not the change in the total: that is what the authors' heap holds),
            until `groups` bands remain;
    wgm     the same merging started from runs of `window` values: the only one
            that scales to real matrices.

Bit counts. The paper counts 1 + 16*G/N bits per weight (sign, plus a 16-bit
value per band), which leaves out which band each weight belongs to. Honestly
a weight needs its sign and a band index: 1 + ceil(log2 G) + 16*G/N with
fixed-width indices, or 1 + H(index) + 16*G/N with an ideal entropy coder.
Band values are stored as float16, so means come back float16-rounded.
"""
from __future__ import annotations

import heapq
import math

import numpy as np

LAMBDA = 0.75
SOLVERS = ("wgm", "greedy", "dp")
DP_MAX = 2048  # the DP's n x n cost table: 32 MB at this size


def bands(W: np.ndarray, groups: int = 32, window: int = 64, lam: float = LAMBDA,
          solver: str = "wgm") -> tuple[np.ndarray, np.ndarray]:
    """Cut W's sorted nonzero magnitudes into at most `groups` bands.

    Returns (boundaries, means): boundaries int64 [B+1], positions in the stable
    sort of the nonzero |w| in row-major order (0 first, the nonzero count last);
    means float32 [B], each band's mean |w| rounded to float16."""
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} (known: {', '.join(SOLVERS)})")
    S1, S2 = _prefix(_sorted_magnitudes(W)[1])
    n = len(S1) - 1
    if solver == "dp":
        if n > DP_MAX:
            raise ValueError(f"the exact DP is for toy sizes: {n} nonzero weights, at most {DP_MAX}")
        boundaries = _dp(S1, S2, groups, lam)
    else:
        step = 1 if solver == "greedy" else window
        boundaries = _merge(S1, S2, np.append(np.arange(0, n, step), n), groups, lam)
    means = np.diff(S1[boundaries]) / np.diff(boundaries)
    return boundaries, _f16(means)


def objective(W: np.ndarray, boundaries: np.ndarray, lam: float = LAMBDA) -> float:
    """The paper's cost of a partition: sum over bands of n*Var(|w|) + lam/n."""
    S1, S2 = _prefix(_sorted_magnitudes(W)[1])
    _check_boundaries(boundaries, len(S1) - 1)
    return float(_band_costs(S1, S2, boundaries[:-1], boundaries[1:], lam).sum())


def band_index(W: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Band of every weight, int32 shaped like W; -1 where w == 0."""
    order, _ = _sorted_magnitudes(W)
    _check_boundaries(boundaries, len(order))
    idx = np.full(np.size(W), -1, np.int32)
    idx[order] = np.repeat(np.arange(len(boundaries) - 1, dtype=np.int32), np.diff(boundaries))
    return idx.reshape(np.shape(W))


def dequantize(W: np.ndarray, boundaries: np.ndarray, means: np.ndarray) -> np.ndarray:
    """float32 sign(w) * mean of w's band; zeros stay zero."""
    idx = band_index(W, boundaries)
    vals = np.append(np.asarray(means, np.float32), np.float32(0))  # index -1 picks the 0
    return (np.sign(W).astype(np.float32) * vals[idx]).astype(np.float32)


def paper_bits(boundaries: np.ndarray) -> float:
    """The paper's count, 1 + 16*G/N over the N nonzero weights."""
    return 1.0 + 16.0 * (len(boundaries) - 1) / int(boundaries[-1])


def honest_bits(boundaries: np.ndarray, size: int) -> tuple[float, float]:
    """(fixed-width, entropy-coded) bits per weight over all `size` weights:
    a sign per weight, a band index (a zero, if any, is one more symbol) and a
    16-bit value per band."""
    counts = np.diff(boundaries).astype(np.float64)
    G, n = len(counts), int(boundaries[-1])
    if n < size:
        counts = np.append(counts, size - n)
    table = 16.0 * G / size
    fixed = 1.0 + math.ceil(math.log2(len(counts))) + table
    p = counts[counts > 0] / size
    entropy = n / size + float(-(p * np.log2(p)).sum()) + table
    return fixed, entropy


def _sorted_magnitudes(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices of the nonzero weights in stable |w| order, their |w| in float64)."""
    flat = np.asarray(W).ravel()
    if flat.dtype != np.float32:
        flat = flat.astype(np.float64)
    nz = np.flatnonzero(flat)
    if len(nz) == 0:
        raise ValueError("the matrix has no nonzero weight to group")
    mags = np.abs(flat[nz])
    # positive float32s order as their bit patterns, and numpy's stable sort of
    # uint32 is a radix sort: about 1.6x faster than sorting the floats
    order = np.argsort(mags.view(np.uint32) if mags.dtype == np.float32 else mags, kind="stable")
    return nz[order], mags[order].astype(np.float64)


def _prefix(mags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    S1 = np.concatenate([[0.0], np.cumsum(mags)])
    S2 = np.concatenate([[0.0], np.cumsum(mags * mags)])
    return S1, S2


def _band_costs(S1, S2, i, j, lam):
    n = j - i
    # n*Var = sum x^2 - (sum x)^2 / n; rounding can push a near-constant band's below 0
    sse = np.maximum(S2[j] - S2[i] - (S1[j] - S1[i]) ** 2 / n, 0.0)
    return sse + lam / n


def _check_boundaries(boundaries: np.ndarray, n: int) -> None:
    b = np.asarray(boundaries)
    if b.ndim != 1 or len(b) < 2 or b[0] != 0 or b[-1] != n or (np.diff(b) <= 0).any():
        raise ValueError(f"boundaries must rise strictly from 0 to the {n} nonzero weights of this matrix")


def _dp(S1, S2, groups, lam) -> np.ndarray:
    n = len(S1) - 1
    i, j = np.triu_indices(n + 1, 1)
    C = np.full((n + 1, n + 1), np.inf)
    C[i, j] = _band_costs(S1, S2, i, j, lam)
    best = np.full(n + 1, np.inf)  # best[j]: cost of the first j values in g bands
    best[0] = 0.0
    back = []
    finals = []
    for _ in range(min(groups, n)):
        total = best[:, None] + C
        back.append(total.argmin(0))
        best = total[back[-1], np.arange(n + 1)]
        finals.append(best[n])
    g = int(np.argmin(finals))  # the paper's DP takes the cheapest of 1..groups bands
    cuts, j = [n], n
    for k in range(g, -1, -1):
        j = int(back[k][j])
        cuts.append(j)
    return np.array(cuts[::-1], np.int64)


def _merge(S1, S2, cuts, groups, lam) -> np.ndarray:
    """Adjacent-band merging with a heap and lazy invalidation.

    Bands are runs of the initial cuts, indexed by their first cut; the heap holds
    (cost of the merged band, first cut of the left band, last cut of the right
    band). An entry is stale unless its left band is alive and its right band still
    ends where it says: for a given left band that end only grows, so the check
    is exact."""
    R = len(cuts) - 1
    pos = cuts.tolist()
    s1, s2 = S1[cuts].tolist(), S2[cuts].tolist()  # Python floats: numpy scalars are slow in this loop

    def cost(a, c):
        n = pos[c] - pos[a]
        t = s1[c] - s1[a]
        return max(s2[c] - s2[a] - t * t / n, 0.0) + lam / n

    end = list(range(1, R + 1)) + [-1]  # end[a]: the cut after band a; -1 for dead bands
    prev = list(range(-1, R))  # prev[a]: the band before band a
    heap = [(cost(a, a + 2), a, a + 2) for a in range(R - 1)]
    heapq.heapify(heap)
    count = R
    while count > groups:
        _, a, e = heapq.heappop(heap)
        b = end[a]
        if b < 0 or b >= R or end[b] != e:
            continue
        end[a], end[b] = e, -1
        if e < R:
            prev[e] = a
            heapq.heappush(heap, (cost(a, end[e]), a, end[e]))
        if prev[a] >= 0:
            heapq.heappush(heap, (cost(prev[a], e), prev[a], e))
        count -= 1
    starts = [a for a in range(R) if end[a] >= 0]
    return cuts[starts + [R]].astype(np.int64)


def _f16(x: np.ndarray) -> np.ndarray:
    h = np.asarray(x).astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("band values out of float16 range")
    return h.astype(np.float32)
