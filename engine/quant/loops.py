"""The quantizer loops that numpy cannot vectorise, compiled by numba.

Imported only when quantizing (numba takes about half a second to import, and
`chat` must start in about one). Rounding and GPTQ's column loop repeat, in the
same float widths and order, the numpy they replaced, so their results are
bit-identical to it; the HLQ alternation solves its small normal systems by
Gaussian elimination where numpy called LAPACK (same codes and scales on every
matrix compared, and scales are rounded to float16 after either). They release
the GIL, so the worker threads of a quantization (engine/quant/calib.py) run
them on every core at once.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

JIT = {"nogil": True, "cache": True}


@njit(**JIT)
def _search(w, mids, base, L):
    """Index of w's nearest level among a group's L sorted levels: the number of midpoints
    between them that w (float32, compared as float64) exceeds. Counted one by one up to
    16 levels, by binary search above; without branches, as the comparisons are unpredictable."""
    idx = 0
    if L <= 16:
        for m in range(L - 1):
            idx += w > mids[base + m]
        return idx
    step = L // 2
    while step:
        idx += step * (w > mids[base + idx + step - 1])
        step //= 2
    return idx


@njit(**JIT)
def nearest(W, mids, order, levels, L, codes, values):
    """Row r of W [R, n] rounded on grid row r (hlq.Grid's flat arrays): codes and values [R, n]."""
    R, n = W.shape
    for r in range(R):
        for i in range(n):
            k = r * L + _search(W[r, i], mids, r * (L - 1), L)
            codes[r, i] = order[k]
            values[r, i] = levels[k]


@njit(**JIT)
def gptq_columns(Wt, E, U1, i1, j0, j1, mids, order, levels, L, codes):
    """GPTQ's inner loop (gptq.py) over columns i1+j0 .. i1+j1-1 of Wt [K, M], all of one
    group, whose grid row r serves row r: round each column, keep its scaled error in
    E [block, M] and push that error onto the block's later columns."""
    M = Wt.shape[1]
    nb = U1.shape[0]
    for j in range(j0, j1):
        d = U1[j, j]
        for r in range(M):
            w = Wt[i1 + j, r]
            k = r * L + _search(w, mids, r * (L - 1), L)
            codes[i1 + j, r] = order[k]
            E[j, r] = (w - levels[k]) / d
        for c in range(j + 1, nb):
            u = U1[j, c]
            for r in range(M):
                Wt[i1 + c, r] -= u * E[j, r]


@njit(**JIT)
def _f16(x):
    """x (float64) rounded to the nearest float16 value, ties to even, clipped to its
    range: numpy's float64 -> float16 conversion, kept in float64."""
    a = min(abs(x), 65504.0)
    if a == 0.0 or a != a:
        return x
    e = math.frexp(a)[1] - 1  # a in [2^e, 2^(e+1))
    ulp = 2.0 ** (max(e, -14) - 10)  # subnormals below 2^-14 share the smallest step
    r = np.rint(a / ulp) * ulp  # a / ulp is exact: ulp is a power of two
    return r if x > 0 else -r


@njit(**JIT)
def _levels(s, z, L, out):
    """Level of each code: plane scales summed plane by plane in float32, then the offset (hlq.levels)."""
    P = s.shape[0]
    for c in range(L):
        v = np.float32(0.0)
        for p in range(P):
            v += s[p] if (c >> p) & 1 else -s[p]
        out[c] = v + z


@njit(**JIT)
def _assign(w, lev, codes, order, srt, mids):
    """Nearest level of each weight of w [G] (hlq.Grid's rounding): codes, and the squared
    error. order, srt, mids: work space of 2^b, 2^b and 2^b - 1."""
    L = lev.shape[0]
    for i in range(L):  # a stable insertion sort: equal levels keep code order, as Grid's argsort
        v = lev[i]
        k = i
        while k > 0 and srt[k - 1] > v:
            srt[k] = srt[k - 1]
            order[k] = order[k - 1]
            k -= 1
        srt[k] = v
        order[k] = i
    for i in range(L - 1):
        mids[i] = (np.float64(srt[i + 1]) + np.float64(srt[i])) / 2
    sse = 0.0
    for i in range(w.shape[0]):
        k = _search(w[i], mids, 0, L)
        codes[i] = order[k]
        d = np.float64(srt[k]) - w[i]
        sse += d * d
    return sse


@njit(**JIT)
def _solve(w, codes, a, ridge, x, cnt, sm, N):
    """Least-squares plane scales and offset (x: the n = a.shape[1] unknowns) of one group
    given its codes: design row a[c] for code c, so the normal system comes from per-code
    counts and sums; Gaussian elimination with partial pivoting. cnt, sm [2^b] and
    N [n, n + 1]: work space."""
    L, n = a.shape
    cnt[:] = 0.0
    sm[:] = 0.0
    for i in range(w.shape[0]):
        cnt[codes[i]] += 1.0
        sm[codes[i]] += w[i]
    for p in range(n):
        for q in range(n):
            v = 0.0
            for c in range(L):
                v += cnt[c] * a[c, p] * a[c, q]
            N[p, q] = v + (ridge if p == q else 0.0)
        v = 0.0
        for c in range(L):
            v += sm[c] * a[c, p]
        N[p, n] = v
    for col in range(n):
        piv = col
        for r in range(col + 1, n):
            if abs(N[r, col]) > abs(N[piv, col]):
                piv = r
        for c in range(n + 1):
            N[col, c], N[piv, c] = N[piv, c], N[col, c]
        for r in range(col + 1, n):
            f = N[r, col] / N[col, col]
            for c in range(col, n + 1):
                N[r, c] -= f * N[col, c]
    for r in range(n - 1, -1, -1):
        v = N[r, n]
        for c in range(r + 1, n):
            v -= N[r, c] * x[c]
        x[r] = v / N[r, r]


@njit(**JIT)
def hlq_refine(Wg, a, ridge, iters, tol, scales, offset, codes, err):
    """HLQ's alternation (hlq.fit_groups) from a start grid, group by group (row r of Wg
    [R, G]): least-squares scales (float16 values) given the codes, then the nearest
    level for every weight, while an iteration lowers the squared error by more than
    tol of it. scales [P, R], offset [R] (zeros when symmetric), codes [R, G] and err [R]
    hold the start and return the best grid seen."""
    R, G = Wg.shape
    L, n = a.shape
    P = scales.shape[0]
    x = np.zeros(n)
    s = np.empty(P, np.float32)
    lev = np.empty(L, np.float32)
    cur = np.empty(G, np.uint8)
    new = np.empty(G, np.uint8)
    order = np.empty(L, np.int64)
    srt = np.empty(L, np.float32)
    mids = np.empty(L - 1)
    cnt = np.empty(L)
    sm = np.empty(L)
    N = np.empty((n, n + 1))
    for r in range(R):
        w = Wg[r]
        cur[:] = codes[r]
        for _ in range(iters):
            _solve(w, cur, a, ridge, x, cnt, sm, N)
            for p in range(P):
                s[p] = np.float32(_f16(x[p]))
            z = np.float32(_f16(x[P])) if n > P else np.float32(0.0)
            _levels(s, z, L, lev)
            e = _assign(w, lev, new, order, srt, mids)
            if not e < err[r]:
                break
            gain = err[r] - e
            scales[:, r] = s
            offset[r] = z
            codes[r] = new
            err[r] = e
            if not gain > tol * (e + gain):
                break
            cur[:] = new


@njit(**JIT)
def viterbi(z, w, C, k, m):
    """The trellis path (lutkernels/trellis.py) whose values C[u_i] fit z best:
    windows u_i (int64 [n]) minimising sum_i w_i (z_i - C[u_i])^2 over paths where u_{i+1}'s low m
    bits are u_i >> k. A state is a window's top m bits; the 2^k windows that end in state s
    come from the states their low m bits name, so each row costs one pass over all 2^(k+m)
    windows. The first window's state bits are free (the stream stores them)."""
    n = z.shape[0]
    S = 1 << m
    R = 1 << k
    cost = np.zeros(S)
    new = np.empty(S)
    e = np.empty(S * R)
    back = np.empty((n, S), np.uint8)
    for i in range(n):
        zi = z[i]
        wi = w[i]
        for u in range(S * R):
            d = zi - C[u]
            e[u] = wi * d * d
        for s in range(S):
            best = np.inf
            br = 0
            for r in range(R):
                u = (s << k) | r
                c = cost[u & (S - 1)] + e[u]
                if c < best:
                    best = c
                    br = r
            new[s] = best
            back[i, s] = br
        cost[:] = new
    s = 0
    for t in range(1, S):
        if cost[t] < cost[s]:
            s = t
    out = np.empty(n, np.int64)
    for i in range(n - 1, -1, -1):
        u = (s << k) | back[i, s]
        out[i] = u
        s = u & (S - 1)
    return out
