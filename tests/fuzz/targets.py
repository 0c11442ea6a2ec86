"""The fuzz targets: each takes the bytes of one input, puts them where its reader looks and calls it.

An input may only load or raise ModelError, in one line naming the file or folder
it came from. The tokenizers the loaders return must also encode and decode a
probe text: a tokenizer that builds but breaks on first use is a load that should
have failed. Every target writes into one temporary folder made per process.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

from models import qfile
from models.config import ModelError
from models.gguf_loader import load_gguf, read_gguf
from models.gguf_tokenizer import tokenizer_from_gguf
from models.hf_loader import load_hf

from .mutate import unpack_folder

PROBE = "Hello world, 123 <|im_end|> ünï cödé\n\t<|endoftext|>"


class Target(NamedTuple):
    name: str
    kind: str  # the seeds' format, for the mutator: "gguf", "safetensors" or "folder"
    run: Callable[[bytes], None]
    where: Callable[[], Path]  # the path a ModelError must name


_work: Path | None = None


def work() -> Path:
    global _work
    if _work is None:
        _work = Path(tempfile.mkdtemp(prefix="lutfuzz-"))
        atexit.register(shutil.rmtree, _work, True)
    return _work


def _file(name: str, data: bytes) -> Path:
    path = work() / name
    path.write_bytes(data)
    return path


def _probe(info) -> None:
    ids = info.tokenizer.encode(PROBE).ids
    info.tokenizer.decode(ids)


def gguf(data: bytes) -> None:
    load_gguf(_file("m.gguf", data), tokenizer=False)


def gguf_tokenizer(data: bytes) -> None:
    path = _file("t.gguf", data)
    _probe(tokenizer_from_gguf(read_gguf(path)[0], path))


def quantized(data: bytes) -> None:
    q = qfile.load(_file("m.lut.safetensors", data))
    _probe(q.tok)


def hf(data: bytes) -> None:
    folder = work() / "hf"
    folder.mkdir(exist_ok=True)
    for old in os.listdir(folder):
        os.unlink(folder / old)
    for name, body in unpack_folder(data).items():
        (folder / name).write_bytes(body)
    _probe(load_hf(folder).tok)


TARGETS = {t.name: t for t in (
    Target("gguf", "gguf", gguf, lambda: work() / "m.gguf"),
    Target("gguf_tokenizer", "gguf", gguf_tokenizer, lambda: work() / "t.gguf"),
    Target("qfile", "safetensors", quantized, lambda: work() / "m.lut.safetensors"),
    Target("hf", "folder", hf, lambda: work() / "hf"),
)}


def outcome(target: Target, data: bytes) -> str | None:
    """None when the input loads or is refused properly; else what went wrong, in one line."""
    try:
        target.run(data)
    except ModelError as e:
        msg = str(e)
        if "\n" in msg:
            return f"ModelError of {msg.count(chr(10)) + 1} lines: {msg[:200]!r}"
        if str(target.where()) not in msg:
            return f"ModelError not naming {target.where()}: {msg[:300]}"
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # MemoryError, RecursionError, the tokenizers' PanicException included
        return f"{type(e).__name__}: {_where(e)}: {str(e)[:300]!r}"
    return None


def _where(e: BaseException) -> str:
    """The innermost frame of the project's code that the exception passed through."""
    tb, frame = e.__traceback__, "?"
    root = str(Path(__file__).resolve().parents[2])
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.startswith(root) and "/tests/fuzz/" not in code.co_filename:
            frame = f"{os.path.relpath(code.co_filename, root)}:{tb.tb_lineno} {code.co_name}"
        tb = tb.tb_next
    return frame
