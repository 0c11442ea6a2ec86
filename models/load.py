"""One entry point for every model source: an HF folder, a GGUF file or a catalog name."""
from __future__ import annotations

import os
from pathlib import Path

from . import catalog
from .config import ModelError
from .gguf_loader import load_gguf
from .hf_loader import load_hf
from .source import ModelSource


def open_source(name_or_path: str | os.PathLike, progress: bool = True, tokenizer: bool = True) -> ModelSource:
    """Load a model to float32 HF-named tensors; every failure is a one-line ModelError.

    A folder is read as a Hugging Face checkpoint, a file as GGUF, and anything
    else that names a catalog entry is pulled into the cache first.
    tokenizer=False skips the tokenizer (ModelSource.tok is None).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_hf(path, tokenizer=tokenizer)
    if path.is_file():
        return load_gguf(path, tokenizer=tokenizer)
    name = str(name_or_path)
    if name not in catalog.CATALOG:
        raise ModelError(f"no such model file, folder or catalog name: {name} (catalog: {', '.join(catalog.CATALOG)})")
    try:
        file = catalog.pull(name, progress)
    except catalog.CatalogError as e:
        raise ModelError(str(e)) from e
    source = load_gguf(file, tokenizer=tokenizer)
    source.sha256 = catalog.lookup(name).sha256
    return source
