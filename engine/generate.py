"""Token generation over a Transformer: prompt in one batched pass, then token by token.

A Session remembers which tokens its KV cache holds, so a follow-up prompt
that starts with them (the next chat turn) only evaluates what is new.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder


class ContextError(ValueError):
    """A prompt that does not fit the model's context."""


@dataclass
class Stats:
    prompt_tokens: int = 0  # evaluated, after reuse of the cached prefix
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    stop_reason: str = ""  # eos | stop | length | context

    @staticmethod
    def _rate(n: int, s: float) -> float:
        return n / s if s > 0 else 0.0

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self._rate(self.prompt_tokens, self.prompt_s):.1f} tok/s | "
                f"generation: {self.gen_tokens} tokens, {self._rate(self.gen_tokens, self.gen_s):.1f} tok/s")


class StopScanner:
    """Holds back text that may be the start of a stop string, so a stop string is never printed."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Session:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tok = tokenizer
        self.cached: list[int] = []  # tokens whose keys and values are in the cache, from position 0

    def reset(self) -> None:
        self.cached = []

    def feed(self, ids: Sequence[int]):
        """Evaluate a prompt, reusing the cached prefix; returns the last token's logits."""
        ids = list(ids)
        if not ids:
            raise ContextError("the prompt is empty")
        if len(ids) >= self.model.max_context:
            raise ContextError(f"prompt of {len(ids)} tokens does not fit the context of "
                               f"{self.model.max_context} tokens (one position is needed for the reply)")
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last prompt token must be evaluated for its logits
        self.cached = ids[:common]
        logits = self.model.forward(ids[common:], common)
        self.cached = ids
        return logits, len(ids) - common

    def stream(self, ids: Sequence[int], params: SamplingParams = SamplingParams(), max_tokens: int = 256,
               stop: Sequence[str] = (), stats: Stats | None = None, ignore_eos: bool = False) -> Iterator[str]:
        """Yields the reply as text pieces, never a broken UTF-8 character nor a stop string.
        ignore_eos: go on past end-of-sequence tokens (benchmarks, exact token counts)."""
        stats = stats if stats is not None else Stats()
        t0 = time.perf_counter()
        logits, stats.prompt_tokens = self.feed(ids)
        t1 = time.perf_counter()
        stats.prompt_s = t1 - t0
        sampler = Sampler(params, logits.shape[-1])
        for t in ids[-params.repeat_last_n:] if params.repeat_last_n else ():
            sampler.accept(t)
        decoder = StreamDecoder(self.tok)
        scanner = StopScanner(stop)
        eos = set() if ignore_eos else set(self.tok.info.eos_ids)
        stats.stop_reason = "length"
        try:
            for _ in range(max_tokens):
                token = sampler(logits)
                if token in eos:
                    stats.stop_reason = "eos"
                    break
                stats.gen_tokens += 1
                sampler.accept(token)
                text, stopped = scanner.push(decoder.push(token))
                if text:
                    yield text
                if stopped:
                    stats.stop_reason = "stop"
                    return
                if len(self.cached) + 1 >= self.model.max_context:
                    stats.stop_reason = "context"
                    break
                if stats.gen_tokens < max_tokens:
                    logits = self.model.forward([token], len(self.cached))
                    self.cached.append(token)
            text, stopped = scanner.push(decoder.flush())
            text += "" if stopped else scanner.flush()
            if text:
                yield text
        finally:
            stats.gen_s = time.perf_counter() - t1
