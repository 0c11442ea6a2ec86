"""From a name the user typed to a runnable Model.

A catalog name, GGUF file or HF folder runs from its quantized file in the
cache, made on first use (pull, convert, quantize to the default format, save);
later starts only memory-map it, which is what lets `chat` start in about a
second. A lutengine quantized file runs as it is. `dense=True` runs the float32
reference from the source weights.

A local source's cached file is keyed by what would change the conversion
(source_key): the size, mtime and leading bytes of each file read, and the
quantizer's version and default settings. One process converts while others
wait on a lock (models/atomic.py), and the file appears whole or not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from pathlib import Path

from models import catalog
from models.atomic import lock, write_error
from models.config import ModelError

from .api import Model
from .memory import DEFAULT_KV_TYPE
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

    def convert(q: Path) -> None:
        src = open_source(name, progress=progress, lazy=True)
        _say(progress, f"{name}: quantizing to the default format ({default_tag()}), once")
        qfile.save(q, src)
        _say(progress, f"{name}: saved {q}")

    return _once(cached_qfile(name), name, progress, convert)


# a GGUF's header and tensor table, or an HF folder's JSON files, fit in this with room to spare;
# hashing it costs milliseconds at each start
HEAD_BYTES = 16 << 20
SOURCE_SUFFIXES = (".json", ".safetensors", ".jinja")  # what models/hf_loader.py reads from a folder


def source_key(path: Path) -> str:
    """SHA-256 over the quantizer's version and default settings and, for each file the loader
    reads (a GGUF file; an HF folder's config, tokenizer and safetensors files), its name, size,
    mtime and the SHA-256 of its header (a safetensors file's header, else its first HEAD_BYTES)."""
    from .quant import QUANTIZER_VERSION, settings

    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in SOURCE_SUFFIXES and p.is_file())
    h = hashlib.sha256(json.dumps({"quantizer_version": QUANTIZER_VERSION, "settings": settings()},
                                  sort_keys=True).encode())
    try:
        for f in files:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            h.update(hashlib.sha256(_head(f)).digest())
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()


def _head(f: Path) -> bytes:
    with open(f, "rb") as fh:
        n = HEAD_BYTES
        if f.suffix == ".safetensors":
            size = fh.read(8)
            n = min(int.from_bytes(size, "little"), HEAD_BYTES) if len(size) == 8 else 0
            return size + fh.read(n)
        return fh.read(n)


def converted_qfile(path: Path) -> Path:
    """Where the GGUF file or HF folder at path, converted to the default format, is cached."""
    from models.qfile import FORMAT_VERSION

    path = path.resolve()
    stem = path.stem if path.is_file() else path.name
    return converted_dir() / f"{stem}-{source_key(path)[:16]}.{default_tag()}.v{FORMAT_VERSION}.lut.safetensors"


def converted_dir() -> Path:
    """$LUTENGINE_CONVERTED (a disk with room for them, or a test's own folder), else <cache>/converted."""
    if os.environ.get("LUTENGINE_CONVERTED"):
        return Path(os.environ["LUTENGINE_CONVERTED"]).expanduser()
    return catalog.cache_dir() / "converted"


def local_qfile(path: Path, progress: bool = False) -> Path:
    """The GGUF file or HF folder at path in the default format, converted and cached on first use."""
    from models import qfile
    from models.load import open_source

    def convert(q: Path) -> None:
        # the file records where it came from; lazy: converted a tensor at a time (bounded memory)
        src = open_source(path.resolve(), progress=progress, lazy=True)
        print(f"converting {path} to the default format ({default_tag()}) once; cached at {q}",
              file=sys.stderr, flush=True)
        qfile.save(q, src)
        _prune(q, src.path)

    return _once(converted_qfile(path), str(path), progress, convert)


def _once(q: Path, name: str, progress: bool, convert) -> Path:
    """q, made by convert(q) unless it exists; one process converts while the others wait."""
    if q.exists():
        return q
    try:
        q.parent.mkdir(parents=True, exist_ok=True)
        held = lock(q, lambda: _say(progress, f"{name}: waiting for another process converting it"))
    except OSError as e:
        raise ModelError(write_error(e, q.parent)) from None
    with held:
        if not q.exists():  # made while this one waited
            convert(q)
    return q


CONVERTED_NAME = re.compile(r".+-[0-9a-f]{16}\.[a-z0-9]+\.v\d+\.lut\.safetensors")  # converted_qfile's names


def _prune(keep: Path, source: Path) -> None:
    """Remove cached conversions of a source that changed (same path) or is gone, so the cache
    holds one file per local model. Only files named as conversions are looked at: the folder may
    be the user's ($LUTENGINE_CONVERTED)."""
    from models import qfile

    for other in keep.parent.iterdir():
        if other == keep or not CONVERTED_NAME.fullmatch(other.name):
            continue
        try:
            made_from = qfile.read_meta(other).get("source")
        except ModelError:
            continue  # not ours to judge: left alone
        was = made_from.get("path") if isinstance(made_from, dict) else None
        if isinstance(was, str) and (Path(was) == source or not Path(was).exists()):
            other.unlink(missing_ok=True)
            # a process still waiting on this lock finds the file made or makes it again, atomically
            other.with_name(f".{other.name}.lock").unlink(missing_ok=True)


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
         max_context: int | None = None, progress: bool = False, kv_type: str = DEFAULT_KV_TYPE,
         opened=None) -> Model:
    """Load a catalog model, GGUF file, HF folder or lutengine quantized file, ready to generate.
    kv_type: the KV cache's element type (engine/memory.py KV_TYPES). opened: the models.qfile.QFile
    that name_or_path runs from, when the caller has it (memory.check's Estimate.qfile), so that
    neither its header nor a source's cache key is read again."""
    from models import qfile

    if threads is not None:
        import lutkernels

        lutkernels.set_threads(threads)
    if opened is not None and not dense:
        name = name_or_path or catalog.DEFAULT
        return _from_qfile(name, opened, max_context, kv_type)
    name, path = resolve(name_or_path)
    if path is not None and dense:
        raise ModelError(f"{path}: a quantized file has no float weights; --dense needs the source model")
    if path is None and not dense:
        local = Path(name).expanduser()
        if local.exists():
            path = local_qfile(local, progress)
        elif name in catalog.CATALOG:
            path = default_qfile(name, progress)
    if path is not None:
        return _from_qfile(name, qfile.load(path), max_context, kv_type)
    from models.load import open_source

    from .model import Transformer

    src = open_source(name, progress=progress)
    model = Transformer.from_source(src, None if dense else {}, max_context=max_context, kv_type=kv_type)
    return Model(model, Tokenizer(src.tok), {"name": name, "path": str(src.path), "format": src.format,
                                             "quantization": "float32 (dense)" if dense else default_tag()})


def _from_qfile(name: str, q, max_context: int | None, kv_type: str) -> Model:
    from .model import Transformer

    # the weights' pages are mapped on the other core while the tokenizer is parsed (q.tok, in from_qfile)
    threading.Thread(target=q.page_in, name="page-in", daemon=True).start()
    model = Transformer.from_qfile(q, max_context=max_context, kv_type=kv_type)
    return Model(model, Tokenizer(q.tok), {"name": name, "path": str(q.path), "format": "lutengine",
                                           "quantization": tag(q.meta.get("quantizer", {}))})


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
