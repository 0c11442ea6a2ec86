"""Calibration: a text's tokens through the model block by block, each linear layer's
input Hessian taken on the outputs of the layers already quantized.

    ids = tokens(read_text(path), tok, n=64, length=512)   # evenly spaced windows of the text
    for i, x in layers(config, tensors, ids, fit, workers): ...   # fit(names, X): H = hessian(X, workers)

Inside a block the layers go in the order they read their inputs (q/k/v, o,
gate/up, down), and each stage runs with the weights fit returned for the
stages before it, so a layer's Hessian sees the error of everything upstream.
The forward pass is made of engine.model's pieces (rmsnorm, rope, attend, silu;
the tests hold its result equal to Transformer's logits), run over all
sequences at once, block by block, instead of one prompt through the whole model. With
dense_inputs some of the sequences also run through the dense weights, so that gptq can aim
at the dense model's output (gptq.aim). Calibration
texts must never be evaluation texts (../shared/PROTOCOL.md).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from lutkernels import rotation
from models.config import ModelConfig

from ..model import EMBED, attend, mlp_rotation, rmsnorm, rope, rope_tables, silu

ROWS = 1024  # rows per block of a parallel product: its temporaries stay in the last-level cache

# names of the layers reading one input, and that input X [n*L, K] -> the float32 weights to run them with
Fit = Callable[[list[str], np.ndarray], list[np.ndarray]]


class Workers:
    """A thread pool for numpy work: BLAS and most ufuncs release the GIL, and the
    engine keeps OpenBLAS single-threaded (engine/__init__.py), so cores come from here."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(n)
        self.side = ThreadPoolExecutor(1)

    def aside(self, fn, *args) -> Future:
        """fn(*args) on a thread beside the pool's: serial work (a LAPACK factorization) that would
        otherwise leave the other core idle, overlapped with parallel work that does not need it."""
        return self.side.submit(fn, *args)

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
        self.side.shutdown()


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
    parts = workers.blocks(lambda x: x.T @ x, X)
    H = np.empty((X.shape[1], X.shape[1]), np.float64)

    def total(h, *ps):
        np.copyto(h, ps[0])
        for p in ps[1:]:
            h += p
        h /= len(X)
    workers.rows(total, H, *parts)
    return H


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
    return workers.map(lambda W: C @ W.T, Ws)


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
           dense_inputs: int = 0,
           after: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Quantize block after block through fit; yields each block's index when it is done,
    with the residual stream after it (float32 [n*L, hidden], sequence after sequence; the
    same array throughout, updated in place). start: (first block, the stream before it),
    instead of block 0 on the embedded tokens. dense_inputs: the first this many sequences
    also run through the dense weights, in a second stream, and fit(names, X, Xd) also gets
    the input the layers would have in the dense model for those (Xd pairs with X's first rows).
    after(i, x_in, x), once block i is quantized, gets a copy of the stream before the block and
    the stream after it, which it may change (tune.py)."""
    n, L = tokens.shape
    first, x = (0, np.asarray(tensors[EMBED])[tokens.ravel()].astype(np.float32)) if start is None \
        else (start[0], np.array(start[1], np.float32))
    run = _Block(config, tensors, n, L, workers)
    if dense_inputs:
        dense_run = _Block(config, tensors, dense_inputs, L, workers)
    xd = x[:dense_inputs * L].copy() if dense_inputs else None
    for i in range(first, config.n_layers):
        x_in = x.copy() if after is not None else None
        if xd is None:
            run(i, x, fit)
        else:
            seen: dict[str, np.ndarray] = {}

            def keep(names: list[str], X: np.ndarray) -> list[np.ndarray]:
                seen[names[0]] = X
                return [tensors[name] for name in names]
            dense_run(i, xd, keep)
            run(i, x, lambda names, X: fit(names, X, seen.pop(names[0])))
        if after is not None:
            after(i, x_in, x)
        yield i, x


class _Block:
    """One transformer block over all sequences at once, its linear layers' weights from fit."""

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], n: int, L: int, workers: Workers):
        self.c, self.t, self.n, self.L, self.workers = config, tensors, n, L, workers
        self.cos, self.sin = (a[:, None] for a in rope_tables(config, L))
        self.rotation = mlp_rotation(tensors)

    def norm(self, x, w):
        """rmsnorm by row blocks on the workers: on one thread it took 13 s of the first five
        minutes of Qwen2.5-Coder's 2-bit quantize while the other core idled."""
        out = np.empty_like(x)

        def block(xb, ob):
            ob[...] = rmsnorm(xb, w, self.c.norm_eps)
        self.workers.rows(block, x, out)
        return out

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
        h = self.norm(x, t[p + "input_layernorm.weight"])
        names = [f"{p}self_attn.{m}_proj.weight" for m in "qkv"]
        heads = (c.n_heads, c.n_kv_heads, c.n_kv_heads)
        qkv = [self.linear(h, W, t[name[:-len("weight")] + "bias"] if c.qkv_bias else None)
               for name, W in zip(names, fit(names, h))]
        att = self.attention(*(y.reshape(len(y), nh, c.head_dim) for y, nh in zip(qkv, heads)))
        [o] = fit([p + "self_attn.o_proj.weight"], att)
        self.linear(att, o, add_to=x)
        h = self.norm(x, t[p + "post_attention_layernorm.weight"])
        act = self.mlp(h, *fit([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], h))
        [down] = fit([p + "mlp.down_proj.weight"], act)
        self.linear(act, down, add_to=x)
