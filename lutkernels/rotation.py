"""An orthogonal rotation of vectors of length F = a*n (n a power of two) that costs
O(F (log n + a)) to apply instead of a dense product's F^2: R = (mix (x) H_n / sqrt(n)) diag(signs),
with H_n the Walsh-Hadamard matrix, mix an orthogonal a x a matrix and signs +-1.

The quantizer turns the MLP's hidden activations by such an R (engine/quant/rotate.py) and
the runtime applies it to every token before down_proj (c/ops.c lut_rotate_rows). `reference`
is the definition; `apply` is the C path, equal to it up to float32 rounding.
"""
import numpy as np

from ._lut import ffi, lib
from .kernels import _require


def split(F: int) -> tuple[int, int]:
    """(a, n): n the largest power of two dividing F, a = F / n."""
    if F < 1:
        raise ValueError(f"a rotation needs a positive length, got {F}")
    n = F & -F
    return F // n, n


def check(signs: np.ndarray, mix: np.ndarray, F: int) -> None:
    """A rotation of length F: signs [F] of +-1 and mix [a, a] for split(F)'s a."""
    a, _ = split(F)
    if np.shape(signs) != (F,) or np.shape(mix) != (a, a):
        raise ValueError(f"MLP rotation must be signs [{F}] and mix [{a}, {a}], "
                         f"got {np.shape(signs)} and {np.shape(mix)}")
    if not np.all(np.abs(signs) == 1):
        raise ValueError("MLP rotation signs must all be +1 or -1")


def reference(x: np.ndarray, signs: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """R x for every row of x [..., F], in x's precision (float64 for folding R into weights)."""
    a = len(mix)
    F = x.shape[-1]
    n = F // a
    z = (x * signs).reshape(-1, a, n)
    h = 1
    while h < n:
        pairs = z.reshape(-1, a, n // (2 * h), 2, h)
        z = np.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], axis=-2)
        h *= 2
    z = z.reshape(-1, a, n)
    return (np.einsum("ij,rjp->rip", mix, z) / np.sqrt(n)).reshape(x.shape).astype(x.dtype)


def checked(x: np.ndarray, signs: np.ndarray, mix: np.ndarray, tmp: np.ndarray) -> tuple[int, int]:
    """(a, n) once the C call's arrays are float32, C-contiguous and of matching shapes."""
    _require(x, np.float32, x.shape, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be [rows, F], got shape {x.shape}")
    F = x.shape[1]
    a, n = split(F)
    _require(signs, np.float32, (F,), "signs")
    _require(mix, np.float32, (a, a), "mix")
    _require(tmp, np.float32, (F,), "tmp")
    return a, n


def apply(x: np.ndarray, signs: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """x [rows, F] float32, C-contiguous: x <- R x row by row, in place; returns x."""
    tmp = np.empty(x.shape[-1], np.float32)
    a, n = checked(x, signs, mix, tmp)
    rows = x.shape[0]
    f = ffi.from_buffer
    lib.lut_rotate_rows(ffi.cast("float *", f(x)), rows, a, n, ffi.cast("float *", f(signs)),
                        ffi.cast("float *", f(mix)), ffi.cast("float *", f(tmp)))
    return x
