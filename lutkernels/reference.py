"""numpy reference of the whole LUT matmul: tables, integer block sums, output.

It reproduces the C tables bit for bit (same float32 operation order and
round-half-even), so integer sums must equal the kernels' exactly; the float
output is computed in float64 and matches the kernels to rounding.
"""
import numpy as np

from .layout import TILE, PackedLinear, act_block, stored_scales, unpack

EXACT_Q = 2047  # exact-mode activations: integers up to this (c/lut_internal.h LUT_EXACT_Q)
FAST_SUM = 252  # fast mode: the block's largest sum of 4 |x| maps to this (LUT_FAST_SUM) ...
FAST_Q = 127  # ... unless its largest |x| would pass this (LUT_FAST_Q)
_IDX = np.arange(16)
_BITS = ((_IDX[:, None] >> np.arange(4)) & 1).astype(bool)  # [16 entries, 4 activations]


def act_ints(x: np.ndarray, K: int, G: int, exact: bool):
    """x [N, K] -> (the activations as integers, int32 [N, K/Kb, Kb]; their block scales float32
    [N, K/Kb]), rounded as c/lut.c act_ints rounds them (float32, half to even).

    Exact mode: scale max|x| / EXACT_Q, so |q| <= EXACT_Q. Fast mode: scale m / FAST_SUM, m the
    block's largest ((|x0| + |x1|) + |x2|) + |x3| over its groups of 4, or max|x| / FAST_Q where
    that is larger, so |q| <= 127 and a group's |q| sums to at most 254. Then, in a block with an
    odd number of groups whose sum is odd, the value of such a group rounded farthest from its
    own (the first of equals) moves to its other integer neighbour (towards zero if it was exact;
    back the other way if that passes 127): every block has an even number of odd groups, which
    lets the C tables hold exact halves (c/lut.c act_ints)."""
    Kb = act_block(K, G)
    xb = x.astype(np.float32).reshape(x.shape[0], K // Kb, Kb)
    m = np.abs(xb).max(-1)
    top = np.float32(EXACT_Q if exact else FAST_Q)
    safe = np.where(m > 0, m, 1)
    inv = np.where(m > 0, top / safe, 0).astype(np.float32)
    scale = (m / top).astype(np.float32)
    if not exact:
        a = np.abs(xb.reshape(x.shape[0], K // Kb, Kb // 4, 4))
        msum = (((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]).max(-1)
        inv_sum = (np.float32(FAST_SUM) / np.where(m > 0, msum, 1)).astype(np.float32)
        use = (m > 0) & (inv_sum <= inv)
        inv = np.where(use, inv_sum, inv).astype(np.float32)
        scale = np.where(use, msum / np.float32(FAST_SUM), scale).astype(np.float32)
    v = xb * inv[..., None]
    q = np.rint(v).astype(np.int32)
    if not exact:  # a block with an odd number of odd groups moves one value (see the docstring)
        odd_group = np.repeat((q.reshape(-1, K // Kb, Kb // 4, 4).sum(-1) & 1).astype(bool), 4, axis=-1)
        fix = (odd_group.sum(-1) // 4 % 2 == 1)[..., None]
        e = np.where(odd_group, np.abs(v - q.astype(np.float32)), -1)
        far = e.argmax(-1)[..., None]  # the first of equals, as C's strict >
        vf, qf = np.take_along_axis(v, far, -1), np.take_along_axis(q, far, -1)
        step = np.where(vf > qf, 1, np.where(vf < qf, -1, np.where(qf > 0, -1, 1)))
        moved = np.where(np.abs(qf + step) > FAST_Q, qf - step, qf + step)
        np.put_along_axis(q, far, np.where(fix, moved, qf), -1)
    return q, scale


def tables(x: np.ndarray, K: int, G: int, exact: bool):
    """x [N, K] -> (int tables [N, K/4, 16] as int32, block scales float32 [N, K/Kb]): entry idx
    of a group of 4 is the exact sum_i (bit i of idx ? +q_i : -q_i) of act_ints' integers.
    Fast mode: |T| <= 254; the C side stores one int8 plane of halves (an odd group's rounded
    down and up by turns, which cancels in every block sum) and doubles the scale; exact mode:
    |T| <= 4 * EXACT_Q, stored as two signed byte planes T = 256*hi + lo."""
    q, ts = act_ints(x, K, G, exact)
    q = q.reshape(x.shape[0], K // 4, 4)
    return np.where(_BITS, q[:, :, None, :], -q[:, :, None, :]).sum(-1), ts


def block_sums(w: PackedLinear, T: np.ndarray) -> np.ndarray:
    """Integer sums [N, Mt*16, P, K/Kb]: for each row, plane and block, sum of table entries
    picked by the plane's 4-bit slices (rows past M are padding: all bits 0)."""
    planes, _, _ = unpack(w)
    Kb = act_block(w.K, w.G)
    Mp = w.tiles * TILE
    bits = np.pad(planes > 0, ((0, 0), (0, Mp - w.M), (0, 0))).reshape(w.P, Mp, w.K // 4, 4)
    idx = (bits * (1 << np.arange(4))).sum(-1)  # [P, Mp, K/4]
    picked = np.take_along_axis(T[:, None, None, :, :], idx[None, :, :, :, None], axis=-1)[..., 0]
    s = picked.reshape(T.shape[0], w.P, Mp, w.K // Kb, Kb // 4).sum(-1)
    return s.transpose(0, 2, 1, 3).astype(np.int32)


def scaled_sums(w: PackedLinear, S: np.ndarray) -> np.ndarray:
    """The integer sums each stored scale multiplies, [N, Mt*16, P or 1, K/Kb]: the block
    sums themselves, or for a uniform layer sum_p 2^p * S_p (plane p's scale is h * 2^p),
    combined in integer as the kernels do."""
    if not w.uniform:
        return S
    return (S.astype(np.int64) << np.arange(w.P)[:, None]).sum(2, keepdims=True)


def int_gemm_sums(w: PackedLinear, x: np.ndarray, per_plane: bool = False, exact: bool = True) -> np.ndarray:
    """The integer GEMM (c/lut.c, many tokens): weights decoded to integers, a
    uniform layer's planes combined as sum_p 2^p B_p (per_plane, or a per-plane layer: each
    B_p), times the exact-mode activations, summed per row and block: int64 [N, Mt*16, P or 1,
    K/Kb]. Rows past M are padding (all bits 0: B = -1). Its claim: this equals
    scaled_sums(w, block_sums(w, tables(x, exact))), the tables' sums, so both paths
    feed the same integers into the same float steps."""
    planes, _, _ = unpack(w)
    Kb = act_block(w.K, w.G)
    Mp = w.tiles * TILE
    B = np.pad(planes.astype(np.int64), ((0, 0), (0, Mp - w.M), (0, 0)), constant_values=-1)
    if w.uniform and not per_plane:
        B = (B << np.arange(w.P)[:, None, None]).sum(0, keepdims=True)
    q, _ = act_ints(np.atleast_2d(np.asarray(x, np.float32)), w.K, w.G, exact)
    return np.einsum("cmbk,nbk->nmcb", B.reshape(B.shape[0], Mp, w.K // Kb, Kb), q.astype(np.int64))


def gemm(w: PackedLinear, x: np.ndarray, exact: bool = False):
    """Reference of lutkernels.gemm: returns (y [N, M] float64, integer block sums per plane)."""
    x = np.atleast_2d(np.asarray(x, np.float32))
    T, ts = tables(x, w.K, w.G, exact)
    S = block_sums(w, T)
    _, _, offsets = unpack(w)
    Kb = act_block(w.K, w.G)
    blk_scale = np.repeat(stored_scales(w).astype(np.float64), w.G // Kb, axis=2)  # [P or 1, M, K/Kb]
    y = np.einsum("nmpb,pmb,nb->nm", scaled_sums(w, S)[:, : w.M].astype(np.float64), blk_scale,
                  ts.astype(np.float64))
    if offsets is not None:
        xsum = x.astype(np.float64).reshape(x.shape[0], w.K // w.G, w.G).sum(-1)
        y += xsum @ offsets.astype(np.float64).T
    return y, S


def error_bound(w: PackedLinear, x: np.ndarray, exact: bool = False) -> np.ndarray:
    """Bound on |gemm(w, x) - dense(w) @ x| per output [N, M] implied by rounding the
    activations: each is off by at most half its block's step, so a lookup by 4 halves; in fast
    mode one of a block's may be off by a whole step (act_ints), so by 5 halves."""
    x = np.atleast_2d(np.asarray(x, np.float32))
    _, ts = tables(x, w.K, w.G, exact)
    _, scales, _ = unpack(w)
    Kb = act_block(w.K, w.G)
    per_lookup = (4 if exact else 5) * 0.5 * ts.astype(np.float64)  # [N, K/Kb]
    blk_scale = np.abs(np.repeat(scales.astype(np.float64), w.G // Kb, axis=2)).sum(0)  # [M, K/Kb]
    return (Kb // 4) * per_lookup @ blk_scale.T
