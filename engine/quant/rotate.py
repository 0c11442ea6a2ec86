"""Rotate a model's hidden space before quantizing (QuaRot's idea, fused: nothing changes at run time).

For an orthogonal Q, a llama-family model computes exactly the same function
with its residual stream r replaced by Qᵀr, once

    every RMSNorm gain g is folded into the layers that read the norm
    (W <- W·diag(g), the gain becomes 1): RMSNorm(Qᵀr) = Qᵀ·RMSNorm(r) only
    without a gain;
    layers reading the stream take W <- W·Q (q, k, v, gate, up) and layers
    writing it W <- Qᵀ·W (o, down);
    the embedding rows e <- e·Q, and the head W_head·diag(g_final)·Q.

and, inside attention, the values of every KV head turn by one orthogonal
Hd of the head dimension (v <- Hdᵀ·v, o's columns of each head <- ·Hd):
attention mixes value vectors linearly, so o sees the same sums.

The MLP's hidden activations (silu(gate)·up, down_proj's input) pass a
nonlinearity, so their rotation cannot be fused: the runtime turns them by
R before down_proj (a Walsh-Hadamard transform with random signs and a small
orthogonal mix, lutkernels/rotation.py: ~log2(n) adds per value) and
down_proj takes W·Rᵀ. It is stored with the model (model.mlp_rotation.*).

A rotated matrix mixes each row's weights across all columns, so no column
keeps an outlier for a group's scale to stretch over, and GPTQ's error
compensation has a smoother problem: on SmolLM2-135M (wiki.txt, gptq on the
rtn grid, 3 bits, G = 64, act-order) rotation took perplexity from 40.1 to
26.8, and gptq-rtn4g64 from 18.579 to 16.569. Plain round-to-nearest got worse
(rtn3g64 117.5 to 557): the source's weights lie on a 4-bit grid (Q4_1) that
rotation dissolves, and without the Hessian nothing recovers it; for the same
reason a budget of 4 bits or more keeps it (--bpw 4.5: 14.712 unrotated, 15.887
rotated). The defaults follow (engine/quant/__init__.py, settings). Turning
down_proj's inputs as well took gptq-rtn3g64s8-ao from wiki 19.983 / c4 70.562
to 19.060 / 68.784 and --bpw 3.3 from 19.410 / 69.140 to 18.339 / 64.597
(bench/quality; a prototype with a dense random R had given 19.985 / 70.484 ->
19.508 / 67.273).

The head stops being the embedding (e·Q against W_head·diag(g)·Q), which costs
nothing: a tied head is stored as its own packed copy anyway.
"""
from __future__ import annotations

import numpy as np

from lutkernels import rotation
from models.config import MLP_MIX, MLP_SIGNS, ModelConfig

from ..model import EMBED, HEAD, NORM
from . import calib

READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal n x n matrix, uniform over the group (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def rotate(config: ModelConfig, tensors: dict[str, np.ndarray], seed: int = 0,
           workers: calib.Workers | None = None) -> dict[str, np.ndarray]:
    """A new tensor dict computing the same function in a rotated hidden space (see the module
    docstring), with the head under lm_head.weight even for a tied model. Float32 throughout;
    workers split the products' rows (Qwen2.5-Coder's embedding alone is 151936 x 896)."""
    rng = np.random.default_rng(seed)
    Q = orthogonal(config.hidden, rng).astype(np.float32)
    Hd = orthogonal(config.head_dim, rng).astype(np.float32)
    a, _ = rotation.split(config.ffn)
    signs = rng.choice(np.array([-1, 1], np.float32), config.ffn)
    mix = orthogonal(a, rng).astype(np.float32)
    out = dict(tensors)
    out[MLP_SIGNS], out[MLP_MIX] = signs, mix

    def f32(name):
        return np.asarray(tensors[name], np.float32)

    def times(A, B):
        return A @ B if workers is None else np.concatenate(workers.blocks(lambda rows: rows @ B, A))

    embed = f32(EMBED)
    out[HEAD] = times((f32(HEAD) if HEAD in tensors else embed) * f32(NORM), Q)
    out[EMBED] = times(embed, Q)
    out[NORM] = np.ones(config.hidden, np.float32)
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        w = {}
        for norm, readers in READERS.items():
            g = f32(p + norm + ".weight")
            out[p + norm + ".weight"] = np.ones(config.hidden, np.float32)
            w.update({r: times(f32(p + r + ".weight") * g, Q) for r in readers})
        w.update({wr: times(Q.T, f32(p + wr + ".weight")) for wr in WRITERS})
        rotation.apply(w["mlp.down_proj"], signs, mix)  # the runtime's own transform
        v = w["self_attn.v_proj"].reshape(config.n_kv_heads, config.head_dim, config.hidden)
        w["self_attn.v_proj"] = np.einsum("ji,hjk->hik", Hd, v).reshape(-1, config.hidden)
        o = w["self_attn.o_proj"].reshape(config.hidden, config.n_heads, config.head_dim)
        w["self_attn.o_proj"] = (o @ Hd).reshape(config.hidden, -1)
        if config.qkv_bias:
            vb = f32(p + "self_attn.v_proj.bias").reshape(config.n_kv_heads, config.head_dim)
            out[p + "self_attn.v_proj.bias"] = (vb @ Hd).reshape(-1)
        out.update({p + n + ".weight": np.ascontiguousarray(m, np.float32) for n, m in w.items()})
    return out
