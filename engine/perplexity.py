"""Perplexity exactly as ../shared/PROTOCOL.md defines it, so our figures and llama.cpp's compare.

Tokens from the start of the text (no BOS, special tokens not parsed), the
first ctx*windows of them, non-overlapping windows each from an empty cache,
every token after the first of a window scored, log-softmax in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ROWS = 64  # log-softmax in float64 over this many positions at once: 512 x 152k vocab would be 600 MB


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    n_scored: int
    nll: float  # mean negative log-likelihood, nats

    def line(self) -> str:
        return f"perplexity {self.ppl:.3f} over {self.n_scored} scored tokens"


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    out = np.empty(len(targets), np.float64)
    for a in range(0, len(targets), ROWS):
        z = logits[a:a + ROWS].astype(np.float64)
        m = z.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
        out[a:a + ROWS] = lse - z[np.arange(len(z)), targets[a:a + ROWS]]
    return out


def perplexity(model, ids, ctx: int = 512, windows: int = 16) -> Perplexity:
    need = ctx * windows
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens; {windows} windows of {ctx} need {need}")
    if ctx > model.max_context:
        raise ValueError(f"window of {ctx} tokens exceeds the model's context of {model.max_context}")
    ids = np.asarray(ids[:need], np.int64).reshape(windows, ctx)
    total = 0.0
    for window in ids:
        model.reset()
        logits = model.forward(window, 0, all_logits=True)
        total += float(token_nll(logits[:-1], window[1:]).sum())
    n = windows * (ctx - 1)
    return Perplexity(math.exp(total / n), n, total / n)
