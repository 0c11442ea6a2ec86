"""What every loader returns: a model's config, float32 weights and tokenizer, whatever file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig


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
