"""The packed bit-plane weight format, as executable numpy: the spec of c/lut.h.

A linear layer W[M, K] is P binary planes B_p in {-1, +1}^(M x K) with a float16
scale per plane, row and group of G columns, and an optional float16 offset per
row and group:

    W ~= sum_p s_p[m, k // G] * B_p[m, k]  +  z[m, k // G]

Two scale modes share everything else:

    per-plane  (uniform=False) one stored scale per plane: s_p as given (HLQ,
               multi-scale binary, any per-plane fit);
    uniform    (uniform=True) one stored scale h per row and group, the scale of
               plane 0; plane p's scale is implied as h * 2^p. A b-bit uniform
               grid of step s has h = s/2: W = s * sum_p 2^(p-1) * B_p + z.
               Storing h rather than s lets the kernels combine the planes'
               integer sums as sum_p 2^p * S_p and multiply once by h.

The integer grid (int_grid=True: uniform, no stored offsets) implies each
row and group's offset as -h: the levels are 2h times the integers
-2^(P-1) .. 2^(P-1)-1, zero among them. It is llama.cpp's Q4_0 / Q5_0 / Q8_0
grid, so a source stored in those types is kept exactly at their bits
(h = d/2; a negative h mirrors the grid, as a negative d does there).

Two storage widths for scales and offsets share everything else too:

    16-bit     (scale8=False) float16 scales and offsets;
    8-bit      (scale8=True) each scale an 8-bit float code (f8_decode: 0, or
               16 steps per octave from about 1.3e-4 to 7.75; scales must be
               >= 0), each offset an int8 count c of eighths of the row and
               group's first scale h0 (plane 0's): z = (h0 * c) * 0.125, so
               z lies in [-16, 15.875] * h0.

Kernel layout (TILE = 16 rows, CHUNK = 32 columns, Mt = ceil(M / 16),
S = 1 if uniform else P):

    planes   uint8   [Mt, K/32, P, 64]
    scales   float16 [Mt, K/G,  S, 16]     (uint8 codes when scale8)
    offsets  float16 [Mt, K/G,  16]        (optional; int8 when scale8)

Stored bits per weight, P + w*S/G + w/G (w = 16, or 8 when scale8; the last
term with offsets), times ceil(M/16)*16/M for row padding: 4 bits with offsets
at G = 32 cost 4 + 0.5 + 0.5 = 5.0 uniform (as llama.cpp's Q4_1),
4 + 0.25 + 0.25 = 4.5 uniform with 8-bit scales, and 4 + 2 + 0.5 = 6.5 per-plane.

Inside one 64-byte chunk, byte b belongs to row 16*tile + b % 16 and lane b // 16;
its low nibble holds columns 4*lane .. 4*lane+3 of the chunk and its high nibble
columns 16 + 4*lane .. 16 + 4*lane+3; bit i of a nibble is 1 where B = +1 for
the i-th of those four columns. One 128-bit lane thus needs one 16-entry table:
this is what lets vpshufb / vqtbl1q look up 16 rows at once. Padding rows have
all bits 0 and zero scales.
"""
from dataclasses import dataclass

import numpy as np

TILE = 16
CHUNK = 32
GROUP_SIZES = (32, 64, 128, 256)


class LayoutError(ValueError):
    """A layer's shape, group size or arrays do not fit the format."""


@dataclass(frozen=True)
class PackedLinear:
    M: int
    K: int
    P: int
    G: int
    planes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    uniform: bool = False  # one stored scale per row and group, plane p's implied as scale * 2^p
    scale8: bool = False  # 8-bit float scales and int8 offsets instead of float16
    int_grid: bool = False  # offsets not stored: each is -h (uniform only), the levels 2h * integers

    @property
    def tiles(self) -> int:
        return -(-self.M // TILE)

    @property
    def scale_planes(self) -> int:
        """S: scales stored per row and group (1 when uniform, else P)."""
        return 1 if self.uniform else self.P

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.planes, self.scales, self.offsets) if a is not None)

    def bits_per_weight(self) -> float:
        """Every stored bit (planes, scales, offsets, row padding) over M*K weights."""
        return 8.0 * self.nbytes() / (self.M * self.K)


def check_shape(M: int, K: int, P: int, G: int) -> None:
    if M < 1:
        raise LayoutError(f"M must be at least 1, got {M}")
    if K < CHUNK or K % CHUNK:
        raise LayoutError(f"K must be a positive multiple of {CHUNK}, got {K}")
    if not 1 <= P <= 8:
        raise LayoutError(f"number of planes must be 1..8, got {P}")
    if G not in GROUP_SIZES and G != K:
        raise LayoutError(f"group size must be one of {GROUP_SIZES} or K={K}, got {G}")
    if K % G:
        raise LayoutError(f"group size {G} does not divide K={K}")


def act_block(K: int, G: int) -> int:
    """Activations sharing one table scale and one integer accumulator (divides G)."""
    if G <= 256:
        return G
    return next(b for b in (256, 128, 64, 32) if K % b == 0)


F8_BIAS = 13  # code 16e + m (m < 16) stands for (1 + m/16) * 2^(e - F8_BIAS); code 0 for 0


def f8_decode(codes) -> np.ndarray:
    """8-bit float scale codes -> float32 (c/lut_internal.h: lut_f8)."""
    codes = np.asarray(codes, np.uint8)
    e, m = (codes >> 4).astype(np.float32), (codes & 15).astype(np.float32)
    return np.where(codes > 0, (1 + m / 16) * np.float32(2) ** (e - F8_BIAS), 0).astype(np.float32)


F8_VALUES = f8_decode(np.arange(256))  # increasing in the code
F8_MAX = float(F8_VALUES[-1])


def f8_encode(values) -> np.ndarray:
    """Nearest 8-bit float code of each value in [0, F8_MAX] (ties to the smaller)."""
    v = np.asarray(values, np.float64)
    if not np.all((v >= 0) & (v <= F8_MAX)):
        raise LayoutError(f"8-bit scales must lie in [0, {F8_MAX}], got values in [{v.min():.6g}, {v.max():.6g}]")
    hi = np.clip(np.searchsorted(F8_VALUES, v), 1, 255)
    lo = hi - 1
    return np.where(v - F8_VALUES[lo] <= F8_VALUES[hi] - v, lo, hi).astype(np.uint8)


def offset8_encode(offsets, h0) -> np.ndarray:
    """int8 counts c with (h0 * c) * 0.125 nearest each offset; h0: the decoded first scales."""
    z, h0 = np.asarray(offsets, np.float64), np.asarray(h0, np.float64)
    c = np.rint(np.divide(8 * z, h0, out=np.zeros_like(z), where=h0 > 0))
    if np.any((c < -128) | (c > 127)) or np.any((h0 == 0) & (z != 0)):
        raise LayoutError("8-bit offsets must lie in [-16, 15.875] times their group's first scale")
    return c.astype(np.int8)


def offset8_decode(counts, h0) -> np.ndarray:
    """float32 offsets (h0 * c) * 0.125, in the kernels' order (both products exact)."""
    return (np.asarray(h0, np.float32) * np.asarray(counts, np.float32)) * np.float32(0.125)


def pack(planes, scales, offsets=None, uniform: bool = False, scale8: bool = False,
         int_grid: bool = False) -> PackedLinear:
    """planes: [P, M, K] of +-1 (or bool, True = +1); scales: [P, M, K/G], or when uniform
    [1, M, K/G] holding plane 0's scale h (plane p's is h * 2^p); offsets: [M, K/G];
    int_grid: uniform, offsets None, each implied as -h.
    Scales and offsets are rounded to what is stored: float16, or with scale8 the
    nearest 8-bit float (scales outside [0, F8_MAX] are an error) and the nearest
    eighth of the decoded first scale (offsets beyond 127 eighths are an error)."""
    planes = np.asarray(planes)
    if planes.ndim != 3:
        raise LayoutError(f"planes must be [P, M, K], got shape {planes.shape}")
    P, M, K = planes.shape
    S = 1 if uniform else P
    scales = np.asarray(scales, dtype=np.float32)
    if scales.ndim != 3 or scales.shape[:2] != (S, M) or scales.shape[2] == 0 or K % scales.shape[2]:
        raise LayoutError(f"scales must be [{'1 (uniform)' if uniform else f'P={P}'}, M={M}, K/G], "
                          f"got shape {scales.shape}")
    G = K // scales.shape[2] if K >= CHUNK and K % CHUNK == 0 else 0
    check_shape(M, K, P, G if G else -1)
    if int_grid and (not uniform or offsets is not None):
        raise LayoutError("the integer grid is a uniform layer whose offsets are implied (-h), not stored")
    if offsets is not None:
        offsets = np.asarray(offsets, dtype=np.float32)
        if offsets.shape != (M, K // G):
            raise LayoutError(f"offsets must be [M={M}, K/G={K // G}], got shape {offsets.shape}")
    bits = (planes > 0) if planes.dtype != np.bool_ else planes
    Mt = -(-M // TILE)
    pad = Mt * TILE - M
    bits = np.pad(bits, ((0, 0), (0, pad), (0, 0))).astype(np.uint8)
    # [P, Mt, 16 rows, K/32 chunks, 2 halves, 4 lanes, 4 bits]
    b = bits.reshape(P, Mt, TILE, K // CHUNK, 2, 4, 4)
    nib = (b * (1 << np.arange(4, dtype=np.uint8))).sum(-1, dtype=np.uint8)  # [P, Mt, 16, C, 2, 4]
    byte = nib[..., 0, :] | (nib[..., 1, :] << 4)  # [P, Mt, 16 rows, C, 4 lanes]
    packed = byte.transpose(1, 3, 0, 4, 2).reshape(Mt, K // CHUNK, P, 64)  # byte = lane*16 + row
    sc = np.pad(scales, ((0, 0), (0, pad), (0, 0)))
    sc = f8_encode(sc) if scale8 else sc.astype(np.float16)
    off = None
    if offsets is not None:
        off = np.pad(offsets, ((0, pad), (0, 0)))
        off = offset8_encode(off, F8_VALUES[sc[0]]) if scale8 else off.astype(np.float16)
        off = np.ascontiguousarray(off.reshape(Mt, TILE, K // G).transpose(0, 2, 1))
    sc = sc.reshape(S, Mt, TILE, K // G).transpose(1, 3, 0, 2)
    return PackedLinear(M, K, P, G, np.ascontiguousarray(packed), np.ascontiguousarray(sc), off, bool(uniform),
                        bool(scale8), bool(int_grid))


def stored_scales(w: PackedLinear) -> np.ndarray:
    """The scales as stored, float32 [S, M, K/G] (S = 1 when uniform: plane 0's scale)."""
    S = w.scale_planes
    sc = w.scales.transpose(2, 0, 3, 1).reshape(S, w.tiles * TILE, w.K // w.G)[:, : w.M]
    return f8_decode(sc) if w.scale8 else sc.astype(np.float32)


def unpack(w: PackedLinear):
    """Inverse of pack: (planes int8 [P, M, K] of +-1, scales float32 [P, M, K/G], offsets or None).
    Uniform scales come back expanded to every plane (h * 2^p, exact in float32); the integer
    grid's implied offsets as -h."""
    Mt, C = w.tiles, w.K // CHUNK
    byte = w.planes.reshape(Mt, C, w.P, 4, TILE).transpose(2, 0, 4, 1, 3)  # [P, Mt, 16, C, 4 lanes]
    nib = np.stack([byte & 15, byte >> 4], axis=-2)  # [P, Mt, 16, C, 2, 4]
    bits = (nib[..., None] >> np.arange(4, dtype=np.uint8)) & 1
    planes = (bits.reshape(w.P, Mt * TILE, w.K)[:, : w.M].astype(np.int8) * 2 - 1)
    scales = stored_scales(w)
    if w.uniform:
        scales = scales * np.float32(2.0) ** np.arange(w.P, dtype=np.float32)[:, None, None]
    offsets = None
    if w.offsets is not None:
        offsets = w.offsets.transpose(0, 2, 1).reshape(Mt * TILE, w.K // w.G)[: w.M]
        offsets = offset8_decode(offsets, scales[0]) if w.scale8 else offsets.astype(np.float32)
    elif w.int_grid:
        offsets = -scales[0]
    return planes, scales, offsets


def dense(w: PackedLinear) -> np.ndarray:
    """The float32 matrix the packed layer stands for."""
    planes, scales, offsets = unpack(w)
    W = (planes * np.repeat(scales, w.G, axis=2)).sum(0, dtype=np.float32)
    if offsets is not None:
        W += np.repeat(offsets, w.G, axis=1)
    return W
