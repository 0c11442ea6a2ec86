"""The llama-family transformer on the LUT matmul core (llama, qwen2, mistral and phi3 with
their sliding windows, gemma3 with its extra norms, GELU gating, per-layer RoPE bases and
soft-capped logits: models/config.py).

Every linear weight is either a float32 array (dense path: numpy matmul, the
float32 reference) or a PackedLinear (quantized path: the LUT kernels). A
prompt goes through in one batched numpy pass (GEMM over all its tokens). A
single token takes the decode path: buffers allocated once at construction and
C calls bound to them once (lutkernels.ops), because per-op numpy calls cost
about as much as the matmuls of a small model. The KV cache holds float32,
float16 or int8 rows (KVCache); both paths store it and read it back in that
type, so a prompt and its decoded continuation see the same keys and values.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import lutkernels as lk
from lutkernels import ops, rotation
from models.config import GEMMA_LAYER_NORMS, MLP_MIX, MLP_SIGNS, QK_NORMS, ModelConfig, ModelError, check_mlp_rotation

from .memory import check_kv_type

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
DEFAULT_MAX_CONTEXT = 4096
ATTN_BLOCK = 256  # queries per attention block of a prompt: scores stay [heads, 256, T]
KV_DTYPES = {"f32": np.float32, "f16": np.float16, "q8": np.int8}  # the names of memory.KV_TYPES

Weight = np.ndarray | lk.PackedLinear | lk.TrellisLinear


class Dense:
    """y = x @ W.T in float32 through BLAS (W.T is a view: no copy)."""

    def __init__(self, w: np.ndarray):
        self.wt = np.ascontiguousarray(w, np.float32).T

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.matmul(x, self.wt)

    def bind(self, x: np.ndarray, y: np.ndarray):
        wt = self.wt
        return lambda: np.matmul(x, wt, out=y)


class Packed:
    """y = x @ W.T through the C kernels (LUT or trellis), descriptor built once; exact: LUT
    tables of 12-bit activations instead of int8 ones (lut.h)."""

    def __init__(self, w: lk.PackedLinear | lk.TrellisLinear, exact: bool = False):
        self.layer = lk.layer(w)
        self.exact = exact

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return lk.gemm(self.layer, np.ascontiguousarray(x), exact=self.exact)

    def bind(self, x: np.ndarray, y: np.ndarray):
        return ops.bind_gemv(self.layer, x, y, self.exact)


def fuses(lins: Sequence[Dense | Packed]) -> bool:
    """Whether the layers run as one lut_gemm_multi call: bit-plane ones sharing K, G and table
    mode (the activations' tables or integers made once, one pool hand-off instead of one per
    layer; the same outputs bit for bit)."""
    return len(lins) > 1 and all(isinstance(f, Packed) for f in lins) and len({f.exact for f in lins}) == 1 \
        and ops.fusable([f.layer for f in lins])


def bind_linears(lins: Sequence[Dense | Packed], x: np.ndarray, ys: Sequence[np.ndarray], fuse: bool = True) -> tuple:
    """Calls computing ys[i] = lins[i](x) for one token: one call where the layers fuse, else one each."""
    if fuse and fuses(lins):
        return (ops.bind_gemm_multi([f.layer for f in lins], x, ys, lins[0].exact),)
    return tuple(f.bind(x, y) for f, y in zip(lins, ys))


def linears(lins: Sequence[Dense | Packed], x: np.ndarray) -> list[np.ndarray]:
    """[f(x) for f in lins] for many tokens, in one C call where the layers fuse."""
    if not fuses(lins):
        return [f(x) for f in lins]
    x = np.ascontiguousarray(x, np.float32)
    ys = [np.empty((len(x), f.layer.w.M), np.float32) for f in lins]
    ops.bind_gemm_multi([f.layer for f in lins], x, ys, lins[0].exact)()
    return ys


def linear(w: Weight, exact: bool = False) -> Dense | Packed:
    return Packed(w, exact) if isinstance(w, lk.QUANTIZED) else Dense(w)


EXACT_BPW = 5.0  # linear layers storing this many bits per weight or more run exact tables


def exact_tables(config: ModelConfig, weights: dict[str, Weight]) -> bool:
    """Whether the model's LUT layers, head included, should build exact tables: when its
    bit-plane linear layers store EXACT_BPW bits per weight or more, int8 tables round the
    activations about as coarsely as the weights are rounded. Qwen2.5-Coder rtn8g32 (9 bpw),
    wiki / c4: int8 tables 20.331 / 53.316 (measured when they held rounded float sums, of the
    same resolution as the exact int8 halves now), exact (12-bit) 20.309 / 53.219, dense
    20.292 / 53.199. Below it the weights' rounding dominates and int8 tables (one lookup per
    slice, not two) keep decode fast."""
    layers = [w for i in range(config.n_layers) for n in config.linear_shapes()
              if isinstance(w := weights[f"model.layers.{i}.{n}"], lk.PackedLinear)]
    if not layers:
        return False
    bits = sum(8 * w.nbytes() for w in layers) / sum(w.M * w.K for w in layers)
    return bits >= EXACT_BPW


@dataclass
class Block:
    attn_norm: np.ndarray
    q: Dense | Packed
    k: Dense | Packed
    v: Dense | Packed
    q_bias: np.ndarray | None
    k_bias: np.ndarray | None
    v_bias: np.ndarray | None
    o: Dense | Packed
    mlp_norm: np.ndarray
    gate: Dense | Packed
    up: Dense | Packed
    down: Dense | Packed
    window: int | None = None  # attention over the last window positions only (config.window)
    # gemma3: RMSNorm of each q and k head; of the attention output (then mlp_norm is the
    # pre-MLP norm) and of the MLP output, each before its residual add
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    attn_out_norm: np.ndarray | None = None
    mlp_out_norm: np.ndarray | None = None


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [head_dim/2], with config.rope_scaling applied (HF semantics); local:
    those of gemma3's sliding-window layers, base rope_local_theta and never scaled."""
    d = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    rs = {} if local else config.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv, rs)
    raise ModelError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def _llama3_inv_freq(inv: np.ndarray, rs: dict) -> np.ndarray:
    """Long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old / lo, inv / factor, inv)
    return np.where((wavelen >= old / hi) & (wavelen <= old / lo), blended, out)


def rope_tables(config: ModelConfig, n: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [n, head_dim/2] for positions 0..n-1 (local: rope_inv_freq's)."""
    angles = np.arange(n, dtype=np.float64)[:, None] * rope_inv_freq(config, local)[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class KVCache:
    """Keys and values [layers, positions, kv_heads, head_dim] of one type (memory.KV_TYPES):
    float32, float16 (rounded to nearest even), or q8: int8 per (position, kv head)
    row, symmetric, with one float32 scale max|x|/127 per row (lut.h LUT_KV_Q8; the
    C decode step stores the same bits as write)."""

    def __init__(self, kv_type: str, layers: int, positions: int, kv_heads: int, head_dim: int):
        self.kv_type = check_kv_type(kv_type)
        shape = (layers, positions, kv_heads, head_dim)
        self.k, self.v = np.zeros(shape, KV_DTYPES[kv_type]), np.zeros(shape, KV_DTYPES[kv_type])
        q8 = kv_type == "q8"
        self.k_scale = np.zeros(shape[:3], np.float32) if q8 else None
        self.v_scale = np.zeros(shape[:3], np.float32) if q8 else None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None)

    def describe(self) -> str:
        layers, positions = self.k.shape[:2]
        return f"KV cache {self.kv_type}, {positions} positions x {layers} layers: {self.nbytes:,} bytes"

    def write(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v float32 [n, kv_heads, head_dim] into positions pos..pos+n-1."""
        end = pos + len(k)
        for cache, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if scale is None:
                cache[layer, pos:end] = x  # float16: numpy rounds to nearest even
            else:
                cache[layer, pos:end], scale[layer, pos:end] = quantize_rows(x)

    def read(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions 0..end-1 as float32 (views for f32)."""
        if self.kv_type == "f32":
            return self.k[layer, :end], self.v[layer, :end]
        if self.kv_type == "f16":
            return self.k[layer, :end].astype(np.float32), self.v[layer, :end].astype(np.float32)
        return (dequantize_rows(self.k[layer, :end], self.k_scale[layer, :end]),
                dequantize_rows(self.v[layer, :end], self.v_scale[layer, :end]))

    def layer(self, i: int) -> tuple:
        """(k, v, k_scale, v_scale) of layer i, as ops.bind_attention takes them."""
        scales = (None, None) if self.k_scale is None else (self.k_scale[i], self.v_scale[i])
        return self.k[i], self.v[i], *scales

    def bind(self, i: int, q, k, v, biases, cos, sin, heads: int, scores, out, query_scale=None, window=None):
        """ops.bind_attention's step(pos) over layer i of this cache."""
        kc, vc, ks, vs = self.layer(i)
        return ops.bind_attention(q, k, v, biases, cos, sin, kc, vc, heads, scores, out, ks, vs, query_scale, window)

    def fresh(self) -> "KVCache":
        """An empty cache of the same type and size."""
        layers, positions, kv_heads, d = self.k.shape
        return KVCache(self.kv_type, layers, positions, kv_heads, d)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [..., d] -> int8 [..., d] and float32 scales [...]: q = rint(x / s), s = max|x| / 127."""
    s = np.abs(x).max(-1) / np.float32(127)
    nonzero = s[..., None] > 0
    q = np.where(nonzero, np.rint(x / np.where(nonzero, s[..., None], np.float32(1))), 0)
    return np.clip(q, -127, 127).astype(np.int8), s


def dequantize_rows(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * s[..., None]


class Transformer:
    """One model with one KV cache and one set of decode buffers: not for concurrent calls."""

    def __init__(self, config: ModelConfig, weights: dict[str, Weight], max_context: int | None = None, tok=None,
                 kv_type: str = "f32"):
        """weights: HF names (models/config.py); linear layers float32 or PackedLinear, the embedding
        float32 or float16, norms and biases float32. lm_head.weight, when present, is the head
        even for a tied model (a packed copy of the embedding). kv_type: one of memory.KV_TYPES;
        f32 here, the exact reference the tests compare against, while load(), the API and the
        command line default to memory.DEFAULT_KV_TYPE."""
        check_kv_type(kv_type)
        _check_weights(config, weights)
        self.config = config
        self.tok = tok  # models.source.TokenizerInfo of the source, when known
        self.weights = weights
        self.max_context = _context(config, max_context)
        self.embed = weights[EMBED]
        self.norm = np.asarray(weights[NORM], np.float32)
        head = weights.get(HEAD, self.embed)
        self.exact = exact_tables(config, weights)
        self.head = linear(head if isinstance(head, lk.QUANTIZED) else np.asarray(head, np.float32), self.exact)
        self.blocks = [_block(config, weights, i, self.exact) for i in range(config.n_layers)]
        self.mlp_rotation = mlp_rotation(weights)
        self.cos, self.sin = rope_tables(config, self.max_context)
        local = rope_tables(config, self.max_context, local=True) if config.rope_local_theta is not None else None
        # each layer's RoPE tables: gemma3's sliding-window layers have their own
        self.rope = [local if local is not None and config.local(i) else (self.cos, self.sin)
                     for i in range(config.n_layers)]
        self.act = gelu_tanh if config.gemma else silu
        self.kv = KVCache(kv_type, config.n_layers, self.max_context, config.n_kv_heads, config.head_dim)
        self.filled = 0  # positions 0..filled-1 of the cache hold keys and values
        self._decoder = _Decoder(self)

    @classmethod
    def from_source(cls, src, quant: dict | None, max_context: int | None = None,
                    kv_type: str = "f32") -> "Transformer":
        """quant None: the dense float32 reference; else every linear layer quantized (engine.quant settings)."""
        if quant is None:
            return cls(src.config, src.tensors, max_context, src.tok, kv_type)
        from .quant import calibration, quantize_model, settings

        weights, _ = quantize_model(src.config, src.tensors, quant, calibration(settings(quant), src))
        return cls(src.config, weights, max_context, src.tok, kv_type)

    @classmethod
    def from_qfile(cls, qf, max_context: int | None = None, kv_type: str = "f32") -> "Transformer":
        """qf: a path, or what models.qfile.load returned."""
        from models import qfile

        if not isinstance(qf, qfile.QFile):
            qf = qfile.load(qf)
        return cls(qf.config, qf.weights, max_context, qf.tok, kv_type)

    def reset(self) -> None:
        self.filled = 0

    def forward(self, tokens: Sequence[int] | np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens at positions pos..pos+n-1, writing their keys and values to the cache
        (pos may rewind to any position already cached); logits [n, vocab] if all_logits, else
        [vocab] of the last token. A single token's logits are a buffer the next call overwrites."""
        n = len(tokens)
        self._check_span(pos, n)
        if n == 1:
            logits = self._decoder(self._token(tokens[0]), pos)
        else:
            logits = self._batch(self._ids(tokens), pos, all_logits)
        self.filled = pos + n
        return logits if all_logits else logits[-1]

    def _check_span(self, pos: int, n: int) -> None:
        if n == 0:
            raise ValueError("no tokens to evaluate")
        if not 0 <= pos <= self.filled:
            raise ValueError(f"position {pos} is not in 0..{self.filled} (the cache holds {self.filled} positions)")
        if pos + n > self.max_context:
            raise ValueError(f"positions {pos}..{pos + n - 1} exceed the context of {self.max_context}")

    def _token(self, t) -> int:
        """One id, checked without making an array: the decode step allocates none."""
        t = operator.index(t)
        if not 0 <= t < self.config.vocab:
            raise ValueError(f"token id {t} out of range 0..{self.config.vocab - 1}")
        return t

    def _ids(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens, np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.config.vocab)]
        if bad.size:
            raise ValueError(f"token id {bad[0]} out of range 0..{self.config.vocab - 1}")
        return ids

    def _batch(self, ids: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        c = self.config
        n, end = len(ids), pos + len(ids)
        x = self.embed[ids].astype(np.float32)
        if c.gemma:
            x *= np.float32(math.sqrt(c.hidden))
        for i, b in enumerate(self.blocks):
            cos, sin = (t[pos:end, None] for t in self.rope[i])
            h = rmsnorm(x, b.attn_norm, c.norm_eps)
            q, k, v = linears((b.q, b.k, b.v), h)
            q = _add(q, b.q_bias).reshape(n, c.n_heads, c.head_dim)
            k = _add(k, b.k_bias).reshape(n, c.n_kv_heads, c.head_dim)
            if b.q_norm is not None:
                q, k = rmsnorm(q, b.q_norm, c.norm_eps), rmsnorm(k, b.k_norm, c.norm_eps)
            self.kv.write(i, pos, rope(k, cos, sin), _add(v, b.v_bias).reshape(n, c.n_kv_heads, c.head_dim))
            x += _normed(b.o(ops.attention_prompt(np.ascontiguousarray(rope(q, cos, sin)), *self.kv.read(i, end), pos,
                                                  c.query_scale, b.window)), b.attn_out_norm, c.norm_eps)
            h = rmsnorm(x, b.mlp_norm, c.norm_eps)
            gate, up = linears((b.gate, b.up), h)
            act = self.act(gate) * up
            if self.mlp_rotation is not None:
                rotation.apply(act, *self.mlp_rotation)
            x += _normed(b.down(act), b.mlp_out_norm, c.norm_eps)
        logits = self.head(rmsnorm(x if all_logits else x[-1:], self.norm, c.norm_eps))
        return logits if c.final_softcap is None else softcap(logits, c.final_softcap)


class _Decoder:
    """One token through the model in preallocated buffers, by calls bound once; fuse: q/k/v
    and gate/up as one C call each where their layouts allow (bind_linears)."""

    def __init__(self, m: Transformer, fuse: bool = True):
        c, f32 = m.config, np.float32
        self.embed = m.embed
        self.embed_scale = f32(math.sqrt(c.hidden)) if c.gemma else None
        self.softcap = c.final_softcap
        self.x = np.zeros((1, c.hidden), f32)  # the residual stream
        h, delta = np.zeros((1, c.hidden), f32), np.zeros((1, c.hidden), f32)  # normed input; block output
        q, att = np.zeros((1, c.n_heads * c.head_dim), f32), np.zeros((1, c.n_heads * c.head_dim), f32)
        k, v = np.zeros((1, c.n_kv_heads * c.head_dim), f32), np.zeros((1, c.n_kv_heads * c.head_dim), f32)
        gate, up = np.zeros((1, c.ffn), f32), np.zeros((1, c.ffn), f32)
        scores = np.zeros(c.n_heads * m.max_context, f32)
        self.logits = np.zeros((1, c.vocab), f32)
        self.blocks = []
        for i, b in enumerate(m.blocks):
            biases = (b.q_bias, b.k_bias, b.v_bias) if c.qkv_bias else None
            qk_norm = () if b.q_norm is None else (ops.bind_head_rmsnorm(q, c.n_heads, b.q_norm, c.norm_eps),
                                                   ops.bind_head_rmsnorm(k, c.n_kv_heads, b.k_norm, c.norm_eps))
            pre = (ops.bind_add_rmsnorm(self.x, delta if i else None, b.attn_norm, c.norm_eps, h),
                   *bind_linears((b.q, b.k, b.v), h, (q, k, v), fuse), *qk_norm)
            attn = m.kv.bind(i, q, k, v, biases, *m.rope[i], c.n_heads, scores, att, c.query_scale, b.window)
            rotate = () if m.mlp_rotation is None else (ops.bind_rotate(gate, *m.mlp_rotation),)
            # gemma3 normalises each block output in place before the next norm adds it to x
            attn_out, mlp_out = ((() if w is None else (ops.bind_add_rmsnorm(delta, None, w, c.norm_eps, delta),))
                                 for w in (b.attn_out_norm, b.mlp_out_norm))
            gating = ops.bind_gelu_tanh_mul(gate, up) if c.gemma else ops.bind_silu_mul(gate, up)
            post = (b.o.bind(att, delta), *attn_out, ops.bind_add_rmsnorm(self.x, delta, b.mlp_norm, c.norm_eps, h),
                    *bind_linears((b.gate, b.up), h, (gate, up), fuse), gating, *rotate, b.down.bind(gate, delta),
                    *mlp_out)
            self.blocks.append((pre, attn, post))
        self.final = (ops.bind_add_rmsnorm(self.x, delta if m.blocks else None, m.norm, c.norm_eps, h),
                      m.head.bind(h, self.logits))

    def __call__(self, token: int, pos: int) -> np.ndarray:
        np.copyto(self.x[0], self.embed[token])  # float16 rows convert here
        if self.embed_scale is not None:
            self.x *= self.embed_scale
        for pre, attn, post in self.blocks:
            for f in pre:
                f()
            attn(pos)
            for f in post:
                f()
        for f in self.final:
            f()
        if self.softcap is not None:
            softcap(self.logits, self.softcap)
        return self.logits


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """HF rotate-half: x [n, heads, d], cos/sin [n, 1, d/2]."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int, query_scale: float | None = None,
           window: int | None = None) -> np.ndarray:
    """Causal grouped-query attention of queries at positions pos.. over keys 0..T-1.
    q [n, H, d], k/v [T, Hkv, d] -> [n, H*d]; scores scaled by 1/sqrt(query_scale) (None: d);
    window: each query sees its last window positions only (None: all). Queries go in blocks,
    which bounds the score array of a long prompt and skips keys no query of the block can see."""
    n, H, d = q.shape
    out = np.empty((n, H * d), np.float32)
    for a in range(0, n, ATTN_BLOCK):
        e = min(n, a + ATTN_BLOCK)
        lo = 0 if window is None else max(0, pos + a - window + 1)
        out[a:e] = _attend_block(q[a:e], k[lo:pos + e], v[lo:pos + e], pos + a - lo, query_scale, window)
    return out


def _attend_block(q: np.ndarray, k: np.ndarray, v: np.ndarray, first: int, query_scale: float | None,
                  window: int | None) -> np.ndarray:
    """Contiguous operands, so each matmul is one BLAS call per kv head (strided ones fall off BLAS)."""
    n, H, d = q.shape
    T, Hkv, _ = k.shape
    rep = H // Hkv
    qg = np.ascontiguousarray(q.reshape(n, Hkv, rep, d).transpose(1, 2, 0, 3)).reshape(Hkv, rep * n, d)
    s = qg @ np.ascontiguousarray(k.transpose(1, 2, 0))  # [Hkv, rep*n, T]
    s *= np.float32(1 / math.sqrt(d if query_scale is None else query_scale))
    s = s.reshape(Hkv, rep, n, T)
    keys, queries = np.arange(T)[None, :], np.arange(first, first + n)[:, None]
    hidden = keys > queries if window is None else (keys > queries) | (keys <= queries - window)
    future = np.where(hidden, -np.inf, 0).astype(np.float32)
    s -= (s + future).max(-1, keepdims=True)
    # exp of less than -87 is subnormal, which numpy's exp computes ~10x slower; e^-80 is 0 to softmax
    np.maximum(s, -80, out=s)
    s += future
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    out = s.reshape(Hkv, rep * n, T) @ np.ascontiguousarray(v.transpose(1, 0, 2))  # [Hkv, rep*n, d]
    return out.reshape(Hkv, rep, n, d).transpose(2, 0, 1, 3).reshape(n, H * d)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) as x * (0.5 + 0.5 tanh(x / 2)): no exp overflow, one temporary."""
    t = np.multiply(x, np.float32(0.5), dtype=x.dtype)
    np.tanh(t, out=t)
    t *= 0.5
    t += 0.5
    t *= x
    return t


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    t = x * x
    t *= np.float32(0.044715)
    t += 1
    t *= x
    t *= np.float32(math.sqrt(2 / math.pi))
    np.tanh(t, out=t)
    t += 1
    t *= 0.5
    t *= x
    return t


def softcap(logits: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(logits / cap), in place."""
    logits *= np.float32(1 / cap)
    np.tanh(logits, out=logits)
    logits *= np.float32(cap)
    return logits


def _normed(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    return x if w is None else rmsnorm(x, w, eps)


def _add(x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    if bias is not None:
        x += bias
    return x


def _block(c: ModelConfig, w: dict[str, Weight], i: int, exact: bool) -> Block:
    p = f"model.layers.{i}."

    def bias(name):
        return np.asarray(w[p + name], np.float32) if c.qkv_bias else None

    def lin(name):
        return linear(w[p + name], exact)

    def norm(name):
        return np.asarray(w[p + name], np.float32) if c.gemma else None

    pre_mlp = GEMMA_LAYER_NORMS[0] if c.gemma else "post_attention_layernorm.weight"
    return Block(
        attn_norm=np.asarray(w[p + "input_layernorm.weight"], np.float32),
        q=lin("self_attn.q_proj.weight"), k=lin("self_attn.k_proj.weight"), v=lin("self_attn.v_proj.weight"),
        q_bias=bias("self_attn.q_proj.bias"), k_bias=bias("self_attn.k_proj.bias"),
        v_bias=bias("self_attn.v_proj.bias"),
        o=lin("self_attn.o_proj.weight"),
        mlp_norm=np.asarray(w[p + pre_mlp], np.float32),
        gate=lin("mlp.gate_proj.weight"), up=lin("mlp.up_proj.weight"), down=lin("mlp.down_proj.weight"),
        window=c.window(i), q_norm=norm(QK_NORMS[0]), k_norm=norm(QK_NORMS[1]),
        attn_out_norm=norm("post_attention_layernorm.weight"), mlp_out_norm=norm(GEMMA_LAYER_NORMS[1]),
    )


def _shape(w: Weight) -> tuple[int, ...]:
    return (w.M, w.K) if isinstance(w, lk.QUANTIZED) else tuple(w.shape)


def mlp_rotation(weights: dict[str, Weight]) -> tuple[np.ndarray, np.ndarray] | None:
    """(signs, mix) float32 of a rotated model's MLP rotation (engine/quant/rotate.py: every
    MLP's hidden activations turn by it before down_proj, which holds W·Rᵀ), or None."""
    if MLP_SIGNS not in weights:
        return None
    return tuple(np.ascontiguousarray(weights[n], np.float32) for n in (MLP_SIGNS, MLP_MIX))


def _check_weights(config: ModelConfig, weights: dict[str, Weight]) -> None:
    expected = config.expected_shapes()
    if HEAD in weights:
        expected[HEAD] = (config.vocab, config.hidden)
    for name, shape in expected.items():
        if name not in weights:
            raise ModelError(f"missing tensor {name}")
        if _shape(weights[name]) != shape:
            raise ModelError(f"tensor {name} has shape {_shape(weights[name])}, config says {shape}")
    check_mlp_rotation(config, weights)


def _context(config: ModelConfig, max_context: int | None) -> int:
    n = min(config.max_context, DEFAULT_MAX_CONTEXT) if max_context is None else max_context
    if n < 1:
        raise ValueError(f"max_context must be positive, got {n}")
    return n
