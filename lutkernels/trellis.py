"""The trellis-coded weight format, as executable numpy: the spec of c/trellis.c.

A layer W[M, K] stores each column j as one bitstream running down the rows. Row
i's weight decodes from a window of L = k + 8 bits of that stream:

    u[i, j] = bits [k*i, k*i + L) of stream j          (bit t = bit t%8 of byte t//8)
    W[i, j] = s[i] * value(u[i, j])

so consecutive rows share 8 bits of state and each row adds k new bits: k bits
per weight buy a 256-state trellis (a bitshift trellis, as in QTIP), and the
quantizer (engine/quant/trellis.py) picks each column's whole stream with the
Viterbi algorithm. On Gaussian data this leaves about 40% less squared error than
the best uniform grid of the same bits (3 bits: 0.019 against 0.037 of the
variance), which scalar grids cannot reach at any group size.

value() is computed, not stored: a multiply-add of the window modulo 2^32 and
the sum of its four bytes, centred; a sum of four near-independent bytes is near
Gaussian (standard deviation about 148), which is the distribution rotated
weights have. The constants were picked by a search over random odd multipliers
for the lowest Viterbi error on Gaussian data.

Stored: streams uint8 [K, 2*k*Mt + 1] (Mt = ceil(M/16) tiles of 16 rows, so a
tile's windows start at byte 2*k*t of its column: 8 bits of initial state, then
k bits per row, padding rows included) followed by 16 zero bytes that let the
kernels load 16 bytes at any tile; scales float32 [Mt*16] (0 on padding rows).
Bits per weight: (K*(16*k*Mt + 8) + 128 + 32*16*Mt) / (M*K), about k + 8/M + 32/K.

The kernels quantize each token's activations to int8 per block of 32 (scale
max|x|/127, rounding half to even), sum q[j] * value(u[i, j]) over a block in
int32 (exact: |sum| <= 32 * 127 * 510), and combine the blocks in float32 as
acc = acc + a_b * S_b (the product rounded, then the sum), then y[i] = s[i] * acc.
"""
from dataclasses import dataclass

import numpy as np

TILE = 16
MEMORY = 8  # state bits shared by consecutive rows
MAX_BITS = 6  # a tile's windows then lie in 16 bytes: (15*k + 7) // 8 + 4 <= 16
BLOCK = 32  # activations per int8 scale and per integer sum
SLACK = 16  # zero bytes after the streams
MUL, ADD = 2004492963, 1608935200
VALUE_STD = 147.8  # of value() over uniform windows: 4 uniform bytes, sqrt(4 * (256^2 - 1) / 12)


class TrellisError(ValueError):
    """A trellis layer's shape or arrays do not fit the format."""


def check_shape(M: int, K: int, k: int) -> None:
    if M < 1:
        raise TrellisError(f"M must be at least 1, got {M}")
    if K < BLOCK or K % BLOCK:
        raise TrellisError(f"K must be a positive multiple of {BLOCK}, got {K}")
    if not 1 <= k <= MAX_BITS:
        raise TrellisError(f"trellis bits per weight must be 1..{MAX_BITS}, got {k}")


def value(u) -> np.ndarray:
    """int32 value of each window (any integer array of windows < 2^32)."""
    x = (np.asarray(u, np.uint64) * np.uint64(MUL) + np.uint64(ADD)) & np.uint64(0xFFFFFFFF)
    s = sum((x >> np.uint64(8 * b)) & np.uint64(255) for b in range(4))
    return s.astype(np.int32) - 510


def codebook(k: int) -> np.ndarray:
    """float64 value of every window of k + MEMORY bits, for the quantizer."""
    return value(np.arange(1 << (k + MEMORY))).astype(np.float64)


@dataclass(frozen=True)
class TrellisLinear:
    M: int
    K: int
    k: int
    streams: np.ndarray  # uint8 [K * stride + SLACK]
    scales: np.ndarray  # float32 [Mt * 16]

    @property
    def tiles(self) -> int:
        return -(-self.M // TILE)

    @property
    def stride(self) -> int:
        """Bytes per column stream."""
        return 2 * self.k * self.tiles + 1

    @property
    def P(self) -> int:
        """Bits per weight of the codes (what `planes` is to a bit-plane layer)."""
        return self.k

    def nbytes(self) -> int:
        return self.streams.nbytes + self.scales.nbytes

    def bits_per_weight(self) -> float:
        """Every stored bit (streams, their slack, scales, row padding) over M*K weights."""
        return 8.0 * self.nbytes() / (self.M * self.K)


def bits_per_weight(M: int, K: int, k: int) -> float:
    """What a TrellisLinear of this shape stores per weight (TrellisLinear.bits_per_weight)."""
    Mt = -(-M // TILE)
    return 8.0 * (K * (2 * k * Mt + 1) + SLACK + 4 * TILE * Mt) / (M * K)


def pack(windows, scales, k: int) -> TrellisLinear:
    """windows: int [M, K], each column's windows a valid trellis path (row i+1's window
    shifted down by k bits equals row i's window's top 8 bits); scales: [M] (>= 0)."""
    u = np.asarray(windows, np.int64)
    M, K = u.shape
    check_shape(M, K, k)
    scales = np.asarray(scales, np.float32)
    if scales.shape != (M,):
        raise TrellisError(f"scales must be [M={M}], got shape {scales.shape}")
    if u.min() < 0 or u.max() >= 1 << (k + MEMORY) or np.any(u[1:] & 255 != u[:-1] >> k):
        raise TrellisError("windows are not a trellis path (each row's low 8 bits must be the previous row's high 8)")
    Mt = -(-M // TILE)
    # the stream's bits: the first window's 8 state bits, then each window's k new bits; padding rows 0
    new = np.zeros((Mt * TILE, K), np.int64)
    new[:M] = u >> MEMORY
    bits = np.concatenate([(u[:1] >> np.arange(MEMORY)[:, None]) & 1,
                           ((new[:, None, :] >> np.arange(k)[None, :, None]) & 1).reshape(Mt * TILE * k, K)])
    streams = np.packbits(bits.T.astype(np.uint8), axis=1, bitorder="little")  # [K, stride]
    out = np.concatenate([streams.ravel(), np.zeros(SLACK, np.uint8)])
    return TrellisLinear(M, K, k, out, np.pad(scales, (0, Mt * TILE - M)))


def windows(w: TrellisLinear) -> np.ndarray:
    """int64 [Mt*16, K]: every row's window (padding rows included), read back from the streams."""
    L = w.k + MEMORY
    s = w.streams[:w.K * w.stride].reshape(w.K, w.stride)
    bits = np.unpackbits(s, axis=1, bitorder="little").astype(np.int64)  # [K, 8 * stride]
    rows = w.tiles * TILE
    idx = w.k * np.arange(rows)[:, None] + np.arange(L)[None, :]  # [rows, L]
    return (bits[:, idx] << np.arange(L)).sum(-1).T


def dense(w: TrellisLinear) -> np.ndarray:
    """The float32 matrix the layer stands for."""
    return (w.scales[:, None] * value(windows(w)).astype(np.float32))[: w.M]


def quantize_acts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, K] -> (int32 q [N, K], float32 block scales a [N, K/32]): the kernels' activations."""
    x = np.asarray(x, np.float32)
    N, K = x.shape
    xb = x.reshape(N, K // BLOCK, BLOCK)
    mx = np.abs(xb).max(-1)
    inv = np.where(mx > 0, np.float32(127) / np.where(mx > 0, mx, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int32).reshape(N, K)
    return q, (mx / np.float32(127)).astype(np.float32)


def block_sums(w: TrellisLinear, x: np.ndarray) -> np.ndarray:
    """int32 [N, Mt*16, K/32]: the integer sums the kernels compute (their `acc` output)."""
    q, _ = quantize_acts(x)
    V = value(windows(w)).astype(np.int64)  # [rows, K]
    N = q.shape[0]
    prod = q.astype(np.int64)[:, None, :] * V[None]  # [N, rows, K]
    return prod.reshape(N, V.shape[0], w.K // BLOCK, BLOCK).sum(-1).astype(np.int32)


def gemm(w: TrellisLinear, x: np.ndarray) -> np.ndarray:
    """float32 [N, M]: y = W x as the kernels compute it, up to the float rounding of the block
    combination (numpy has no fused multiply-add; the C paths agree with each other exactly)."""
    _, a = quantize_acts(x)
    S = block_sums(w, x).astype(np.float64)
    acc = (S * a[:, None, :].astype(np.float64)).sum(-1)
    return (acc * w.scales[None, :]).astype(np.float32)[:, : w.M]
