"""Calibration sequences sampled from the model itself, for gptq when no calibration text is given.

GPTQ needs activations that look like the model's inputs in use; text the model
writes itself at temperature 1 is drawn from its own distribution (the idea of
LLM-QAT's data-free calibration) and needs no file. How well it stands in for
real text depends on the model (bench/RESULTS.md, "Calibration without a
text"): SmolLM2 `--bpw 3.3` on 64 x 512 sampled tokens gave wiki 18.537 / c4
64.402, against 18.407 / 63.210 on c4-calib.txt and 75.899 with no
calibration; Qwen2.5-Coder, whose samples are mostly code and repetitions, 2-bit
gptq 87.339 / 273.968 against 49.461 / 136.630.

All n sequences decode together, so each step is one matrix product per layer
over n rows (the dense float32 weights; the sequences split over the workers)
instead of n matrix-vector products. Each starts at the token that opens a document in
training (BOS, else <|endoftext|>), is sampled to `length` tokens and never stops
at an end token: after one the model starts another document.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..model import EMBED, HEAD, NORM, rmsnorm, rope, rope_tables, silu
from .calib import Workers

DOCUMENT_START = "<|endoftext|>"


def start_token(tok) -> int:
    """The token a training document begins with. tok: models.source.TokenizerInfo."""
    if tok.add_bos and tok.bos_id is not None:
        return tok.bos_id
    end = tok.tokenizer.token_to_id(DOCUMENT_START)
    if end is not None:
        return end
    if tok.bos_id is not None:
        return tok.bos_id
    return tok.eos_ids[0]


def sequences(config, tensors: dict[str, np.ndarray], start: int, n: int, length: int, workers: Workers,
              seed: int = 0, on_step: Callable[[], None] | None = None) -> np.ndarray:
    """int64 [n, length]: the tokens after `start` of n sequences sampled at temperature 1."""
    run = Decoder(config, tensors, n, length, workers)
    rng = np.random.default_rng(seed)
    ids = np.empty((n, length + 1), np.int64)
    ids[:, 0] = start
    for pos in range(length):
        ids[:, pos + 1] = draw(run(ids[:, pos], pos), rng)
        if on_step is not None:
            on_step()
    return ids[:, 1:]


def draw(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row of logits [n, vocab], from its softmax (inverse CDF, one uniform per row)."""
    p = np.exp(logits - logits.max(1, keepdims=True), dtype=np.float64)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(1), p.shape[1] - 1)


class Decoder:
    """n sequences one position at a time through a source's dense weights (never rotated), a KV
    cache each; call (tokens [n], pos) -> logits [n, vocab] float32, positions from 0 in order.
    engine.model's Transformer holds one sequence per cache, and calib's blocks take whole
    sequences without a cache, so the step is written here from engine.model's pieces; the
    tests hold its logits equal to the Transformer's."""

    def __init__(self, config, tensors: dict[str, np.ndarray], n: int, length: int, workers: Workers):
        c = self.c = config
        self.t, self.workers = tensors, workers
        self.embed = tensors[EMBED]
        self.head = np.asarray(tensors.get(HEAD, tensors[EMBED]), np.float32)
        self.cos, self.sin = rope_tables(config, length)
        shape = (c.n_layers, n, c.n_kv_heads, length, c.head_dim)
        self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return self.product(x, self.t[name])

    def product(self, x: np.ndarray, W: np.ndarray) -> np.ndarray:
        """x @ Wᵀ, x's rows split over the workers."""
        return np.concatenate(self.workers.blocks(lambda xb: xb @ W.T, x))

    def __call__(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        c, t = self.c, self.t
        n = len(tokens)
        cos, sin = self.cos[pos:pos + 1, None], self.sin[pos:pos + 1, None]
        x = np.asarray(self.embed[tokens], np.float32)
        for i in range(c.n_layers):
            p = f"model.layers.{i}."

            def proj(m, heads):
                y = self.linear(h, f"{p}self_attn.{m}_proj.weight")
                if c.qkv_bias:
                    y += t[f"{p}self_attn.{m}_proj.bias"]
                return y.reshape(n, heads, c.head_dim)
            h = rmsnorm(x, t[p + "input_layernorm.weight"], c.norm_eps)
            q = rope(proj("q", c.n_heads), cos, sin)
            self.k[i, :, :, pos] = rope(proj("k", c.n_kv_heads), cos, sin)
            self.v[i, :, :, pos] = proj("v", c.n_kv_heads)
            x += self.linear(self.attend(q, self.k[i, :, :, :pos + 1], self.v[i, :, :, :pos + 1]),
                             p + "self_attn.o_proj.weight")
            h = rmsnorm(x, t[p + "post_attention_layernorm.weight"], c.norm_eps)
            act = silu(self.linear(h, p + "mlp.gate_proj.weight")) * self.linear(h, p + "mlp.up_proj.weight")
            x += self.linear(act, p + "mlp.down_proj.weight")
        return self.product(rmsnorm(x, t[NORM], c.norm_eps), self.head)

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """One query per sequence over all its cached keys: q [n, H, d], k/v [n, Hkv, T, d] -> [n, H*d]."""
        c = self.c
        n = len(q)
        qg = q.reshape(n, c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim)
        s = qg @ k.transpose(0, 1, 3, 2) * np.float32(1 / math.sqrt(c.head_dim))  # [n, Hkv, rep, T]
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        return (s @ v).reshape(n, c.n_heads * c.head_dim)
