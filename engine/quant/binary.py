"""1-bit sign binarization per group, with an optional residual plane (BiLLM-style), and the
plane-fit plumbing the low-bit quantizers share (msb.py, ternary.py).

One plane:  W ~= s*B + z,          B = sign(W - mean), per group of G weights of a row.
Two planes: W ~= s1*B1 + s2*B2 + z, B2 = sign of the residual W - z - s1*B1.
The planes are chosen greedily as BiLLM does; the scales and the offset are then
least-squares fitted to those planes, which can only lower the error.
Honestly counted, P planes cost P bits plus (P + 1) float16 values per group:
1 + 32/G or 2 + 48/G bits per weight (times row padding, see lutkernels/layout.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import lutkernels as lk

from . import rtn

ROW_GROUP = 0  # `group` value asking for one group per row (G = K)
BLOCK = 1 << 20  # weights per row block


@dataclass(frozen=True)
class Fit:
    """A layer in the kernel's form: W ~= sum_p scales[p] * planes[p] (+ offsets), per group."""
    planes: np.ndarray  # int8 [P, M, K] of +-1
    scales: np.ndarray  # float32 [P, M, K/G], float16 values
    offsets: np.ndarray | None  # float32 [M, K/G], float16 values

    @property
    def G(self) -> int:
        return self.planes.shape[2] // self.scales.shape[2]


def fit(W: np.ndarray, planes: int = 1, group: int = 64) -> Fit:
    if planes not in (1, 2):
        raise ValueError(f"binary takes 1 or 2 planes, got {planes!r}")
    G = resolve_group(W, group)
    return concat([_fit_block(W[rows], planes, G) for rows in row_blocks(*W.shape)])


def quantize(W: np.ndarray, planes: int = 1, group: int = 64) -> lk.PackedLinear:
    """float32 W [M, K] -> PackedLinear of 1 or 2 sign planes with an offset per group."""
    return to_packed(fit(W, planes, group))


def _fit_block(W: np.ndarray, planes: int, G: int) -> Fit:
    M, K = W.shape
    w = grouped(W, G)
    z = np.mean(w, -1, keepdims=True)
    B = [signs(w - z)]
    if planes == 2:
        r = w - z - np.mean(np.abs(w - z), -1, keepdims=True) * B[0]
        B.append(signs(r))
    A = np.stack(B + [np.ones_like(w)], -1)
    beta = f16(lstsq(A, w))
    return Fit(ungroup(np.stack(B), M, K).astype(np.int8), to_rows(beta[..., :-1], M, K, G),
               to_rows(beta[..., -1:], M, K, G)[0])


# ---- shared plumbing --------------------------------------------------------------------------

def resolve_group(W: np.ndarray, group: int) -> int:
    """G for the matrix W [M, K]: ROW_GROUP (0) is the whole row; any other size is a preferred
    one, lowered as engine.quant.rtn lowers it (a row length of one matrix to a kernel group size
    on another)."""
    if np.ndim(W) != 2 or 0 in np.shape(W):
        raise ValueError(f"weights must be a non-empty matrix [M, K], got shape {np.shape(W)}")
    K = W.shape[1]
    if K % lk.layout.CHUNK:
        raise ValueError(f"K must be a multiple of {lk.layout.CHUNK}, got {K}")
    if not isinstance(group, (int, np.integer)) or group < 0:
        raise ValueError(f"group must be a kernel group size ({', '.join(map(str, lk.GROUP_SIZES))}), a row "
                         f"length or {ROW_GROUP} (whole row), got {group!r}")
    return K if group == ROW_GROUP else rtn.group_size(K, group)


def row_blocks(M: int, K: int) -> list[slice]:
    """Rows fitted at once: bounds the float64 design matrices to tens of MB on any layer."""
    rows = max(1, BLOCK // K)
    return [slice(r, min(r + rows, M)) for r in range(0, M, rows)]


def concat(fits: list[Fit]) -> Fit:
    offsets = None if fits[0].offsets is None else np.concatenate([f.offsets for f in fits])
    return Fit(np.concatenate([f.planes for f in fits], 1), np.concatenate([f.scales for f in fits], 1), offsets)


def check_planes(P: int) -> None:
    if not 1 <= P <= 8:
        raise ValueError(f"the kernel runs 1..8 planes, this asks for {P}")


def grouped(W: np.ndarray, G: int) -> np.ndarray:
    """float64 [M*K/G, G]: one row per group."""
    return np.asarray(W, np.float64).reshape(-1, G)


def ungroup(x: np.ndarray, M: int, K: int) -> np.ndarray:
    """[P, M*K/G, G] -> [P, M, K]."""
    return x.reshape(len(x), M, K)


def to_rows(beta: np.ndarray, M: int, K: int, G: int) -> np.ndarray:
    """Per-group values [M*K/G, P] -> float32 [P, M, K/G]."""
    return np.ascontiguousarray(beta.T.reshape(-1, M, K // G), dtype=np.float32)


def signs(x: np.ndarray) -> np.ndarray:
    """+-1 with 0 -> +1 (a plane has no zero)."""
    return np.where(x >= 0, 1.0, -1.0)


def lstsq(A: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per group, the least-squares beta of w ~= A @ beta: A [n, G, P], w [n, G] -> [n, P].
    Batched normal equations; the pseudo-inverse gives the minimum-norm solution
    where planes coincide within a group (a constant group, say)."""
    At = A.transpose(0, 2, 1)
    return (np.linalg.pinv(At @ A, rcond=1e-10, hermitian=True) @ (At @ w[..., None]))[..., 0]


def f16(x: np.ndarray) -> np.ndarray:
    """float64 holding the float16 values that will be stored."""
    h = np.asarray(x).astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("weights out of float16 range: scales or offsets would overflow")
    return h.astype(np.float64)


def reconstruct(f: Fit) -> np.ndarray:
    """The float32 matrix the fit stands for, summed as lutkernels.dense sums it (plane order,
    float32), so the packed layer reproduces it bit for bit."""
    W = (f.planes * np.repeat(f.scales, f.G, axis=2)).sum(0, dtype=np.float32)
    if f.offsets is not None:
        W += np.repeat(f.offsets, f.G, axis=1)
    return W


def to_packed(f: Fit) -> lk.PackedLinear:
    return lk.pack(f.planes, f.scales, f.offsets)
