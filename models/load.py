"""One entry point for every model source: an HF folder, a GGUF file or a catalog name."""
from __future__ import annotations

import os
from pathlib import Path

from . import catalog
from .config import ModelError
from .gguf_loader import load_gguf, read_gguf
from .hf_loader import hf_tokenizer, load_hf, read_json
from .source import ModelSource, TokenizerInfo


def open_source(name_or_path: str | os.PathLike, progress: bool = True, tokenizer: bool = True,
                lazy: bool = False) -> ModelSource:
    """Load a model to float32 HF-named tensors; every failure is a one-line ModelError.

    A folder is read as a Hugging Face checkpoint, a file as GGUF, and anything
    else that names a catalog entry is pulled into the cache first.
    tokenizer=False skips the tokenizer (ModelSource.tok is None). lazy=True makes each
    tensor when it is read (models/source.py LazyTensors), for converting in bounded memory.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_hf(path, tokenizer=tokenizer, lazy=lazy)
    if path.is_file():
        return load_gguf(path, tokenizer=tokenizer, lazy=lazy)
    source = load_gguf(_pull(str(name_or_path), progress), tokenizer=tokenizer, lazy=lazy)
    source.sha256 = catalog.lookup(str(name_or_path)).sha256
    return source


def open_tokenizer(name_or_path: str | os.PathLike, progress: bool = True) -> TokenizerInfo:
    """Only the tokenizer of a model source: no weights are read."""
    from .gguf_tokenizer import tokenizer_from_gguf

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        return hf_tokenizer(path, read_json(config_path) if config_path.is_file() else {})
    if not path.is_file():
        path = _pull(str(name_or_path), progress)
    return tokenizer_from_gguf(read_gguf(path)[0], path)


def _pull(name: str, progress: bool) -> Path:
    if name not in catalog.CATALOG:
        raise ModelError(f"no such model file, folder or catalog name: {name} (catalog: {', '.join(catalog.CATALOG)})")
    try:
        return catalog.pull(name, progress)
    except catalog.CatalogError as e:
        raise ModelError(str(e)) from e
