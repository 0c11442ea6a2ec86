"""The Python API for apps: `engine.load(name)` and a Model with generate, stream and chat.

Thread safety: a Model owns one KV cache, so its calls are serialised by a
lock (two threads may share a Model; they take turns). For parallel
generation, load one Model per thread; the LUT kernels themselves are safe to
call from several threads (the C core serialises matmuls on its thread pool).
"""
from __future__ import annotations

import threading
from typing import Iterator, Sequence

from .chat import Conversation, template_for
from .generate import Session, Stats
from .sampling import SamplingParams


class Model:
    def __init__(self, transformer, tokenizer, info: dict):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.info = info  # name, path, format, quantization: what `lutengine info` prints
        self.last_stats = Stats()
        self._session = Session(transformer, tokenizer)
        self._lock = threading.Lock()

    @property
    def max_context(self) -> int:
        return self.transformer.max_context

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def stream(self, prompt: str, max_tokens: int = 256, stop: Sequence[str] = (), ignore_eos: bool = False,
               **sampling) -> Iterator[str]:
        """Text pieces of the continuation of `prompt` (raw text, no chat template).
        sampling: the fields of engine.sampling.SamplingParams (temperature, top_k, top_p, min_p,
        repeat_penalty, repeat_last_n, seed)."""
        ids = self.tokenizer.encode(prompt)
        params = SamplingParams(**sampling)
        return self._locked(lambda stats: self._session.stream(ids, params, max_tokens, stop, stats, ignore_eos))

    def generate(self, prompt: str, max_tokens: int = 256, stop: Sequence[str] = (), ignore_eos: bool = False,
                 **sampling) -> str:
        return "".join(self.stream(prompt, max_tokens, stop, ignore_eos, **sampling))

    def chat(self, messages: list[dict], max_tokens: int = 512, stream: bool = False, **sampling):
        """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], the last one the user's.
        Returns the assistant's reply (or an iterator of its pieces with stream=True)."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the last message must be the user's")
        conv = self.conversation(messages[:-1])
        params = SamplingParams(**sampling)
        pieces = self._locked(lambda stats: conv.reply(messages[-1]["content"], params, max_tokens, stats))
        return pieces if stream else "".join(pieces)

    def conversation(self, messages: Sequence[dict] = ()) -> Conversation:
        """A conversation on this model's cache (one at a time per Model): what `lutengine chat` drives."""
        return Conversation(self._session, template_for(self.tokenizer), [dict(m) for m in messages])

    def reset(self) -> None:
        self._session.reset()

    def _locked(self, start) -> Iterator[str]:
        with self._lock:
            self.last_stats = Stats()
            yield from start(self.last_stats)
