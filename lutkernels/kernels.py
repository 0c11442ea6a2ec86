"""Python face of the C core: argument checks, ISA and thread control, gemv/gemm.

Checks happen here, once per call, so that a wrong dtype, a strided view or a
shape mismatch is a clear exception instead of a silent copy or a crash in C.
"""
import os

import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds

from ._lut import ffi, lib
from . import trellis
from .layout import PackedLinear, check_shape

ISAS = tuple(ffi.string(lib.lut_isa_name(i)).decode() for i in range(4))


class KernelError(RuntimeError):
    """The C core refused a call."""


def supported_isas() -> list[str]:
    mask = lib.lut_isa_supported()
    return [name for i, name in enumerate(ISAS) if mask >> i & 1]


def cpu_features() -> dict:
    """What this CPU can run and what is in use."""
    return {"supported": supported_isas(), "isa": get_isa(), "threads": get_threads()}


def set_isa(name: str) -> None:
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}; known: {', '.join(ISAS)}")
    if lib.lut_set_isa(ISAS.index(name)) != 0:
        raise KernelError(f"ISA {name!r} is not supported by this CPU (supported: {', '.join(supported_isas())})")


def get_isa() -> str:
    return ISAS[lib.lut_isa()]


def set_threads(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    rc = lib.lut_set_threads(int(n))
    if rc != 0:
        raise KernelError(f"could not start {n} threads (code {rc})")


def get_threads() -> int:
    return lib.lut_threads()


def set_igemm_rows(n: int) -> None:
    """Calls with at least n tokens run the integer GEMM (the same outputs, faster for many
    tokens); 0 restores the defaults, chosen per path by speed."""
    if not isinstance(n, (int, np.integer)) or not 0 <= n < 2**31:
        raise ValueError(f"igemm rows must be a non-negative 32-bit integer, got {n!r}")
    lib.lut_set_igemm_rows(int(n))


def set_int8_gemm(on: bool) -> None:
    """False: the integer GEMM keeps to its int16 variant even where the CPU has the int8 one
    (the same outputs, so tests can run both paths on one machine); True (the default): int8."""
    lib.lut_set_int8(int(bool(on)))


def _apply_env_isa() -> None:
    name = os.environ.get("LUTENGINE_ISA")
    if name:
        set_isa(name)


class Layer:
    """A PackedLinear with its C descriptor built once (the arrays must stay alive)."""
    C_NAME = "lut_gemm"

    def __init__(self, w: PackedLinear):
        check_shape(w.M, w.K, w.P, w.G)
        Mt = w.tiles
        _require(w.planes, np.uint8, (Mt, w.K // 32, w.P, 64), "planes")
        _require(w.scales, np.uint8 if w.scale8 else np.float16, (Mt, w.K // w.G, w.scale_planes, 16), "scales")
        if w.offsets is not None:
            _require(w.offsets, np.int8 if w.scale8 else np.float16, (Mt, w.K // w.G, 16), "offsets")
        self.w = w
        self.c = ffi.new("lut_layer *")
        self.c.M, self.c.K, self.c.P, self.c.G = w.M, w.K, w.P, w.G
        self.c.uniform = int(bool(w.uniform))
        self.c.scale8 = int(bool(w.scale8))
        self.c.int_grid = int(bool(w.int_grid))
        self.c.planes = ffi.from_buffer("uint8_t[]", w.planes)
        self.c.scales = ffi.from_buffer(w.scales)
        self.c.offsets = ffi.NULL if w.offsets is None else ffi.from_buffer(w.offsets)

    def call(self, x, n: int, y, acc, exact: int = 0):
        return lib.lut_gemm(self.c, x, n, y, exact, acc)


class TrellisLayer:
    """A TrellisLinear with its C descriptor built once."""
    C_NAME = "lut_trellis_gemm"

    def __init__(self, w: trellis.TrellisLinear):
        trellis.check_shape(w.M, w.K, w.k)
        _require(w.streams, np.uint8, (w.K * w.stride + trellis.SLACK,), "streams")
        _require(w.scales, np.float32, (w.tiles * 16,), "scales")
        self.w = w
        self.c = ffi.new("lut_trellis *")
        self.c.M, self.c.K, self.c.k = w.M, w.K, w.k
        self.c.streams = ffi.from_buffer("uint8_t[]", w.streams)
        self.c.scales = ffi.cast("const float *", ffi.from_buffer(w.scales))

    def call(self, x, n: int, y, acc, exact: int = 0):
        """exact: trellis layers always quantize activations to int8 (there are no tables to keep exactly)."""
        return lib.lut_trellis_gemm(self.c, x, n, y, acc)


def _require(a, dtype, shape, name):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not _within_its_memory(a):
        raise ValueError(f"{name} reaches beyond the memory it views (an as_strided array with lying strides?)")


def _within_its_memory(a: np.ndarray) -> bool:
    """Whether a's bytes lie inside every buffer it is a view of. A contiguous view made by
    as_strided can claim more than its base holds; C would then read past the end."""
    lo, hi = byte_bounds(a)
    base = a.base
    while base is not None:
        if isinstance(base, np.ndarray):
            blo, bhi = byte_bounds(base)
        elif hasattr(base, "__array_interface__"):  # as_strided's wrapper: its interface is the view's own claim
            base = getattr(base, "base", None)
            continue
        else:
            try:
                blo, bhi = byte_bounds(np.frombuffer(base, np.uint8))
            except (TypeError, ValueError, BufferError):
                return True  # an exporter numpy cannot view: nothing to compare against
        if lo < blo or hi > bhi:
            return False
        base = getattr(base, "base", None)
    return True


def layer(w) -> Layer | TrellisLayer:
    """The C descriptor of a quantized layer (built once; pass it to gemm/gemv in loops)."""
    if isinstance(w, (Layer, TrellisLayer)):
        return w
    if isinstance(w, PackedLinear):
        return Layer(w)
    if isinstance(w, trellis.TrellisLinear):
        return TrellisLayer(w)
    raise TypeError(f"expected a PackedLinear, TrellisLinear or their Layer, got {type(w).__name__}")


def gemm(w, x: np.ndarray, out: np.ndarray | None = None, exact: bool = False, acc: np.ndarray | None = None):
    """Y[N, M] = X[N, K] @ W.T through the C kernels. x must be float32 and C-contiguous. exact
    applies to bit-plane layers (trellis layers always take int8 activations).
    acc, if given, receives the integer block sums int32 [N, ceil(M/16)*16, P, K/Kb], per
    plane in both scale modes ([N, ceil(M/16)*16, K/32] for a trellis layer)."""
    L = layer(w)
    M, K = L.w.M, L.w.K
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"x must be a 2-D numpy array [N, K={K}], got {getattr(x, 'shape', type(x).__name__)}")
    _require(x, np.float32, (x.shape[0], K), "x")
    if x.shape[0] < 1:
        raise ValueError("x must have at least one row")
    N = x.shape[0]
    if out is None:
        out = np.empty((N, M), np.float32)
    _require(out, np.float32, (N, M), "out")
    acc_ptr = ffi.NULL
    if acc is not None:
        shape = (N, L.w.tiles * 16, K // trellis.BLOCK) if isinstance(L, TrellisLayer) else \
            (N, L.w.tiles * 16, L.w.P, K // lib.lut_act_block(K, L.w.G))
        _require(acc, np.int32, shape, "acc")
        acc_ptr = ffi.cast("int32_t *", ffi.from_buffer(acc))
    xp, yp = ffi.cast("const float *", ffi.from_buffer(x)), ffi.cast("float *", ffi.from_buffer(out))
    rc = L.call(xp, N, yp, acc_ptr, int(bool(exact)))
    if rc != 0:
        raise KernelError(f"{L.C_NAME} failed with code {rc}")
    return out


def gemv(w, x: np.ndarray, out: np.ndarray | None = None, exact: bool = False) -> np.ndarray:
    """y[M] = W @ x[K] through the LUT kernels."""
    if not isinstance(x, np.ndarray) or x.ndim != 1:
        raise ValueError(f"x must be a 1-D numpy array, got {getattr(x, 'shape', type(x).__name__)}")
    y = gemm(w, x.reshape(1, -1) if x.flags.c_contiguous else x[None], None if out is None else out.reshape(1, -1), exact)
    return y[0]


def stream_read(buf: np.ndarray) -> float:
    """Sum a float32 C-contiguous array on the kernel thread pool (set_threads):
    the streaming-read roofline of bench/kernels.py. Returns the sum, so the
    reads are not optimised away. Not to be called concurrently with gemm."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.float32 or not buf.flags.c_contiguous:
        raise TypeError("buf must be a C-contiguous float32 numpy array")
    return lib.lut_stream_read(ffi.cast("const float *", ffi.from_buffer(buf)), buf.size)


_apply_env_isa()
