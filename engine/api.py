"""The Python API for apps: `engine.load(name)` and a Model with generate, stream and chat.

Thread safety: a Model owns one KV cache, so its calls are serialised by a
lock (two threads may share a Model; they take turns; a thread's call while
its own stream is open is refused, as it would wait for itself). For parallel
generation, load one Model per thread; the LUT kernels themselves are safe to
call from several threads (the C core serialises matmuls on its thread pool).
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Iterator, Sequence

from .chat import Conversation, template_for
from .generate import ContextError, Session, Stats
from .sampling import SamplingParams

# Stats.stop_reason -> OpenAI's finish_reason ("context" ran out of positions: as llama.cpp, "length")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class Model:
    def __init__(self, transformer, tokenizer, info: dict):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.info = info  # name, path, format, quantization: what `lutengine info` prints
        self.last_stats = Stats()
        self._session = Session(transformer, tokenizer)
        self._lock = threading.Lock()
        self._owner = None  # the thread holding the lock (while one of its streams is open)

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
        return Conversation(self._session, template_for(self.tokenizer, self.info.get("path")),
                            [dict(m) for m in messages])

    def reset(self) -> None:
        self._session.reset()

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of messages in the model's chat template with the generation prompt (no trimming:
        an OpenAI request that does not fit is refused, not shortened)."""
        if not hasattr(self, "_template"):
            self._template = template_for(self.tokenizer, self.info.get("path"))
        return Conversation(self._session, self._template).encode(check_messages(messages))

    def create_completion(self, prompt: str, max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, seed: int | None = None, stop: str | Sequence[str] | None = None,
                          stream: bool = False, response_format: dict | None = None, ignore_eos: bool = False,
                          **sampling):
        """What POST /v1/completions returns (a dict, or an iterator of chunk dicts with stream=True),
        as llama-cpp-python's Llama.create_completion. sampling: the other SamplingParams fields."""
        return self._create("text_completion", self.tokenize(prompt), max_tokens, stop, stream, response_format,
                            ignore_eos, dict(temperature=temperature, top_p=top_p, seed=seed, **sampling))

    def create_chat_completion(self, messages: Sequence[dict], max_tokens: int | None = None,
                               temperature: float = 0.8, top_p: float = 0.95, seed: int | None = None,
                               stop: str | Sequence[str] | None = None, stream: bool = False,
                               response_format: dict | None = None, ignore_eos: bool = False, **sampling):
        """What POST /v1/chat/completions returns; max_tokens None: until the context is full."""
        return self._create("chat.completion", self.chat_ids(messages), max_tokens, stop, stream, response_format,
                            ignore_eos, dict(temperature=temperature, top_p=top_p, seed=seed, **sampling))

    def _create(self, kind, ids, max_tokens, stop, stream, response_format, ignore_eos, sampling):
        grammar = check_response_format(response_format)
        max_tokens = fit_max_tokens(len(ids), max_tokens, self.max_context)
        params, stops, stats = SamplingParams(**sampling), stop_list(stop), Stats()
        pieces = self._locked(lambda st: self._session_for(grammar).stream(ids, params, max_tokens, stops, st,
                                                                             ignore_eos), stats)
        reply = Reply(kind, self.info.get("name", "lutengine"), len(ids), stats)
        return reply.chunks(pieces) if stream else reply.result(pieces)

    def _session_for(self, grammar) -> Session:
        """The model's session, or for a JSON grammar one on the constrained model (the cache then
        holds other tokens than the session remembers: it starts again)."""
        if grammar is None:
            return self._session
        from .jsonmode import JsonConstraint

        self._session.reset()
        return Session(JsonConstraint(self.transformer, json_vocabulary(self), grammar), self.tokenizer)

    def _locked(self, start, stats: Stats | None = None) -> Iterator[str]:
        if self._owner == threading.get_ident():
            # the lock is not re-entrant: waiting here would be waiting for ourselves, forever
            raise RuntimeError("this Model is in use by this thread's own stream: finish or close it first")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                self.last_stats = Stats() if stats is None else stats
                yield from start(self.last_stats)
            finally:
                self._owner = None


class Reply:
    """One OpenAI-style answer (chat.completion or text_completion) from the pieces of a reply and
    the Stats its generation fills in; shared by Model.create_* and `lutengine serve`."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, stats: Stats, include_usage: bool = False):
        self.kind, self.model, self.prompt_tokens, self.stats = kind, model, prompt_tokens, stats
        self.include_usage = include_usage  # streams: a last chunk with usage and no choices (stream_options)
        self.chat = kind == "chat.completion"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self) -> dict:
        n = self.stats.gen_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def finish_reason(self) -> str | None:
        return FINISH.get(self.stats.stop_reason)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def result(self, pieces) -> dict:
        text = "".join(pieces)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish_reason()}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason()}
        return {**self._head(self.kind), "choices": [choice], "usage": self.usage()}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def chunks(self, pieces) -> Iterator[dict]:
        yield from self.opening()
        for piece in pieces:
            yield self.chunk(piece)
        yield from self.closing()

    def opening(self) -> list[dict]:
        """The chunks before the first piece of a stream (a chat stream names the role first)."""
        return [self.chunk(None, first=True)] if self.chat else []

    def closing(self) -> list[dict]:
        """The chunks after the last piece, once the Stats are final."""
        last = [self.chunk(None, self.finish_reason())]
        if self.include_usage:
            last.append({**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                         "usage": self.usage()})
        return last


def fit_max_tokens(prompt_tokens: int, max_tokens: int | None, context: int) -> int:
    """max_tokens checked against the context (None: what the context leaves); ContextError if it cannot fit."""
    room = context - prompt_tokens
    if room < 1:
        raise ContextError(f"the prompt is {prompt_tokens} tokens; the context holds {context}")
    if max_tokens is None:
        return room
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens > room:
        raise ContextError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds "
                           f"the context of {context} tokens")
    return max_tokens


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise ValueError("stop must be a string or a list of strings")
    return stops


def check_messages(messages) -> list[dict]:
    """OpenAI chat messages to the template's {"role", "content": str} (text parts joined)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def check_response_format(fmt):
    """The grammar the reply must follow (engine/jsonmode.py), or None for free text."""
    if fmt is None or fmt == {"type": "text"}:
        return None
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        from .jsonmode import grammar_for

        return grammar_for(fmt)
    raise ValueError(f"response_format {fmt!r} is not supported (type text, json_object or json_schema)")


def json_vocabulary(model) -> "Vocabulary":
    """The model's vocabulary for JSON mode, built on first use and kept (its mask cache goes with it)."""
    from .jsonmode import Vocabulary

    if getattr(model, "_json_vocabulary", None) is None:
        model._json_vocabulary = Vocabulary(model.tokenizer, model.transformer.config.vocab)
    return model._json_vocabulary
