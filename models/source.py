"""What every loader returns: a model's config, float32 weights and tokenizer, whatever file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig, ModelError

# a first use for every tokenizer a loader builds: specials, digits, spaces, non-ASCII text
_PROBE = "<|endoftext|> Hello, world 123\n\t ünïcödé <|im_end|>"


@dataclass
class TokenizerInfo:
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821 (imported lazily by the loaders)
    bos_id: int | None
    eos_ids: tuple[int, ...]  # generation stops on any of these
    add_bos: bool  # prepend bos_id when encoding a prompt
    chat_template: str | None


@dataclass
class ModelSource:
    path: Path
    format: str  # "gguf" | "hf"
    config: ModelConfig
    tensors: dict[str, np.ndarray]  # HF names (models/config.py), float32
    tok: TokenizerInfo
    sha256: str | None = None  # of the source file, when known (catalog models)
    meta: dict = field(default_factory=dict)  # format-specific extras (GGUF file type, ...)


def check_tokenizer(tokenizer, path) -> None:
    """Refuse a tokenizer that loads but cannot encode and decode: the tokenizers library raises
    its own exceptions, or panics (PanicException, not an Exception), on some malformed files."""
    try:
        tokenizer.decode(tokenizer.encode(_PROBE).ids)
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt and its kind
        reason = str(e).splitlines()[0][:200] if str(e) else repr(e)
        raise ModelError(f"{path}: the tokenizer loads but cannot encode text ({reason})") from None
