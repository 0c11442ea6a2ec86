"""Bound C calls for a decode step (c/ops.c, and lut_gemm for one token).

Each bind_* checks its arrays once and casts their pointers once, returning a
callable that only makes the C call: a decode step is then a few dozen direct
calls instead of hundreds of checked numpy calls. The callables hold the
arrays, so the buffers stay alive as long as they do.
"""
from typing import Callable

import numpy as np

from ._lut import ffi, lib
from .kernels import KernelError, TrellisLayer, _require, layer
from .layout import PackedLinear
from .rotation import checked


def _ptr(a: np.ndarray | None, size: int, name: str):
    if a is None:
        return ffi.NULL
    _require(a, np.float32, a.shape, name)
    if a.size != size:
        raise ValueError(f"{name} must have {size} elements, got {a.size}")
    return ffi.cast("float *", ffi.from_buffer(a))


def bind_gemv(w, x: np.ndarray, y: np.ndarray, exact: bool = False) -> Callable[[], None]:
    """y = W x for one token (exact: LUT layers build exact tables); x holds K floats, y M floats."""
    L = layer(w)
    xp, yp = _ptr(x, L.w.K, "x"), _ptr(y, L.w.M, "y")
    if isinstance(L, TrellisLayer):
        fn, args = lib.lut_trellis_gemm, (L.c, xp, 1, yp, ffi.NULL)
    else:
        fn, args = lib.lut_gemm, (L.c, xp, 1, yp, int(bool(exact)), ffi.NULL)
    name = L.C_NAME

    def call(keep=(L, x, y)):
        rc = fn(*args)
        if rc:
            raise KernelError(f"{name} failed with code {rc}")

    return call


def fusable(layers) -> bool:
    """Whether bind_gemm_multi takes these layers: bit-plane layers sharing K and G, at most LUT_FUSE_MAX."""
    ws = [getattr(L, "w", L) for L in layers]
    return (1 <= len(ws) <= lib.LUT_FUSE_MAX and all(isinstance(w, PackedLinear) for w in ws)
            and len({(w.K, w.G) for w in ws}) == 1)


def bind_gemm_multi(layers, x: np.ndarray, ys, exact: bool = False) -> Callable[..., None]:
    """call(n = all rows): ys[l][:n] = x[:n] @ W_l.T for the first n rows of x (N rows of K floats;
    ys[l] N rows of M_l) in one C call (lut_gemm_multi: the activations' tables or integers made
    once, one pool run over every layer's tiles), each ys[l] as lutkernels.gemm would give it bit
    for bit; the layers must be fusable."""
    if not fusable(layers):
        raise ValueError(f"cannot fuse these layers: bit-plane layers sharing K and G, 1..{lib.LUT_FUSE_MAX} of them")
    Ls = [layer(w) for w in layers]
    if len(ys) != len(Ls):
        raise ValueError(f"{len(Ls)} layers need {len(Ls)} outputs, got {len(ys)}")
    rows = x.size // Ls[0].w.K if isinstance(x, np.ndarray) else 0
    xp = _ptr(x, rows * Ls[0].w.K, "x")
    descs = ffi.new("lut_layer *[]", [L.c for L in Ls])
    outs = ffi.new("float *[]", [_ptr(y, rows * L.w.M, f"ys[{i}]") for i, (L, y) in enumerate(zip(Ls, ys))])
    fn, head = lib.lut_gemm_multi, (descs, len(Ls), xp)
    tail = (outs, int(bool(exact)))

    def call(n: int = rows, keep=(Ls, x, tuple(ys), descs, outs)):
        if not 1 <= n <= rows:
            raise ValueError(f"n must be 1..{rows}, got {n}")
        rc = fn(*head, n, *tail)
        if rc:
            raise KernelError(f"lut_gemm_multi failed with code {rc}")

    return call


def bind_add_rmsnorm(x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float,
                     y: np.ndarray) -> Callable[[], None]:
    """x += delta (unless None); y = w * x / sqrt(mean(x^2) + eps)."""
    n = w.size
    args = (_ptr(x, n, "x"), _ptr(delta, n, "delta"), _ptr(w, n, "w"), n, float(eps), _ptr(y, n, "y"))
    fn = lib.lut_add_rmsnorm
    return lambda keep=(x, delta, w, y): fn(*args)


def bind_silu_mul(g: np.ndarray, u: np.ndarray) -> Callable[[], None]:
    """g = silu(g) * u."""
    args = (_ptr(g, g.size, "g"), _ptr(u, g.size, "u"), g.size)
    fn = lib.lut_silu_mul
    return lambda keep=(g, u): fn(*args)


def bind_gelu_tanh_mul(g: np.ndarray, u: np.ndarray) -> Callable[[], None]:
    """g = gelu_tanh(g) * u (GELU's tanh approximation)."""
    args = (_ptr(g, g.size, "g"), _ptr(u, g.size, "u"), g.size)
    fn = lib.lut_gelu_tanh_mul
    return lambda keep=(g, u): fn(*args)


def bind_head_rmsnorm(x: np.ndarray, heads: int, w: np.ndarray, eps: float) -> Callable[[], None]:
    """Each of x's heads (runs of w.size floats) in place: x = w * x / sqrt(mean(x^2) + eps)."""
    args = (_ptr(x, heads * w.size, "x"), heads, w.size, _ptr(w, w.size, "w"), float(eps))
    fn = lib.lut_head_rmsnorm
    return lambda keep=(x, w): fn(*args)


def bind_rotate(x: np.ndarray, signs: np.ndarray, mix: np.ndarray) -> Callable[[], None]:
    """x <- R x (lutkernels/rotation.py) for one token's x [1, F]."""
    tmp = np.empty(x.shape[-1], np.float32)
    a, n = checked(x, signs, mix, tmp)
    args = (_ptr(x, x.size, "x"), 1, a, n, _ptr(signs, signs.size, "signs"), _ptr(mix, mix.size, "mix"),
            _ptr(tmp, tmp.size, "tmp"))
    fn = lib.lut_rotate_rows
    return lambda keep=(x, signs, mix, tmp): fn(*args)


KV_TYPES = {np.dtype(np.float32): lib.LUT_KV_F32, np.dtype(np.float16): lib.LUT_KV_F16,
            np.dtype(np.int8): lib.LUT_KV_Q8}


def _cache_ptr(a: np.ndarray, shape: tuple, name: str):
    _require(a, a.dtype, shape, name)
    return ffi.cast("void *", ffi.from_buffer(a))


def bind_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, biases, cos: np.ndarray, sin: np.ndarray,
                   k_cache: np.ndarray, v_cache: np.ndarray, heads: int, scores: np.ndarray,
                   out: np.ndarray, k_scale: np.ndarray | None = None,
                   v_scale: np.ndarray | None = None, query_scale: float | None = None,
                   window: int | None = None) -> Callable[[int], None]:
    """step(pos): biases (q, k, v; or None), RoPE at pos, k and v into row pos of the
    caches [positions, kv_heads, d], attention of q over rows 0..pos into out. The caches'
    dtype is their type (lut.h): float32, float16, or int8 with float32 scales
    [positions, kv_heads] (k_scale, v_scale; only for int8). Scores are scaled by
    1/sqrt(query_scale), head size d by default; window: only the last window rows (None: all)."""
    positions, kv_heads, d = k_cache.shape
    if cos.shape != (positions, d // 2) or sin.shape != cos.shape or v_cache.shape != k_cache.shape:
        raise ValueError("RoPE tables and caches must cover the same positions and head size")
    if heads % kv_heads:
        raise ValueError(f"{heads} heads do not group over {kv_heads} kv heads")
    kind = KV_TYPES.get(k_cache.dtype)
    if kind is None or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"KV caches must both be float32, float16 or int8, got {k_cache.dtype} and {v_cache.dtype}")
    quantized = kind == lib.LUT_KV_Q8
    if quantized != (k_scale is not None) or quantized != (v_scale is not None):
        raise ValueError("scales go with an int8 cache, and only with one")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive number of positions, got {window!r}")
    qb, kb, vb = biases if biases is not None else (None, None, None)
    kv = kv_heads * d
    work = np.empty(lib.LUT_ATTN_ROWS * d + heads, np.float32)
    caches = (_cache_ptr(k_cache, k_cache.shape, "k_cache"), _cache_ptr(v_cache, k_cache.shape, "v_cache"),
              _ptr(k_scale, positions * kv_heads, "k_scale"), _ptr(v_scale, positions * kv_heads, "v_scale"))
    args = (_ptr(q, heads * d, "q"), _ptr(k, kv, "k"), _ptr(v, kv, "v"), _ptr(qb, heads * d, "q_bias"),
            _ptr(kb, kv, "k_bias"), _ptr(vb, kv, "v_bias"), _ptr(cos, cos.size, "cos"), _ptr(sin, sin.size, "sin"),
            kind, *caches)
    tail = (heads, kv_heads, d, float(d if query_scale is None else query_scale), window or 0,
            _ptr(scores, heads * positions, "scores"), _ptr(work, work.size, "work"),
            _ptr(out, heads * d, "out"))
    fn = lib.lut_attention_step

    def step(pos: int, keep=(q, k, v, biases, cos, sin, k_cache, v_cache, k_scale, v_scale, scores, work,
                             out)) -> None:
        if not 0 <= pos < positions:
            raise ValueError(f"position {pos} outside the cache of {positions}")
        fn(*args, pos, *tail)

    return step


def attention_prompt(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int, query_scale: float | None = None,
                     window: int | None = None) -> np.ndarray:
    """Causal grouped-query attention of a prompt's queries q [n, heads, d] (RoPE applied) at
    positions pos..pos+n-1 over float32 keys and values k, v [pos+n, kv_heads, d], on the kernel
    thread pool: [n, heads*d]. Each query's row equals the decode step's (bind_attention) bit
    for bit. query_scale: scores scaled by 1/sqrt(query_scale) (None: d); window: each query
    sees its last window positions only (None: all)."""
    n, heads, d = q.shape
    T, kv_heads, dk = k.shape
    if v.shape != k.shape or dk != d or T != pos + n or pos < 0:
        raise ValueError(f"keys and values must be [{pos + n}, kv_heads, {d}], got {k.shape} and {v.shape}")
    if heads % kv_heads:
        raise ValueError(f"{heads} heads do not group over {kv_heads} kv heads")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive number of positions, got {window!r}")
    scratch = np.empty(lib.lut_attention_prompt_scratch(T, heads, kv_heads), np.float32)
    out = np.empty((n, heads * d), np.float32)
    rc = lib.lut_attention_prompt(_ptr(q, q.size, "q"), _ptr(k, k.size, "k"), _ptr(v, v.size, "v"), pos, n, heads,
                                  kv_heads, d, float(d if query_scale is None else query_scale), window or 0,
                                  _ptr(scratch, scratch.size, "scratch"), scratch.size, _ptr(out, out.size, "out"))
    if rc:
        raise KernelError(f"lut_attention_prompt failed with code {rc}")
    return out
