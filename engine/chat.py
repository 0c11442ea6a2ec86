"""Chat: render the model's own template (sandboxed jinja2), fit the history to the context, run a turn."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .generate import ContextError, Session, Stats
from .sampling import SamplingParams

# Used only when a model ships no template; ChatML is what both catalog models use.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class TemplateError(ValueError):
    """The chat template failed to render."""


def _raise(message):
    raise TemplateError(f"chat template: {message}")


class ChatTemplate:
    def __init__(self, source: str | None, bos: str = "", eos: str = ""):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source or CHATML)
        self.bos, self.eos = bos, eos

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos, eos_token=self.eos)
        except TemplateError:
            raise
        except Exception as e:  # a template is code from the model file: any failure is its failure
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def template_for(tok) -> ChatTemplate:
    info = tok.info
    bos = tok.decode([info.bos_id]) if info.bos_id is not None else ""
    eos = tok.decode([info.eos_ids[0]]) if info.eos_ids else ""
    return ChatTemplate(info.chat_template, bos, eos)


@dataclass
class Conversation:
    """History plus a session whose cache follows it, so each turn evaluates only the new tokens."""
    session: Session
    template: ChatTemplate
    messages: list[dict] = field(default_factory=list)
    reserve: int = 256  # tokens kept free for the reply when trimming history
    dropped: int = 0  # messages the last turn had to drop to fit the context

    def prompt_ids(self) -> tuple[list[int], int]:
        """Token ids of the history with the generation prompt; drops the oldest turns (never the system
        message nor the newest user message) until it fits. Returns the ids and how many messages went."""
        limit = self.session.model.max_context - min(self.reserve, self.session.model.max_context // 2)
        dropped = 0
        while True:
            ids = self.encode(self.messages)
            if len(ids) <= limit:
                return ids, dropped
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ContextError(f"the message is {len(ids)} tokens; the context holds "
                                   f"{self.session.model.max_context} with {self.reserve} kept for the reply")
            del self.messages[first]
            dropped += 1

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages)
        tok = self.session.tok
        # Templates that write the BOS text themselves must not get a second one.
        add_bos = tok.info.add_bos and not (self.template.bos and text.startswith(self.template.bos))
        return tok.encode(text, add_bos=add_bos, special=True)

    def reply(self, user: str, params: SamplingParams, max_tokens: int, stats: Stats) -> Iterator[str]:
        """Streams the assistant's answer; what was streamed joins the history even if interrupted."""
        self.messages.append({"role": "user", "content": user})
        try:
            ids, self.dropped = self.prompt_ids()
        except ContextError:
            self.messages.pop()
            raise
        parts: list[str] = []
        try:
            for piece in self.session.stream(ids, params, max_tokens, stats=stats):
                parts.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(parts)})
