"""Calibration: a text's tokens through the model block by block, each linear layer's
input Hessian taken on the outputs of the layers already quantized.

    ids = tokens(read_text(path), tok, n=64, length=512)   # evenly spaced windows of the text
    for i, x in layers(config, tensors, ids, fit, workers): ...   # fit(names, X, attention): H = hessian(X, workers)

Inside a block the layers go in the order they read their inputs (q/k, v, o,
gate/up, down), and each stage runs with the weights fit returned for the
stages before it, so a layer's Hessian sees the error of everything upstream.
v_proj comes after q and k because its output reaches the model only through
the attention probabilities they make (Attention).
The forward pass is made of engine.model's pieces (rmsnorm, rope, attend, silu;
the tests hold its result equal to Transformer's logits), run over all
sequences at once, block by block, instead of one prompt through the whole model. With
dense_inputs some of the sequences also run through the dense weights, so that gptq can aim
at the dense model's output (gptq.aim). Calibration
texts must never be evaluation texts (../shared/PROTOCOL.md).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from lutkernels import rotation
from models.config import ModelConfig

from ..model import EMBED, attend, mlp_rotation, rmsnorm, rope, rope_tables, silu

ROWS = 1024  # rows per block of a parallel product: its temporaries stay in the last-level cache

# names of the layers reading one input, that input X [n*L, K], and for v_proj the block's
# Attention (else None) -> the float32 weights to run them with
Fit = Callable[[list[str], np.ndarray, "Attention | None"], list[np.ndarray]]


class Workers:
    """A thread pool for numpy work: BLAS and most ufuncs release the GIL, and the
    engine keeps OpenBLAS single-threaded (engine/__init__.py), so cores come from here."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(n)

    def map(self, fn, items) -> list:
        return list(self.pool.map(fn, items))

    def blocks(self, fn, X: np.ndarray) -> list:
        """fn over row blocks of X, one per thread."""
        return self.map(fn, np.array_split(X, min(self.n, len(X))))

    def rows(self, fn, *arrays: np.ndarray, block: int = ROWS) -> None:
        """fn(*blocks) over aligned row blocks of the arrays, for work that writes its results into them."""
        self.map(lambda a: fn(*(x[a:a + block] for x in arrays)), range(0, len(arrays[0]), block))

    def close(self) -> None:
        self.pool.shutdown()


def read_text(path) -> str:
    from ..tokenizer import read_text_file

    try:
        return read_text_file(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the calibration text ({e.strerror or e})") from None


def tokens(text: str, tok, n: int, length: int, path="the calibration text") -> np.ndarray:
    """int64 [n, length]: n evenly spaced, non-overlapping windows of the text's tokens
    (no BOS, special tokens read as text, as perplexity reads its texts). tok: TokenizerInfo."""
    from ..tokenizer import Tokenizer

    ids = Tokenizer(tok).encode(text, add_bos=False)
    if len(ids) < n * length:
        raise ValueError(f"{path}: {len(ids)} tokens; {n} calibration sequences of {length} need {n * length}")
    starts = np.linspace(0, len(ids) - length, n).astype(np.int64)
    return np.asarray(ids, np.int64)[starts[:, None] + np.arange(length)]


def hessian(X: np.ndarray, workers: Workers) -> np.ndarray:
    """XᵀX / N, float64 [K, K], from float32 products (numpy's XᵀX is one symmetric rank-k update)."""
    H = np.zeros((X.shape[1], X.shape[1]), np.float64)
    for part in workers.blocks(lambda x: x.T @ x, X):
        H += part
    return H / len(X)


def dense_products(Xd: np.ndarray, X: np.ndarray, Ws: list[np.ndarray], workers: Workers) -> list[np.ndarray]:
    """Xᵀ (Xd - X) Wᵀ / N, float32 [K, M], for each W [M, K] reading these inputs: how far the
    dense model's inputs Xd would move W's output, as gptq.aim needs it. Evaluated in the cheaper
    order: through C = Xᵀ(Xd - X)/N (N·K² once, then K²·M per W) where the layers have more rows
    than K/2 (q, k, v, gate, up), else through the outputs (Xd - X) Wᵀ (2·N·K·M: down_proj, whose
    K is the MLP width)."""
    N, K = X.shape
    M = sum(len(W) for W in Ws)
    if 2 * N * K * M < N * K * K + K * K * M:
        Wt = np.concatenate(Ws).T
        D = _summed(workers, lambda r: X[r].T @ ((Xd[r] - X[r]) @ Wt), N) / N
        return np.split(D.astype(np.float32), np.cumsum([len(W) for W in Ws])[:-1], axis=1)
    C = (_summed(workers, lambda r: X[r].T @ (Xd[r] - X[r]), N) / N).astype(np.float32)
    return [C @ W.T for W in Ws]


def _summed(workers: Workers, product, N: int) -> np.ndarray:
    """The float32 product(rows) over row blocks of ROWS * 8, summed in float64."""
    total = None
    for part in workers.map(product, [slice(a, a + ROWS * 8) for a in range(0, N, ROWS * 8)]):
        total = part.astype(np.float64) if total is None else total + part
    return total


def output_error(W: np.ndarray, Wq: np.ndarray, H: np.ndarray, workers: Workers) -> float:
    """||X Wqᵀ - X Wᵀ|| / ||X Wᵀ|| over the calibration inputs X, from H = XᵀX/N (float32)."""
    D = Wq - W
    num, den = (sum(workers.blocks(lambda A: float(np.einsum("ij,ij->", A @ H, A)), M)) for M in (D, W))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def layers(config: ModelConfig, tensors: dict[str, np.ndarray], tokens: np.ndarray, fit: Fit,
           workers: Workers, start: tuple[int, np.ndarray] | None = None,
           dense_inputs: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Quantize block after block through fit; yields each block's index when it is done,
    with the residual stream after it (float32 [n*L, hidden], sequence after sequence; the
    same array throughout, updated in place). start: (first block, the stream before it),
    instead of block 0 on the embedded tokens. dense_inputs: the first this many sequences
    also run through the dense weights, in a second stream, and fit(names, X, attention, Xd) also gets
    the input the layers would have in the dense model for those (Xd pairs with X's first rows)."""
    n, L = tokens.shape
    first, x = (0, np.asarray(tensors[EMBED])[tokens.ravel()].astype(np.float32)) if start is None \
        else (start[0], np.array(start[1], np.float32))
    run = _Block(config, tensors, n, L, workers)
    if dense_inputs:
        dense_run = _Block(config, tensors, dense_inputs, L, workers)
    xd = x[:dense_inputs * L].copy() if dense_inputs else None
    for i in range(first, config.n_layers):
        if xd is None:
            run(i, x, fit)
        else:
            seen: dict[str, np.ndarray] = {}

            def keep(names: list[str], X: np.ndarray, attention) -> list[np.ndarray]:
                seen[names[0]] = X
                return [tensors[name] for name in names]
            dense_run(i, xd, keep)
            run(i, x, lambda names, X, attention: fit(names, X, attention, seen.pop(names[0])))
        yield i, x


# sequences v_proj's Hessian is taken over: L³ work per sequence and head, where XᵀX costs L·K²/2;
# 64 of them would add ~2.5 minutes to quantizing Qwen2.5-Coder (README: under 10 minutes)
ATTENTION_SEQUENCES = 16


class Attention:
    """A block's attention probabilities on the calibration sequences, as the weights of
    v_proj's error: o_proj reads head h's output A_h X ΔWᵀ, not the X ΔWᵀ that XᵀX weighs,
    so a value on which many queries concentrate (the first token, an attention sink) counts
    for all of them. SmolLM2 gptq-rtn3g64s8-ao, wiki / c4: 18.614 / 65.737 against 19.270 /
    69.201 on XᵀX. q [n*L, H, d] and k [n*L, Hkv, d] before rope, from the weights fit
    returned for them."""

    def __init__(self, block: "_Block", q: np.ndarray, k: np.ndarray):
        self.b, self.q, self.k = block, q, k

    def hessians(self, X: np.ndarray, Xd: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """For each kv head g, with M = Σ_h A_hᵀ A_h over its query heads in each sequence:
        H_g = Σ Xᵀ M X / (rep·N), float64 [Hkv, K, K], v's Hessian in place of XᵀX/N; and with
        the dense inputs Xd of the first len(Xd) rows, C_g = Σ Xᵀ M (Xd - X) / (rep·len(Xd)),
        what calib.dense_products' Xᵀ(Xd - X)/N is to XᵀX/N (gptq.aim). Over the first
        ATTENTION_SEQUENCES sequences only. Through M rather than each A_h X: rep·L³ + L²K + LK²
        multiply-adds per kv head and sequence instead of rep·(L²K + LK²)."""
        c, L = self.b.c, self.b.L
        rep = c.n_heads // c.n_kv_heads
        nd = 0 if Xd is None else len(Xd) // L
        future = np.triu(np.full((L, L), -np.inf, np.float32), 1)

        def one(sq: int) -> tuple[np.ndarray, np.ndarray | None]:
            r = slice(sq * L, (sq + 1) * L)
            qs, ks = (rope(a[r], self.b.cos, self.b.sin) for a in (self.q, self.k))
            H = np.zeros((c.n_kv_heads, X.shape[1], X.shape[1]))
            C = np.zeros_like(H) if sq < nd else None
            for g in range(c.n_kv_heads):
                qg = np.ascontiguousarray(qs[:, g * rep:(g + 1) * rep].transpose(1, 0, 2)).reshape(rep * L, -1)
                A = (qg @ np.ascontiguousarray(ks[:, g].T)).reshape(rep, L, L)  # as engine.model attends
                A *= np.float32(1 / np.sqrt(c.head_dim))
                A -= (A + future).max(-1, keepdims=True)
                np.maximum(A, -80, out=A)
                A += future
                np.exp(A, out=A)
                A /= A.sum(-1, keepdims=True)
                A = A.reshape(rep * L, L)
                M = A.T @ A
                H[g] = X[r].T @ (M @ X[r])
                if C is not None:
                    C[g] = X[r].T @ (M @ (Xd[r] - X[r]))
            return H, C

        n = min(self.b.n, ATTENTION_SEQUENCES)
        nd = min(nd, n)
        parts = self.b.workers.map(one, range(n))
        H = sum(h for h, _ in parts) / (rep * n * L)
        C = None if Xd is None else sum(c_ for _, c_ in parts if c_ is not None) / (rep * nd * L)
        return H, C


class _Block:
    """One transformer block over all sequences at once, its linear layers' weights from fit."""

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], n: int, L: int, workers: Workers):
        self.c, self.t, self.n, self.L, self.workers = config, tensors, n, L, workers
        self.cos, self.sin = (a[:, None] for a in rope_tables(config, L))
        self.rotation = mlp_rotation(tensors)

    def linear(self, X, W, bias=None, add_to=None):
        """X @ Wᵀ (+ bias) as a new array, or added to add_to in place."""
        out = np.empty((len(X), len(W)), np.float32) if add_to is None else add_to
        wt = W.T

        def block(xb, ob):
            if add_to is not None:
                ob += xb @ wt
                return
            np.matmul(xb, wt, out=ob)
            if bias is not None:
                ob += bias
        self.workers.rows(block, X, out)
        return out

    def mlp(self, h, gate, up):
        act = np.empty((len(h), len(gate)), np.float32)
        gt, ut = gate.T, up.T
        rot = self.rotation

        def block(hb, ab):
            np.multiply(silu(hb @ gt), hb @ ut, out=ab)
            if rot is not None:
                rotation.apply(ab, *rot)
        self.workers.rows(block, h, act)
        return act

    def attention(self, q, k, v):
        c, L = self.c, self.L
        out = np.empty((self.n * L, c.n_heads * c.head_dim), np.float32)

        def one(r):
            np.copyto(out[r], attend(rope(q[r], self.cos, self.sin), rope(k[r], self.cos, self.sin), v[r], 0))
        self.workers.map(one, [slice(s * L, (s + 1) * L) for s in range(self.n)])
        return out

    def __call__(self, i: int, x: np.ndarray, fit: Fit) -> None:
        """Block i on the residual stream x, in place."""
        c, t = self.c, self.t
        p = f"model.layers.{i}."
        h = rmsnorm(x, t[p + "input_layernorm.weight"], c.norm_eps)
        names = [f"{p}self_attn.{m}_proj.weight" for m in "qkv"]
        heads = (c.n_heads, c.n_kv_heads, c.n_kv_heads)

        def project(name: str, W: np.ndarray, nh: int) -> np.ndarray:
            y = self.linear(h, W, t[name[:-len("weight")] + "bias"] if c.qkv_bias else None)
            return y.reshape(len(y), nh, c.head_dim)
        q, k = (project(n, W, nh) for n, W, nh in zip(names, fit(names[:2], h, None), heads))
        [v] = fit(names[2:], h, Attention(self, q, k))
        att = self.attention(q, k, project(names[2], v, c.n_kv_heads))
        [o] = fit([p + "self_attn.o_proj.weight"], att, None)
        self.linear(att, o, add_to=x)
        h = rmsnorm(x, t[p + "post_attention_layernorm.weight"], c.norm_eps)
        act = self.mlp(h, *fit([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], h, None))
        [down] = fit([p + "mlp.down_proj.weight"], act, None)
        self.linear(act, down, add_to=x)
