"""Text to token ids and back, for prompts, perplexity texts and streamed output."""
from __future__ import annotations

import codecs
from os import PathLike
from pathlib import Path

from models.source import TokenizerInfo


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as in a token."""
    shown = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = [b for b in range(256) if b not in shown]
    return {**{chr(b): b for b in shown}, **{chr(256 + n): b for n, b in enumerate(hidden)}}


_BYTE_OF = _byte_alphabet()
# str.translate does the per-character work in C. Code points below 256 that are
# not in the alphabet go to a character latin-1 cannot encode, so that every
# token holding a character outside the alphabet takes the slow path.
_UNBYTE = {**{cp: "\uffff" for cp in range(256)}, **{ord(c): chr(b) for c, b in _BYTE_OF.items()}}


def _normal_token_bytes(text: str) -> bytes:
    try:
        return text.translate(_UNBYTE).encode("latin-1")
    except UnicodeEncodeError:  # a character outside the alphabet stands for itself
        return b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode() for c in text)


def _sentencepiece_bytes(text: str) -> bytes:
    """A SentencePiece token's bytes: byte tokens <0xXX> that byte, others their text with ▁ as space."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    return text.replace("\u2581", " ").encode()


class Tokenizer:
    def __init__(self, info: TokenizerInfo):
        from tokenizers import decoders, models

        self.info = info
        self._tok = info.tokenizer
        # byte-level BPE, or SentencePiece with byte fallback (models/gguf_tokenizer.py)
        if isinstance(self._tok.decoder, decoders.ByteLevel):
            piece_bytes = _normal_token_bytes
        elif isinstance(self._tok.model, models.BPE) and self._tok.model.byte_fallback:
            piece_bytes = _sentencepiece_bytes
        else:
            raise ValueError("only byte-level BPE and SentencePiece (byte fallback) tokenizers are supported "
                             f"(decoder is {type(self._tok.decoder).__name__})")
        self._piece_bytes, self._model = piece_bytes, self._tok.model
        # A token's bytes are made when it is first decoded: the whole table (get_vocab of 150k
        # tokens, then each one's bytes) took longer than the rest of a cached model's start.
        self._bytes: dict[int, bytes] = {}
        self._added: dict | None = None  # id -> tokenizers.AddedToken
        self._vocab_size: int | None = None

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer knows (the model's embedding may have more rows)."""
        if self._vocab_size is None:
            ids = [*self._tok.get_vocab(with_added_tokens=False).values(), *self._added_tokens()]
            self._vocab_size = max(ids, default=-1) + 1
        return self._vocab_size

    def _added_tokens(self) -> dict:
        if self._added is None:
            self._added = self._tok.get_added_tokens_decoder()
        return self._added

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """`special`: read control-token text such as "<|im_start|>" as those tokens
        (chat templates); otherwise it is ordinary text (perplexity, user input).
        User-defined added tokens are always matched, as llama.cpp does."""
        self._tok.encode_special_tokens = not special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise ValueError(_not_unicode(text)) from None
        if (self.info.add_bos if add_bos is None else add_bos) and self.info.bos_id is not None:
            ids.insert(0, self.info.bos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; a special token's are its text. Ids the
        tokenizer does not know (padding rows of the embedding) stand for nothing."""
        b = self._bytes.get(token_id)
        if b is None:
            if not 0 <= token_id < 1 << 32:  # outside the library's u32 ids
                return b""
            # an added token's text is itself, even where the model's vocabulary has the same id
            added = self._added_tokens().get(token_id)
            if added is not None:
                b = added.content.encode()
            else:
                text = self._model.id_to_token(token_id)
                b = b"" if text is None else self._piece_bytes(text)
            self._bytes[token_id] = b
        return b

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _not_unicode(text) -> str:
    """Why `tokenizers` refused a str: a lone surrogate (from an API caller; files are read strictly)."""
    if not isinstance(text, str):
        return f"text must be a str, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text is not valid Unicode: lone surrogate at index {e.start}"
    return "text could not be tokenized"


class StreamDecoder:
    """Text of a growing token stream. A character whose bytes span several tokens
    comes out whole once its last byte has arrived; bytes that cannot start or
    continue valid UTF-8 come out as U+FFFD, as in Tokenizer.decode."""

    def __init__(self, tokenizer: Tokenizer):
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def read_text_file(path: str | PathLike) -> str:
    # Bytes, not text mode: newline translation would change what gets tokenized.
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
