"""What every loader returns: a model's config, float32 weights and tokenizer, whatever file it came from."""
from __future__ import annotations

import mmap
from collections.abc import Callable, MutableMapping
from contextlib import contextmanager
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


def drop_pages(view: np.ndarray) -> None:
    """Let the kernel drop the pages of a read-only file mapping that `view` looks into (a source
    tensor once converted): resident file pages count in the process's RSS, and a conversion
    that reads a whole source would otherwise end holding all of it. They read back from the
    file if touched again. Anything else (memory of its own, a writable map) is left alone."""
    base = view
    while isinstance(base, (np.ndarray, memoryview)):  # np.frombuffer keeps a memoryview of the map
        base = base.base if isinstance(base, np.ndarray) else base.obj
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or view.nbytes == 0:
        return
    whole = np.frombuffer(base, np.uint8)
    if whole.flags.writeable:  # a private writable map would lose its changes
        return
    origin = whole.ctypes.data
    start = view.ctypes.data - origin
    lo = start - start % mmap.PAGESIZE
    hi = min(len(base), -(-(start + view.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
    try:
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except OSError:
        pass  # advice only


class LazyTensors(MutableMapping):
    """name -> float32 array, each made when it is read and not kept (the source's file is
    memory-mapped): a consumer that reads a tensor, uses it and lets it go holds one at a time.
    Assigned values are kept, as a dict keeps them."""

    def __init__(self, make: Callable[[str], np.ndarray], names):
        self._make, self._names, self._set = make, dict.fromkeys(names), {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._set:
            return self._set[name]
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __setitem__(self, name: str, value) -> None:
        self._names[name] = None
        self._set[name] = value

    def __delitem__(self, name: str) -> None:
        del self._names[name]
        self._set.pop(name, None)

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class ModelSource:
    path: Path
    format: str  # "gguf" | "hf"
    config: ModelConfig
    tensors: dict[str, np.ndarray] | LazyTensors  # HF names (models/config.py), float32
    tok: TokenizerInfo
    sha256: str | None = None  # of the source file, when known (catalog models)
    meta: dict = field(default_factory=dict)  # format-specific extras (GGUF file type, ...)


@contextmanager
def tokenizers_errors(message: str):
    """What the tokenizers library raises on a malformed file, its own exceptions or a Rust panic
    (PanicException, which is not an Exception), as ModelError(message (first line of the reason))."""
    try:
        yield
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt and its kind
        reason = str(e).splitlines()[0][:200] if str(e) else repr(e)
        raise ModelError(f"{message} ({reason})") from None


def check_tokenizer(tokenizer, path) -> None:
    """Refuse a tokenizer that loads but cannot encode and decode."""
    with tokenizers_errors(f"{path}: the tokenizer loads but cannot encode text"):
        tokenizer.decode(tokenizer.encode(_PROBE).ids)
