"""From a name the user typed to a runnable Model.

A catalog name runs from its quantized file in the cache, made on first use
(pull, convert, quantize to the default format, save); later starts only
memory-map it, which is what lets `chat` start in about a second. A GGUF file
or HF folder is quantized in memory on each load; a lutengine quantized file
runs as it is. `dense=True` runs the float32 reference from the source weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

from models import catalog
from models.config import ModelError

from .api import Model
from .tokenizer import Tokenizer


def is_qfile(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def default_tag() -> str:
    from .quant import settings

    return tag(settings())


def tag(settings: dict) -> str:
    """Short name of quantizer settings, e.g. rtn4g32 (rtn4g32s8 with 8-bit scales): names the cached file,
    so a new default makes a new file."""
    s8 = "s8" if settings.get("scale_bits") == 8 else ""
    return f"{settings.get('method')}{settings.get('bits')}g{settings.get('group')}{s8}"


def cached_qfile(name: str) -> Path:
    """The file's format version is in its name: a lutengine that changes the format
    ignores the stale cache (left for the user to delete) and makes a new file."""
    from models.qfile import FORMAT_VERSION

    return catalog.cache_dir() / "models" / f"{name}.{default_tag()}.v{FORMAT_VERSION}.lut.safetensors"


def default_qfile(name: str, progress: bool = False) -> Path:
    """The catalog model in the default format, quantized and cached on first use."""
    from models import qfile
    from models.load import open_source

    q = cached_qfile(name)
    if not q.exists():
        src = open_source(name, progress=progress)
        _say(progress, f"{name}: quantizing to the default format ({default_tag()}), once")
        qfile.save(q, src)
        _say(progress, f"{name}: saved {q}")
    return q


def resolve(name_or_path: str | None) -> tuple[str, Path | None]:
    """(name, path of a lutengine file to run, or None when the source must be loaded)."""
    name = name_or_path or catalog.DEFAULT
    path = Path(name).expanduser()
    if is_qfile(path):
        return name, path
    return name, None


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def load(name_or_path: str | None = None, dense: bool = False, threads: int | None = None,
         max_context: int | None = None, progress: bool = False) -> Model:
    """Load a catalog model, GGUF file, HF folder or lutengine quantized file, ready to generate."""
    from models import qfile
    from models.load import open_source

    from .model import Transformer

    if threads is not None:
        import lutkernels

        lutkernels.set_threads(threads)
    name, path = resolve(name_or_path)
    if path is not None and dense:
        raise ModelError(f"{path}: a quantized file has no float weights; --dense needs the source model")
    if path is None and not dense and name in catalog.CATALOG and not Path(name).exists():
        path = default_qfile(name, progress)
    if path is not None:
        q = qfile.load(path)
        model = Transformer.from_qfile(q, max_context=max_context)
        return Model(model, Tokenizer(q.tok), {"name": name, "path": str(path), "format": "lutengine",
                                               "quantization": tag(q.meta.get("quantizer", {}))})
    src = open_source(name, progress=progress)
    model = Transformer.from_source(src, None if dense else {}, max_context=max_context)
    return Model(model, Tokenizer(src.tok), {"name": name, "path": str(src.path), "format": src.format,
                                             "quantization": "float32 (dense)" if dense else default_tag()})


def load_tokenizer(name_or_path: str | None = None) -> Tokenizer:
    """Only the tokenizer: no weights are read (or dequantized)."""
    from models import qfile
    from models.load import open_tokenizer

    name, path = resolve(name_or_path)
    if path is None and name in catalog.CATALOG and not Path(name).exists():
        path = cached_qfile(name) if cached_qfile(name).exists() else None
    if path is not None:
        return Tokenizer(qfile.load(path).tok)
    return Tokenizer(open_tokenizer(name))
