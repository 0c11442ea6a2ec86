"""Round-to-nearest uniform quantization, expressed in the bit-plane form the LUT kernel runs.

A b-bit code q = sum_p 2^p * bit_p, with bit_p = (B_p + 1) / 2 and B_p in {-1, +1}, gives

    s*q + zmin = sum_p s*2^(p-1) * B_p  +  (zmin + s*(2^b - 1)/2)

so a uniform grid is b planes with scales s*2^(p-1) and one offset per group:
packed in the format's uniform mode, which stores only s/2 (plane 0's scale).
Asymmetric: the grid spans each group's [min, max]. Symmetric: it spans
[-max|w|, +max|w|] with no offset stored (levels +-s/2, +-3s/2, ...).

Scales and offsets are stored as float16, so codes are chosen against the
float16 grid actually stored: the reconstruction is then exactly what
lutkernels.dense gives, and the error stays within half a step.

With 8-bit scales (scale8, lutkernels/layout.py) the plane-0 scale h = s/2 is
an 8-bit float (16 steps per octave) and the offset a multiple of h/8. Each
group tries the 8-bit h just above its ideal one (large enough to span the
group and to reach its centre in 127 eighths), the one just below (a finer
grid that clips the extremes) and 0, each with its nearest offset and codes,
and keeps the one with the smallest squared error. On SmolLM2's Q4_1 source
weights this loses 0.05 perplexity (wiki, dense path) at 4.5 instead of 5.0
bits per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import lutkernels as lk

# Rows quantized and packed at once (a multiple of the 16-row tile): bounds the
# per-plane bit arrays of a large head to a few tens of MB.
ROW_CHUNK = 2048


@dataclass(frozen=True)
class Codes:
    q: np.ndarray  # uint8 [M, K], 0 .. 2^bits - 1
    scale: np.ndarray  # float32 [M, K/G], each a float16 value (the grid step s)
    offset: np.ndarray | None  # float32 [M, K/G], float16 values (grid centre), None when symmetric
    bits: int
    G: int
    scale8: bool = False  # h = scale/2 an 8-bit float, offset a multiple of h/8 (lutkernels/layout.py)


def group_size(K: int, preferred: int = 128) -> int:
    """The largest kernel group size not above `preferred` that divides K (or K itself if preferred)."""
    if preferred == K:
        return K
    for g in sorted(lk.GROUP_SIZES, reverse=True):
        if g <= preferred and K % g == 0:
            return g
    raise lk.LayoutError(f"no group size <= {preferred} divides K={K}")


def codes(W: np.ndarray, bits: int, G: int, symmetric: bool = False, scale8: bool = False) -> Codes:
    """Round-to-nearest codes of W [M, K] in groups of G columns."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    M, K = W.shape
    lk.check_shape(M, K, bits, G)
    Wg = np.asarray(W, np.float64).reshape(M, K // G, G)
    half = (2**bits - 1) / 2
    if scale8:
        return _codes8(Wg, bits, G, symmetric)
    if symmetric:
        scale = _f16_at_least(np.abs(Wg).max(-1) / half)
        offset = None
        centre = np.zeros_like(scale, dtype=np.float64)
    else:
        lo, hi = Wg.min(-1), Wg.max(-1)
        scale = _f16_at_least((hi - lo) / (2 * half))
        offset = _f16(lo + scale * half)
        centre = offset.astype(np.float64)
    s = scale.astype(np.float64)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    q = np.rint((Wg - centre[..., None]) * inv[..., None] + half)
    q = np.clip(q, 0, 2 * half).astype(np.uint8).reshape(M, K)
    return Codes(q, scale, offset, bits, G)


def _ideal8(Wg: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each group's wanted plane-0 scale h (spanning the group, and reaching its centre in
    127 eighths) and its centre."""
    half = (2**bits - 1) / 2
    if symmetric:
        return np.abs(Wg).max(-1) / (2 * half), np.zeros(Wg.shape[:2])
    lo, hi = Wg.min(-1), Wg.max(-1)
    centre = (hi + lo) / 2
    return np.maximum((hi - lo) / (4 * half), np.abs(centre) * (8 / 127)), centre


def _codes8(Wg: np.ndarray, bits: int, G: int, symmetric: bool) -> Codes:
    """codes() on 8-bit scales: the best of three candidate h per group (module docstring).
    A group that needs more than the largest 8-bit scale gets it and clips at its ends:
    gptq's error feedback can push a low-bit group there, and its grid must still exist."""
    M, ng, _ = Wg.shape
    half = (2**bits - 1) / 2
    ideal, centre = _ideal8(Wg, bits, symmetric)
    up = np.clip(np.searchsorted(lk.layout.F8_VALUES, ideal), 1, 255)
    best_err = np.full((M, ng), np.inf)
    best = None
    for code in (up, np.maximum(up - 1, 1), np.zeros_like(up)):
        h = lk.layout.F8_VALUES[code].astype(np.float64)
        off = np.zeros_like(h)
        if not symmetric:
            count = np.clip(np.rint(np.divide(8 * centre, h, out=np.zeros_like(h), where=h > 0)), -128, 127)
            off = lk.layout.offset8_decode(count, h).astype(np.float64)
        inv = np.divide(1.0, 2 * h, out=np.zeros_like(h), where=h > 0)
        q = np.clip(np.rint((Wg - off[..., None]) * inv[..., None] + half), 0, 2 * half)
        err = ((Wg - (2 * h[..., None] * (q - half) + off[..., None])) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        if best is None:
            best = [q, h, off]
        else:
            best = [np.where(better[..., None], q, best[0]), np.where(better, h, best[1]), np.where(better, off, best[2])]
    q, h, off = best
    return Codes(q.astype(np.uint8).reshape(M, ng * G), (2 * h).astype(np.float32),
                 None if symmetric else off.astype(np.float32), bits, G, True)


def reconstruct(c: Codes) -> np.ndarray:
    """The float32 matrix the codes stand for: s*(q - (2^b-1)/2) + offset.
    s*(q - half) is exact in float32, so the one rounding is the offset's
    addition, the same one lutkernels.dense makes."""
    M, K = c.q.shape
    q = c.q.reshape(M, K // c.G, c.G).astype(np.float32) - np.float32((2**c.bits - 1) / 2)
    W = q * c.scale[..., None]
    if c.offset is not None:
        W += c.offset[..., None]
    return W.reshape(M, K)


def to_packed(c: Codes) -> lk.PackedLinear:
    """Uniform-mode layer: one stored scale s/2 per group (exact in float16: _f16_at_least)."""
    p = np.arange(c.bits, dtype=np.uint8)
    planes = ((c.q[None] >> p[:, None, None]) & 1).astype(bool)
    return lk.pack(planes, c.scale[None] / np.float32(2), c.offset, uniform=True, scale8=c.scale8)


def quantize(W: np.ndarray, bits: int = 4, group: int = 128, symmetric: bool = False,
             scale8: bool = False) -> lk.PackedLinear:
    """float32 W [M, K] -> PackedLinear of `bits` planes; group is the preferred
    group size, lowered to the largest kernel group size dividing K."""
    M, K = W.shape
    G = group_size(K, group)
    if scale8:
        lk.check_shape(M, K, bits, G)
        if _ideal8(np.asarray(W, np.float64).reshape(M, K // G, G), bits, symmetric)[0].max() > lk.layout.F8_MAX:
            raise ValueError(f"weights out of range for 8-bit scales (a group needs a step above "
                             f"{2 * lk.layout.F8_MAX}): use 16-bit scales")
    parts = [to_packed(codes(W[r:r + ROW_CHUNK], bits, G, symmetric, scale8)) for r in range(0, M, ROW_CHUNK)]
    return _concat_rows(parts)


def _concat_rows(parts: list[lk.PackedLinear]) -> lk.PackedLinear:
    """Row chunks that are whole 16-row tiles (all but the last) stack along the tile axis."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    offsets = None if first.offsets is None else np.concatenate([p.offsets for p in parts])
    return lk.PackedLinear(sum(p.M for p in parts), first.K, first.P, first.G,
                           np.concatenate([p.planes for p in parts]), np.concatenate([p.scales for p in parts]),
                           offsets, first.uniform, first.scale8)


def _f16(x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float16)
    _check_f16_range(h)
    return h.astype(np.float32)


def _f16_at_least(x: np.ndarray) -> np.ndarray:
    """Smallest usable float16 step >= x: a step rounded down would leave the
    group's extremes off the grid. Below 2^-13 steps are multiples of 2^-23, so
    that the plane-0 scale s/2 is itself a float16 (not rounded on packing)."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    tiny = x < 2.0**-13
    h[tiny] = np.ceil(x[tiny] * 2.0**23) * 2.0**-23
    _check_f16_range(h)
    return h.astype(np.float32)


def _check_f16_range(a: np.ndarray) -> None:
    if not np.isfinite(np.asarray(a, np.float16)).all():
        raise ValueError("weights out of float16 range: scales or offsets would overflow")
