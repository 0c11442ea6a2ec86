"""Choosing the next token from logits: greedy, or llama.cpp's sampler chain.

The order is llama.cpp's: repetition penalty, top-k, top-p, min-p, then
temperature, then a draw. Filtering before temperature means top-p and min-p
keep the same candidates at any temperature, which is what users of llama.cpp
and Ollama expect from the same flags.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min-p must be in [0, 1), got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat-last-n must be >= 0, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    """Stateful: remembers recent tokens for the penalty and owns the random stream (seeded: same text)."""

    def __init__(self, params: SamplingParams, vocab: int):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=max(params.repeat_last_n, 1))
        # The penalty works on a copy: the logits belong to the model, which may hand them to others too.
        self._work = np.empty(vocab, np.float32)

    def accept(self, token: int) -> None:
        """Tokens of the prompt and of the reply both count as 'recent' (llama.cpp does the same)."""
        self.recent.append(token)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n and self.recent:
            np.copyto(self._work, logits)
            logits = self._work
            ids = np.fromiter(set(self.recent), np.int64)
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        if p.top_k and p.top_k < logits.size:
            cand = np.argpartition(logits, -p.top_k)[-p.top_k:]
        else:
            cand = np.arange(logits.size)
        cand = cand[np.argsort(logits[cand])[::-1]]
        z = logits[cand].astype(np.float64)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        keep = cand.size
        if p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0:
            keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
        z = z[:keep] / p.temperature
        w = np.exp(z - z[0])
        return int(cand[self.rng.choice(keep, p=w / w.sum())])
