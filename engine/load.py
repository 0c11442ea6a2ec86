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

# The default format until the quantization work picks one from its sweep:
# 4-bit round-to-nearest with per-group scales and offsets; head at 8 bits.
DEFAULT_QUANT = {"method": "rtn", "bits": 4, "group": 128, "head_bits": 8}
DEFAULT_TAG = "rtn4"


def is_qfile(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def cached_qfile(name: str) -> Path:
    return catalog.cache_dir() / "models" / f"{name}.{DEFAULT_TAG}.lut.safetensors"


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
    name = name_or_path or catalog.DEFAULT
    path = Path(name).expanduser()
    if is_qfile(path):
        if dense:
            raise ModelError(f"{path}: a quantized file has no float weights; --dense needs the source model")
        return _from_qfile(path, max_context, {"name": path.name})
    if not path.exists() and name in catalog.CATALOG and not dense:
        q = cached_qfile(name)
        if not q.exists():
            src = open_source(name, progress=progress)
            _say(progress, f"{name}: quantizing to the default format ({DEFAULT_TAG}), once")
            qfile.save(q, src, DEFAULT_QUANT)
            _say(progress, f"{name}: saved {q}")
        return _from_qfile(q, max_context, {"name": name, "source": str(catalog.model_path(name))})
    src = open_source(name, progress=progress)
    quant = None if dense else DEFAULT_QUANT
    model = Transformer.from_source(src, quant, max_context=max_context)
    info = {"name": name, "path": str(src.path), "format": src.format,
            "quantization": "float32 (dense reference)" if dense else DEFAULT_TAG}
    return Model(model, Tokenizer(src.tok), info)


def _from_qfile(path: Path, max_context, info: dict) -> Model:
    from models import qfile

    from .model import Transformer

    q = qfile.load(path)
    model = Transformer.from_qfile(q, max_context=max_context)
    return Model(model, Tokenizer(q.tok), {**info, "path": str(path), "format": "lutengine",
                                           "quantization": q.meta.get("quantizer", DEFAULT_TAG)})
