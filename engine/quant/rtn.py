"""Round-to-nearest uniform quantization, expressed in the bit-plane form the LUT kernel runs.

A b-bit code q = sum_p 2^p * bit_p, with bit_p = (B_p + 1) / 2 and B_p in {-1, +1}, gives

    s*q + zmin = sum_p s*2^(p-1) * B_p  +  (zmin + s*(2^b - 1)/2)

so a uniform grid is b planes with scales s*2^(p-1) and one offset per group:
packed in the format's uniform mode, which stores only s/2 (plane 0's scale).

Each group tries several grids and keeps the one with the least squared error.
The first spans the group: asymmetric [min, max], symmetric [-max|w|, +max|w|]
(no offset stored, levels +-s/2, +-3s/2, ...); its error stays within half a
step, and a group already on a uniform grid (a Q4_1 source at 4 bits, G 32)
is kept exactly. Asymmetric grids then try the group's own lattice (its
smallest gap between values, from its minimum), which keeps a group on a grid
it does not span (llama.cpp's k-quants) within float16's rounding of the
step. Then, up to 3 bits, CLIP_STEPS finer grids centred on the
group, each step 2^(-1/16) smaller, down to half: they clip the extremes to
round the bulk of the weights more finely. At 4 bits the gain in squared
error is small (0.0077 to 0.0073) and clipping cost Qwen2.5-Coder's
rtn4g128s8 c4 perplexity (61.341 to 62.403), so wider grids only span.
On rotated SmolLM2 (relative squared weight error, G 64, 8-bit scales) the
search takes 3 bits from 0.035 to 0.030 and 2 bits from 0.19 to 0.11; gptq 3 bits G 64 (act-order, rotated) went from wiki
27.248 to 22.289.

The integer grid (int_grid) is the symmetric grid llama.cpp's Q4_0, Q5_0 and
Q8_0 use: levels s * {-2^(b-1) .. 2^(b-1) - 1}, zero among them, and no offset
stored (lutkernels/layout.py: it is implied as -s/2). Its candidates put the
group's largest |w| on the grid's end, -2^(b-1) or 2^(b-1) - 1 steps out (the
step's sign free, so either end can be the long one); up to 3 bits, finer
ones as above. A group already on such a grid with a float16 step (a Q5_0 or
Q8_0 source) is kept exactly, at 5.5 and 8.5 bits per weight in groups of 32.

Scales and offsets are stored as float16, so codes are chosen against the
float16 grid actually stored: the reconstruction is then exactly what
lutkernels.dense gives.

With 8-bit scales (scale8, lutkernels/layout.py) the plane-0 scale h = s/2 is
an 8-bit float (16 steps per octave) and the offset a multiple of h/8. The
candidates are the 8-bit h at or above the group's ideal one (large enough to
span the group and to reach its centre in 127 eighths), the CLIP_STEPS codes
below it (above 3 bits the one code below), and 0, each with its nearest
offset. On SmolLM2's Q4_1 source weights 8-bit scales lose 0.05 perplexity (wiki, dense path) at 4.5 instead
of 5.0 bits per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import lutkernels as lk

# Rows quantized and packed at once (a multiple of the 16-row tile): bounds the
# per-plane bit arrays of a large head to a few tens of MB.
ROW_CHUNK = 2048
CLIP_STEPS = 16  # finer grids tried below the one spanning a group: steps 2^(-1/16) apart, down to half
CLIP_MAX_BITS = 3  # above it only the spanning grid: Qwen2.5-Coder rtn4g128s8 lost c4 61.341 -> 62.403 clipped


@dataclass(frozen=True)
class Codes:
    q: np.ndarray  # uint8 [M, K], 0 .. 2^bits - 1
    scale: np.ndarray  # float32 [M, K/G], each a float16 value (the grid step s)
    offset: np.ndarray | None  # float32 [M, K/G], float16 values (grid centre), None when symmetric
    bits: int
    G: int
    scale8: bool = False  # h = scale/2 an 8-bit float, offset a multiple of h/8 (lutkernels/layout.py)
    int_grid: bool = False  # offset is -scale/2, implied rather than stored; scale may be negative


def group_size(K: int, preferred: int = 128) -> int:
    """The largest kernel group size not above `preferred` that divides K (or K itself if preferred)."""
    if preferred == K:
        return K
    for g in sorted(lk.GROUP_SIZES, reverse=True):
        if g <= preferred and K % g == 0:
            return g
    raise lk.LayoutError(f"no group size <= {preferred} divides K={K}")


def codes(W: np.ndarray, bits: int, G: int, symmetric: bool = False, scale8: bool = False,
          int_grid: bool = False) -> Codes:
    """Round-to-nearest codes of W [M, K] in groups of G columns, each group on the candidate
    grid (module docstring) with the least squared error."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if int_grid and (symmetric or scale8 or bits < 2):
        raise ValueError("the integer grid takes 2..8 bits on float16 scales and is symmetric by itself")
    M, K = W.shape
    lk.check_shape(M, K, bits, G)
    Wg = np.asarray(W, np.float64).reshape(M, K // G, G)
    half = (2**bits - 1) / 2
    if int_grid:
        grids = list(_grids_int(Wg, bits))
    else:
        grids = list((_grids8 if scale8 else _grids16)(Wg, bits, symmetric))
    s, off = grids[0]
    if len(grids) > 1:
        # choose in float32 (the candidates' squared errors only rank them), then round once in float64
        W32 = Wg.astype(np.float32)
        err = np.stack([_round(W32, c, o, np.float32(half))[1] for c, o in grids])
        pick = np.argmin(err, axis=0)  # the first of equals: the spanning grid wins ties
        s = _pick([g[0] for g in grids], pick)
        off = None if symmetric else _pick([g[1] for g in grids], pick)
    q, _ = _round(Wg, s, off, half)
    return Codes(q.astype(np.uint8).reshape(M, K), s.astype(np.float32),
                 None if symmetric else off.astype(np.float32), bits, G, scale8, int_grid)


def _pick(candidates: list[np.ndarray], pick: np.ndarray) -> np.ndarray:
    return np.take_along_axis(np.stack(candidates), pick[None], 0)[0]


def _round(Wg: np.ndarray, s: np.ndarray, off: np.ndarray | None, half) -> tuple[np.ndarray, np.ndarray]:
    """Codes of each group [M, ng, G] on the grid of step s and centre off (in Wg's precision),
    and each group's squared error."""
    s = s.astype(Wg.dtype)
    centre = np.zeros_like(s) if off is None else off.astype(Wg.dtype)
    inv = np.divide(1, s, out=np.zeros_like(s), where=s != 0)
    q = np.clip(np.rint((Wg - centre[..., None]) * inv[..., None] + half), 0, 2 * half)
    d = Wg - (s[..., None] * (q - half) + centre[..., None])
    return q, np.einsum("mgk,mgk->mg", d, d)


def _clip_steps(bits: int) -> int:
    return CLIP_STEPS if bits <= CLIP_MAX_BITS else 0


def _shrink(k: int) -> float:
    return 2.0 ** (-k / 16)


def _grids16(Wg: np.ndarray, bits: int, symmetric: bool):
    """(step, offset) candidates on float16 scales: the grid spanning the group (its step
    rounded up, so that min and max stay on it), then finer ones centred on the group."""
    half = (2**bits - 1) / 2
    if symmetric:
        span = np.abs(Wg).max(-1) / half
        for k in range(_clip_steps(bits) + 1):
            yield _f16_at_least(span * _shrink(k)), None
        return
    lo, hi = Wg.min(-1), Wg.max(-1)
    span = (hi - lo) / (2 * half)
    scale = _f16_at_least(span)
    yield scale, _f16(lo + scale * half)
    lattice = _f16_at_least(_lattice_step(Wg, lo, hi, 2 * half))
    yield lattice, _f16(lo + lattice * half)
    centre = _f16((hi + lo) / 2)
    for k in range(1, _clip_steps(bits) + 1):
        yield _f16_at_least(span * _shrink(k)), centre


def _lattice_step(Wg: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: float) -> np.ndarray:
    """Each group's smallest gap between its distinct values, where the group fits `levels` + 1
    levels that far apart from its minimum (else the spanning step): the step of a group already
    on a grid it does not span, as llama.cpp's k-quants leave them (Q4_K: scale and minimum fitted
    to the group, not its ends; on Qwen2.5-Coder's Q4_K down_proj 21% of the groups of 32)."""
    gaps = np.diff(np.sort(Wg, axis=-1), axis=-1)
    gaps = np.where(gaps > (hi - lo)[..., None] * 1e-6, gaps, np.inf).min(-1)
    fits = np.isfinite(gaps) & ((hi - lo) <= gaps * levels * (1 + 1e-6))
    return np.where(fits, gaps, (hi - lo) / levels)


def _grids_int(Wg: np.ndarray, bits: int):
    """(step, offset -step/2) candidates of the integer grid: the group's largest |w| at the
    code -2^(b-1), then at 2^(b-1) - 1, then up to 3 bits finer steps from the first."""
    n = 2 ** (bits - 1)
    ext = np.take_along_axis(Wg, np.abs(Wg).argmax(-1)[..., None], -1)[..., 0]  # signed
    low = np.where(ext > 0, -1.0, 1.0)  # the step's sign that puts ext at code -n (the other: at n - 1)

    def grid(step, sign):
        s = sign * _f16_at_least(step)
        return s, -s / 2

    yield grid(np.abs(ext) / n, low)
    yield grid(np.abs(ext) / (n - 1), -low)
    for k in range(1, _clip_steps(bits) + 1):
        yield grid(np.abs(ext) / n * _shrink(k), low)


def _ideal8(Wg: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each group's wanted plane-0 scale h (spanning the group, and reaching its centre in
    127 eighths) and its centre."""
    half = (2**bits - 1) / 2
    if symmetric:
        return np.abs(Wg).max(-1) / (2 * half), np.zeros(Wg.shape[:2])
    lo, hi = Wg.min(-1), Wg.max(-1)
    centre = (hi + lo) / 2
    return np.maximum((hi - lo) / (4 * half), np.abs(centre) * (8 / 127)), centre


def _grids8(Wg: np.ndarray, bits: int, symmetric: bool):
    """(step, offset) candidates on 8-bit scales: the 8-bit h at or above the group's ideal one,
    CLIP_STEPS smaller ones (the format has 16 per octave), and 0, each with its nearest offset.
    A group that needs more than the largest 8-bit scale gets it and clips at its ends:
    gptq's error feedback can push a low-bit group there, and its grid must still exist."""
    ideal, centre = _ideal8(Wg, bits, symmetric)
    up = np.clip(np.searchsorted(lk.layout.F8_VALUES, ideal), 1, 255)
    # at least the code just below: the one above the ideal h can be a sixteenth of an octave too coarse
    for code in [np.maximum(up - k, 1) for k in range(max(_clip_steps(bits), 1) + 1)] + [np.zeros_like(up)]:
        h = lk.layout.F8_VALUES[code].astype(np.float32)
        if symmetric:
            yield 2 * h, None
            continue
        count = np.clip(np.rint(np.divide(8 * centre, h, out=np.zeros(h.shape), where=h > 0)), -128, 127)
        yield 2 * h, lk.layout.offset8_decode(count, h)


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
    return lk.pack(planes, c.scale[None] / np.float32(2), None if c.int_grid else c.offset, uniform=True,
                   scale8=c.scale8, int_grid=c.int_grid)


def quantize(W: np.ndarray, bits: int = 4, group: int = 128, symmetric: bool = False,
             scale8: bool = False, int_grid: bool = False) -> lk.PackedLinear:
    """float32 W [M, K] -> PackedLinear of `bits` planes; group is the preferred
    group size, lowered to the largest kernel group size dividing K."""
    M, K = W.shape
    G = group_size(K, group)
    if scale8:
        lk.check_shape(M, K, bits, G)
        if _ideal8(np.asarray(W, np.float64).reshape(M, K // G, G), bits, symmetric)[0].max() > lk.layout.F8_MAX:
            raise ValueError(f"weights out of range for 8-bit scales (a group needs a step above "
                             f"{2 * lk.layout.F8_MAX}): use 16-bit scales")
    parts = [to_packed(codes(W[r:r + ROW_CHUNK], bits, G, symmetric, scale8, int_grid)) for r in range(0, M, ROW_CHUNK)]
    return _concat_rows(parts)


def _concat_rows(parts: list[lk.PackedLinear]) -> lk.PackedLinear:
    """Row chunks that are whole 16-row tiles (all but the last) stack along the tile axis."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    offsets = None if first.offsets is None else np.concatenate([p.offsets for p in parts])
    return lk.PackedLinear(sum(p.M for p in parts), first.K, first.P, first.G,
                           np.concatenate([p.planes for p in parts]), np.concatenate([p.scales for p in parts]),
                           offsets, first.uniform, first.scale8, first.int_grid)


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
