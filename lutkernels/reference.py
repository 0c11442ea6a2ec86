"""numpy reference of the whole LUT matmul: tables, integer block sums, output.

It reproduces the C tables bit for bit (same float32 operation order and
round-half-even), so integer sums must equal the kernels' exactly; the float
output is computed in float64 and matches the kernels to rounding.
"""
import numpy as np

from .layout import TILE, PackedLinear, act_block, stored_scales, unpack

EXACT_Q = 2047  # exact-mode activations: integers up to this (c/lut_internal.h LUT_EXACT_Q)
_IDX = np.arange(16)
_BITS = ((_IDX[:, None] >> np.arange(4)) & 1).astype(bool)  # [16 entries, 4 activations]


def _sums16(xg: np.ndarray) -> np.ndarray:
    """xg [..., 4] float32 -> [..., 16]: entries 8..15 as ((x3 +- x2) +- x1) +- x0, 0..7 negated."""
    out = np.empty(xg.shape[:-1] + (16,), np.float32)
    for idx in range(8, 16):
        v = xg[..., 3].copy()
        for i in (2, 1, 0):
            v = v + xg[..., i] if idx >> i & 1 else v - xg[..., i]
        out[..., idx] = v
        out[..., 15 - idx] = -v
    return out


def exact_ints(x: np.ndarray, K: int, G: int):
    """x [N, K] -> (exact-mode activations: integers |q| <= EXACT_Q, int32 [N, K/Kb, Kb];
    their block scales float32 [N, K/Kb]), rounded as the C tables round them."""
    Kb = act_block(K, G)
    xb = x.astype(np.float32).reshape(x.shape[0], K // Kb, Kb)
    maxabs = np.abs(xb).max(-1)
    inv = np.where(maxabs > 0, np.float32(EXACT_Q) / np.where(maxabs > 0, maxabs, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv[..., None]), -EXACT_Q, EXACT_Q).astype(np.int32)
    return q, (maxabs / np.float32(EXACT_Q)).astype(np.float32)


def tables(x: np.ndarray, K: int, G: int, exact: bool):
    """x [N, K] -> (int tables [N, K/4, 16] as int32, block scales float32 [N, K/Kb]).

    Fast mode: int8 tables, scale max|T| / 127 per block. Exact mode: the tables
    are the exact integer sums of activations rounded to integers up to EXACT_Q
    (|T| <= 4 * EXACT_Q); the C side stores them as two signed byte planes T = 256*hi + lo."""
    Kb = act_block(K, G)
    N = x.shape[0]
    xb = x.astype(np.float32).reshape(N, K // Kb, Kb)
    if exact:
        q, ts = exact_ints(x, K, G)
        q = q.reshape(N, K // 4, 4)
        T = np.where(_BITS, q[:, :, None, :], -q[:, :, None, :]).sum(-1)
        return T, ts
    t = _sums16(xb.reshape(N, K // Kb, Kb // 4, 4))
    maxabs = np.abs(t).max(axis=(-1, -2))
    inv = np.where(maxabs > 0, np.float32(127) / np.where(maxabs > 0, maxabs, 1), 0).astype(np.float32)
    T = np.clip(np.rint(t * inv[..., None, None]), -127, 127).astype(np.int32).reshape(N, K // 4, 16)
    return T, (maxabs / np.float32(127)).astype(np.float32)


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


def int_gemm_sums(w: PackedLinear, x: np.ndarray, per_plane: bool = False) -> np.ndarray:
    """The integer GEMM of exact mode (c/lut.c, many tokens): weights decoded to integers, a
    uniform layer's planes combined as sum_p 2^p B_p (per_plane, or a per-plane layer: each
    B_p), times the exact-mode activations, summed per row and block: int64 [N, Mt*16, P or 1,
    K/Kb]. Rows past M are padding (all bits 0: B = -1). Its claim: this equals
    scaled_sums(w, block_sums(w, tables(x, exact=True))), the tables' sums, so both paths
    feed the same integers into the same float steps."""
    planes, _, _ = unpack(w)
    Kb = act_block(w.K, w.G)
    Mp = w.tiles * TILE
    B = np.pad(planes.astype(np.int64), ((0, 0), (0, Mp - w.M), (0, 0)), constant_values=-1)
    if w.uniform and not per_plane:
        B = (B << np.arange(w.P)[:, None, None]).sum(0, keepdims=True)
    q, _ = exact_ints(np.atleast_2d(np.asarray(x, np.float32)), w.K, w.G)
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
    """Bound on |gemm(w, x) - dense(w) @ x| per output [N, M] implied by table quantization:
    each lookup is off by at most half a table step (fast), or each activation by half an
    activation step (exact)."""
    x = np.atleast_2d(np.asarray(x, np.float32))
    _, ts = tables(x, w.K, w.G, exact)
    _, scales, _ = unpack(w)
    Kb = act_block(w.K, w.G)
    per_lookup = (4 if exact else 1) * 0.5 * ts.astype(np.float64)  # [N, K/Kb]
    blk_scale = np.abs(np.repeat(scales.astype(np.float64), w.G // Kb, axis=2)).sum(0)  # [M, K/Kb]
    return (Kb // 4) * per_lookup @ blk_scale.T
