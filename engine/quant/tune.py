"""Block tuning: once gptq has fixed a block's codes, fit the block's scales, offsets and RMSNorm
gains by gradient descent so that the block's output on the calibration tokens comes closer to
the dense model's (block-wise reconstruction, as OmniQuant and EfficientQAT do, with the codes
kept: the file's bits do not change).

A packed layer is W = sum_s h_s ⊙ C_s + z, with C_s the code planes one stored scale multiplies
(uniform grids: sum_p 2^p B_p under plane 0's scale h; otherwise plane s alone), h_s and z per row
and group. Tuning moves a = log(h/h0) and b = (z - z0)/h0, so every step is relative to the
group's starting scale, and a zero scale stays zero. The loss is the mean squared difference of
the block's outputs, on the quantized model's stream, from the dense model's stream after the same
block, relative to ||y - x||² of the dense block's own contribution there. Aiming at the dense
stream rather than at the dense block on the quantized stream lets a block undo part of the error
upstream. SmolLM2, `--method gptq --bits 3 --group 64 --scale-bits 8 --act-order` on
c4-calib.txt, wiki / c4: untuned 19.270 / 69.201; `--tune 2` aiming at the dense block on the
quantized stream 19.155 / 66.977, at the dense stream 18.682 / 67.315 (a prototype of this
module); weighing each token's error by 1 / its mean square (what the next RMSNorm divides by)
gave 19.070 / 66.569 and 18.866 / 68.150 (bench/RESULTS.md, "Block tuning").

Each step takes BATCH sequences, split over the workers; Adam; `epochs` passes over all of them
(the `tune` setting). Stored scales are rounded (float16, or
8-bit ones) only at the end, and the block keeps its gptq scales if the rounded tuned ones do
worse on the calibration tokens.

The forward pass here is the one calib.py runs (the tests hold them equal), with what the
backward pass needs kept; the gradients are checked against finite differences.
"""
from __future__ import annotations

import numpy as np

import lutkernels as lk
from lutkernels import layout, rotation
from models.config import ModelConfig

from ..model import mlp_rotation, rope, rope_tables
from .calib import Workers

BATCH = 8
LR = 5e-3  # per step, on log-scales and offsets in units of the starting scale
GAIN_LR = 1e-3
EPS = 1e-12
KEYS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


class Layer:
    """One packed layer's tunable scales and offsets, around its fixed codes."""

    def __init__(self, w: lk.PackedLinear):
        self.w = w
        self.planes, scales, offsets = lk.unpack(w)
        P, M, ng = scales.shape
        G = w.K // ng
        if w.uniform:
            weights = np.float32(2.0) ** np.arange(P, dtype=np.float32)
            self.C = (self.planes * weights[:, None, None]).sum(0, dtype=np.float32)[None]
            self.h0 = scales[:1]
        else:
            self.C = self.planes.astype(np.float32)
            self.h0 = scales
        self.C = self.C.reshape(len(self.C), M, ng, G)
        self.z0 = offsets
        self.a = np.zeros_like(self.h0)
        self.b = None if offsets is None else np.zeros_like(offsets)

    def scales(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The float32 scales and offsets the parameters stand for, within what the format stores."""
        h = self.h0 * np.exp(self.a)
        z = None if self.z0 is None else self.z0 + self.h0[0] * self.b
        if self.w.scale8:
            h = np.clip(h, 0, layout.F8_MAX)
            if z is not None:  # the int8 counts of an eighth of the first scale
                lim = h[0] * np.float32(0.125)
                z = np.clip(z, -128 * lim, 127 * lim)
        return h, z

    def dense(self) -> np.ndarray:
        h, z = self.scales()
        W = np.einsum("smgk,smg->mgk", self.C, h)
        if z is not None:
            W += z[:, :, None]
        return W.reshape(self.w.M, self.w.K)

    def grads(self, dW: np.ndarray) -> list[np.ndarray]:
        """d loss / d(a, b) from d loss / dW."""
        h, _ = self.scales()
        d = dW.reshape(self.C.shape[1:])
        out = [np.einsum("mgk,smgk->smg", d, self.C) * h]
        if self.b is not None:
            out.append(d.sum(-1) * self.h0[0])
        return out

    def params(self) -> list[np.ndarray]:
        return [self.a] if self.b is None else [self.a, self.b]

    def packed(self) -> lk.PackedLinear:
        """The layer with its scales rounded to what is stored."""
        h, z = self.scales()
        return lk.pack(self.planes, h, z, uniform=self.w.uniform, scale8=self.w.scale8)


class Adam:
    def __init__(self, params: list[np.ndarray], lrs: list[float]):
        self.p, self.lr = params, lrs
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1 - 0.9 ** self.t, 1 - 0.999 ** self.t
        for p, g, m, v, lr in zip(self.p, grads, self.m, self.v, self.lr):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= (lr * (m / c1) / (np.sqrt(v / c2) + EPS)).astype(p.dtype)


def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


class Block:
    """A block over whole sequences of L tokens, forward and backward. Weights W: {key: [M, K]}
    with down_proj acting on the unrotated MLP activations (its W·R, see rotate.py); g1, g2: the
    norm gains. One instance per thread: forward(cache=True) keeps what backward reads."""

    def __init__(self, c: ModelConfig, L: int, bias: dict | None, dtype=np.float32):
        self.c, self.L, self.bias, self.dtype = c, L, bias, dtype
        cos, sin = rope_tables(c, L)
        self.cos, self.sin = cos[:, None].astype(dtype), sin[:, None].astype(dtype)
        self.mask = np.where(np.arange(L)[None] > np.arange(L)[:, None], -np.inf, 0).astype(dtype)
        self.saved: dict = {}

    def forward(self, W: dict, g1, g2, x: np.ndarray, cache: bool = False) -> np.ndarray:
        c, L = self.c, self.L
        N = len(x)
        B, H, KV, d = N // L, c.n_heads, c.n_kv_heads, c.head_dim
        eps = self.dtype(c.norm_eps)
        r1 = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        n1 = x * r1
        h1 = n1 * g1
        q, k, v = (h1 @ W[m].T for m in "qkv")
        if self.bias is not None:
            q += self.bias["q"]
            k += self.bias["k"]
            v += self.bias["v"]
        q = rope(q.reshape(B, L, H, d), self.cos, self.sin)
        k = rope(k.reshape(B, L, KV, d), self.cos, self.sin)
        # heads sharing a kv head side by side: [B, KV, H/KV, L, d]
        qg = np.ascontiguousarray(q.reshape(B, L, KV, H // KV, d).transpose(0, 2, 3, 1, 4))
        kg = np.ascontiguousarray(k.transpose(0, 2, 1, 3))[:, :, None]
        vg = np.ascontiguousarray(v.reshape(B, L, KV, d).transpose(0, 2, 1, 3))[:, :, None]
        S = qg @ kg.swapaxes(-1, -2)
        S *= self.dtype(1 / np.sqrt(d))
        S += self.mask
        S -= S.max(-1, keepdims=True)
        np.exp(S, out=S)
        S /= S.sum(-1, keepdims=True)
        att = np.ascontiguousarray((S @ vg).transpose(0, 3, 1, 2, 4)).reshape(N, H * d)
        x2 = x + att @ W["o"].T
        r2 = 1 / np.sqrt((x2 * x2).mean(-1, keepdims=True) + eps)
        n2 = x2 * r2
        h2 = n2 * g2
        gt, ut = h2 @ W["gate"].T, h2 @ W["up"].T
        sg = gt * _sigmoid(gt)
        a = sg * ut
        if cache:
            self.saved = dict(r1=r1, n1=n1, h1=h1, qg=qg, kg=kg, vg=vg, P=S, att=att, r2=r2, n2=n2, h2=h2,
                              gt=gt, ut=ut, sg=sg, a=a)
        return x2 + a @ W["down"].T

    def backward(self, W: dict, g2, dy: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
        """d loss / d(W, g1, g2) from d loss / dy, for the last forward(cache=True)."""
        c, L, s = self.c, self.L, self.saved
        N = len(dy)
        B, H, KV, d = N // L, c.n_heads, c.n_kv_heads, c.head_dim
        dW = {"down": dy.T @ s["a"]}
        da = dy @ W["down"]
        sig = _sigmoid(s["gt"])
        dgt = da * s["ut"] * (sig * (1 + s["gt"] * (1 - sig)))
        dut = da * s["sg"]
        dW["gate"], dW["up"] = dgt.T @ s["h2"], dut.T @ s["h2"]
        dh2 = dgt @ W["gate"] + dut @ W["up"]
        dg2 = (dh2 * s["n2"]).sum(0)
        dn2 = dh2 * g2
        dx2 = dy + s["r2"] * (dn2 - s["n2"] * (dn2 * s["n2"]).mean(-1, keepdims=True))
        dW["o"] = dx2.T @ s["att"]
        dout = np.ascontiguousarray((dx2 @ W["o"]).reshape(B, L, KV, H // KV, d).transpose(0, 2, 3, 1, 4))
        P = s["P"]
        dv = (P.swapaxes(-1, -2) @ dout).sum(2)
        dP = dout @ s["vg"].swapaxes(-1, -2)
        dS = P * (dP - (dP * P).sum(-1, keepdims=True))
        dS *= self.dtype(1 / np.sqrt(d))
        dq = (dS @ s["kg"]).transpose(0, 3, 1, 2, 4).reshape(B, L, H, d)
        dk = (dS.swapaxes(-1, -2) @ s["qg"]).sum(2).transpose(0, 2, 1, 3)
        back = -self.sin  # rope is a rotation: its gradient turns by the opposite angle
        dq = rope(dq, self.cos, back).reshape(N, H * d)
        dk = rope(dk, self.cos, back).reshape(N, KV * d)
        dv = np.ascontiguousarray(dv.transpose(0, 2, 1, 3)).reshape(N, KV * d)
        dh1 = 0
        for m, dm in zip("qkv", (dq, dk, dv)):
            dW[m] = dm.T @ s["h1"]
            dh1 = dh1 + dm @ W[m]
        return dW, (dh1 * s["n1"]).sum(0), dg2


def tune_block(config: ModelConfig, tensors: dict, packed: dict, i: int, x_in: np.ndarray, x: np.ndarray,
               xd: np.ndarray, L: int, epochs: int, workers: Workers) -> tuple[float, float]:
    """Tune block i's packed layers (replaced in packed) and norm gains (replaced in tensors), the
    dense weights in tensors, on its input x_in [n*L, hidden]; x holds the block's output and
    gets the tuned one. xd: the dense model's stream before the block, advanced past it in place.
    Returns the relative output error (see the module docstring) before and after."""
    p = f"model.layers.{i}."
    names = {k: f"{p}{v}.weight" for k, v in KEYS.items()}
    bias = {m: np.asarray(tensors[f"{p}self_attn.{m}_proj.bias"], np.float32) for m in "qkv"} \
        if config.qkv_bias else None
    rot = mlp_rotation(tensors)
    Rt = None if rot is None else rotation.apply(np.eye(config.ffn, dtype=np.float32), *rot)  # rows turn by R

    def unrotated(W: dict) -> dict:
        return W if Rt is None else {**W, "down": W["down"] @ Rt.T}

    gains = [np.array(tensors[p + n], np.float32) for n in NORMS]
    n = len(x_in) // L
    step = max(1, min(BATCH, n) // workers.n)
    blocks = [Block(config, L, bias) for _ in range(workers.n)]

    def run(W: dict, g: list, src: np.ndarray, out: np.ndarray) -> None:
        def part(a):
            rows = slice(a * L, min(a + step, n) * L)
            out[rows] = blocks[0].forward(W, *g, src[rows])
        workers.map(part, range(0, n, step))

    target = np.empty_like(xd)
    run(unrotated({k: np.asarray(tensors[nm], np.float32) for k, nm in names.items()}), gains, xd, target)
    base = float(np.mean((target - xd) ** 2)) or 1.0
    xd[:] = target
    before = float(np.mean((x - target) ** 2)) / base
    layers = {k: Layer(packed[nm]) for k, nm in names.items()}
    tuned_gains = [g.copy() for g in gains]
    params = [q for layer in layers.values() for q in layer.params()]
    opt = Adam(params + tuned_gains, [LR] * len(params) + [GAIN_LR] * 2)
    rng = np.random.default_rng(i)
    for _ in range(epochs):
        order = rng.permutation(n)
        for a in range(0, n, step * workers.n):
            W = unrotated({k: layer.dense() for k, layer in layers.items()})
            chosen = order[a:a + step * workers.n]
            seqs = [q for q in np.array_split(chosen, workers.n) if len(q)]
            scale = np.float32(2 / (base * len(chosen) * L * x.shape[1]))  # d mean / d diff, over the step

            def part(j):
                rows = (seqs[j][:, None] * L + np.arange(L)).ravel()
                diff = blocks[j].forward(W, *tuned_gains, x_in[rows], cache=True) - target[rows]
                return blocks[j].backward(W, tuned_gains[1], diff * scale)
            results = workers.map(part, range(len(seqs)))
            dW = {k: sum(r[0][k] for r in results) for k in names}
            if Rt is not None:
                dW["down"] = dW["down"] @ Rt
            grads = [g for k, layer in layers.items() for g in layer.grads(dW[k])]
            opt.step(grads + [sum(r[1] for r in results), sum(r[2] for r in results)])
    tuned = {k: layer.packed() for k, layer in layers.items()}
    y = np.empty_like(x)
    run(unrotated({k: lk.dense(w) for k, w in tuned.items()}), tuned_gains, x_in, y)
    after = float(np.mean((y - target) ** 2)) / base
    if after >= before:
        return before, before
    for k, nm in names.items():
        packed[nm] = tuned[k]
    for nm, g in zip(NORMS, tuned_gains):
        tensors[p + nm] = g
    x[:] = y
    return before, after
