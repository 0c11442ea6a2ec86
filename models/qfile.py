"""The lutengine quantized model file: one standard .safetensors file.

Layout (readable by the safetensors library):
    8-byte little-endian header length, JSON header, then the tensor bytes.
    Each packed linear layer <name> (HF name, models/config.py) is three tensors:
        <name>.planes  U8   [ceil(M/16), K/32, P, 64]     (lutkernels/layout.py)
        <name>.scales  F16  [ceil(M/16), K/G, S, 16]      (S = 1 for a uniform layer, else P; U8 when scale_bits 8)
        <name>.offsets F16  [ceil(M/16), K/G, 16]         (when the layer has offsets; I8 when scale_bits 8)
    A trellis-coded layer (lutkernels/trellis.py) is two:
        <name>.streams U8  [K * (2*k*ceil(M/16) + 1) + 16]
        <name>.scales  F32 [ceil(M/16) * 16]
    Norms and biases are F32 and the embedding F16 (or F32), under their own names; so is a
    rotated model's MLP rotation (model.mlp_rotation.signs [ffn], .mix [a, a]: lutkernels/rotation.py).
    __metadata__["lutengine"] is a JSON string:
        format_version, config (ModelConfig.to_dict()), tokenizer (tokenizer.json text),
        bos_id, eos_ids, add_bos, chat_template,
        tensors: {name: {method, bits, planes, group, M, K, offsets, uniform, scale_bits, int_grid, bpw}}, or for a
            trellis layer {format: "trellis", method, bits, M, K, bpw},
        source: {path, sha256}, quantizer (the settings that made the file).

Loading memory-maps the file: the packed arrays are views of the mapping, so a
model starts without reading its weights and pages them in on first use. The
data section starts 64-byte aligned and holds planes first, then F32, then
F16, then U8 and I8 tensors, so every array is aligned to its element size.

Version 2 added uniform layers (one scale per row and group, lutkernels/layout.py;
version 1 stored one per plane for every layer); version 3 added 8-bit scales
(scale_bits, U8 scales and I8 offsets); version 4 the MLP rotation of a rotated
model (F32 model.mlp_rotation.signs and .mix, engine/model.py), which an older
reader would ignore and so compute the wrong function; version 5 trellis-coded layers; version 6
the integer grid (int_grid: offsets implied, not stored). Version 2 to 5 files read as version 6
files with 16-bit scales (version 2), no MLP rotation (2 and 3), no trellis layers (2 to 4) and
no integer grid; a file of another version is refused, an older one with a request to quantize again.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import lutkernels as lk

from . import atomic
from .config import ModelConfig, ModelError, check_config, check_mlp_rotation
from .source import ModelSource, TokenizerInfo, check_tokenizer, tokenizers_errors

FORMAT_VERSION = 6
OLDEST_READ = 2  # versions 3 to 6 only added things whose absence means what version 2 stored
KEY = "lutengine"
ALIGN = 64
MAX_HEADER = 100 << 20  # a header is a few hundred KB even for large models; more means a corrupt length
DTYPES = {"U8": np.dtype("<u1"), "I8": np.dtype("<i1"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
PARTS = ("planes", "scales", "offsets")
MAX_DIMS = 8
MADV_POPULATE_READ = 22  # linux/mman.h (Linux 5.14)


@dataclass
class QFile:
    path: Path
    config: ModelConfig
    packed: dict[str, lk.PackedLinear]
    tensors: dict[str, np.ndarray]  # norms, biases, embedding: read-only views of the mapping
    meta: dict  # the "lutengine" metadata (module docstring)
    _tok: TokenizerInfo | None = field(default=None, repr=False)

    @property
    def weights(self) -> dict:
        """What engine.model.Transformer takes."""
        return {**self.tensors, **self.packed}

    @property
    def tok(self) -> TokenizerInfo:
        """Built on first use: parsing a 150k-entry tokenizer takes longer than mapping the weights."""
        if self._tok is None:
            from tokenizers import Tokenizer

            m = self.meta
            with tokenizers_errors(f"{self.path}: tokenizer does not load"):
                tokenizer = Tokenizer.from_str(m["tokenizer"])
            check_tokenizer(tokenizer, self.path)
            bos, eos, template = m.get("bos_id"), m.get("eos_ids", []), m.get("chat_template")
            n = tokenizer.get_vocab_size()
            if not isinstance(eos, list) or not all(_token(i, n) for i in eos) or not (bos is None or _token(bos, n)):
                raise ModelError(f"{self.path}: bos_id {str(bos)[:40]!r} or eos_ids {str(eos)[:80]!r} "
                                 f"are not ids of the tokenizer's {n} tokens")
            if template is not None and not isinstance(template, str):
                raise ModelError(f"{self.path}: chat_template is not a string")
            self._tok = TokenizerInfo(tokenizer, bos, tuple(eos), bool(m.get("add_bos", False)), template)
        return self._tok


    def page_in(self) -> None:
        """Map the packed layers' pages into this process now (madvise MADV_POPULATE_READ, Linux 5.14+;
        elsewhere nothing): the first token would fault them in a few pages at a time. ctypes releases
        the GIL, so in a thread this overlaps the tokenizer's parse, which holds it (engine/load.py).
        The embedding is left out: a token reads one of its rows."""
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        spans = []
        for w in self.packed.values():
            for a in vars(w).values():
                if isinstance(a, np.ndarray) and a.nbytes:
                    at = a.__array_interface__["data"][0]
                    spans.append((at - at % mmap.PAGESIZE, at + a.nbytes))
        for start, end in _merged(spans):
            if madvise(start, end - start, MADV_POPULATE_READ) != 0:
                return  # an older kernel (EINVAL), or the file shrank under us (EFAULT): the forward pages in


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def _token(i, n: int) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n


# ---- writing ------------------------------------------------------------------------------------

def save(path, src: ModelSource, quant: dict | None = None) -> Path:
    """Quantize a source model (engine.quant settings; None = defaults) and write it to path."""
    from engine.quant import quantize_model, settings

    s = settings(quant)
    weights, info = quantize_model(src.config, src.tensors, s)
    return write(path, src.config, weights, src.tok, info=info,
                 source={"path": str(src.path), "sha256": src.sha256}, quantizer=s)


def write(path, config: ModelConfig, weights: dict, tok: TokenizerInfo, *, info: dict | None = None,
          source: dict | None = None, quantizer: dict | None = None) -> Path:
    """Write weights (name -> PackedLinear or float16/float32 array) atomically (models/atomic.py: path
    holds its old content or the complete new file, whatever happens). info: {name: {"method", "bits"}}
    of packed layers."""
    path = Path(path)
    arrays, tensor_meta = _flatten(weights, info or {})
    # sorted, as the data is: layers quantized in parallel finish in any order, and the same
    # model and settings should give the same bytes
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "tokenizer": tok.tokenizer.to_str(),
            "bos_id": tok.bos_id, "eos_ids": list(tok.eos_ids), "add_bos": tok.add_bos,
            "chat_template": tok.chat_template, "tensors": dict(sorted(tensor_meta.items())), "source": source or {},
            "quantizer": quantizer or {}}
    header, order = _header(arrays, meta)
    try:
        with atomic.writing(path) as f:
            f.write(header)
            for name in order:
                f.write(memoryview(arrays[name]).cast("B"))
    except OSError as e:
        raise ModelError(atomic.write_error(e, path)) from None
    return path


def _flatten(weights: dict, info: dict) -> tuple[dict[str, np.ndarray], dict]:
    arrays, tensor_meta = {}, {}
    for name, w in weights.items():
        if isinstance(w, lk.TrellisLinear):
            arrays[f"{name}.streams"], arrays[f"{name}.scales"] = w.streams, w.scales
            i = info.get(name, {})
            tensor_meta[name] = {"format": "trellis", "method": i.get("method", "unknown"), "bits": w.k,
                                 "M": w.M, "K": w.K, "bpw": w.bits_per_weight()}
        elif isinstance(w, lk.PackedLinear):
            for part in PARTS:
                a = getattr(w, part)
                if a is not None:
                    arrays[f"{name}.{part}"] = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
            i = info.get(name, {})
            tensor_meta[name] = {"method": i.get("method", "unknown"), "bits": i.get("bits", w.P), "planes": w.P,
                                 "group": w.G, "M": w.M, "K": w.K, "offsets": w.offsets is not None,
                                 "uniform": w.uniform, "scale_bits": 8 if w.scale8 else 16,
                                 "int_grid": w.int_grid, "bpw": w.bits_per_weight()}
        else:
            a = np.asarray(w)
            if a.dtype not in (np.float16, np.float32):
                raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be stored (float16 or float32 only)")
            arrays[name] = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
    return arrays, tensor_meta


def _rank(name: str, a: np.ndarray) -> tuple:
    """Planes (multiples of 64 bytes) first, then wider elements before narrower: each stays aligned."""
    return (not name.endswith(".planes"), -a.dtype.itemsize, name)


def _header(arrays: dict[str, np.ndarray], meta: dict) -> tuple[bytes, list[str]]:
    codes = {v: k for k, v in DTYPES.items()}
    order = sorted(arrays, key=lambda n: _rank(n, arrays[n]))
    entries, at = {}, 0
    for name in order:
        a = arrays[name]
        entries[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [at, at + a.nbytes]}
        at += a.nbytes
    text = json.dumps({"__metadata__": {KEY: json.dumps(meta)}, **entries}, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # trailing spaces are valid JSON: the data starts aligned
    return len(text).to_bytes(8, "little") + text, order


# ---- reading ------------------------------------------------------------------------------------

def load(path) -> QFile:
    """Map a quantized model file and check it against its own metadata and config."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelError(f"{path}: too short to be a safetensors file ({size} bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    header, base = _read_header(buf, size, path)
    meta = _read_meta(header.pop("__metadata__", None), path)
    config = _read_config(meta, path, len(header))
    arrays = {name: _array(buf, base, size, entry, path, name) for name, entry in header.items()}
    packed = {name: _packed(arrays, name, info, path) for name, info in _tensor_meta(meta, path).items()}
    for name, a in arrays.items():
        if a.dtype not in (DTYPES["F16"], DTYPES["F32"]):
            raise ModelError(f"{path}: tensor {name} has dtype {a.dtype}, not float16/float32, "
                             "and no packed-layer metadata")
    qf = QFile(path, config, packed, arrays, meta)
    _check_complete(qf)
    return qf


def read_meta(path) -> dict:
    """Only the "lutengine" metadata of a quantized file (module docstring): its header is read, its tensors are not."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER:
                raise ModelError(f"{path}: header length {n} is beyond any quantized file's (not safetensors?)")
            text = f.read(n)
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    header, _ = _read_header(n.to_bytes(8, "little") + text, 8 + len(text), path)
    return _read_meta(header.get("__metadata__"), path)


def _read_header(buf, size: int, path: Path) -> tuple[dict, int]:
    n = int.from_bytes(buf[:8], "little")
    if n > size - 8 or n > MAX_HEADER:
        raise ModelError(f"{path}: header length {n} does not fit the file of {size} bytes "
                         "(truncated or not safetensors)")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: header is not a JSON object")
    return header, 8 + n


def _read_meta(md, path: Path) -> dict:
    if not isinstance(md, dict) or KEY not in md:
        raise ModelError(f"{path}: not a lutengine quantized file (no '{KEY}' metadata)")
    try:
        meta = json.loads(md[KEY])
    except (TypeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: '{KEY}' metadata is not valid JSON ({e})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise ModelError(f"{path}: metadata has no integer format_version")
    if version > FORMAT_VERSION:
        raise ModelError(f"{path}: format version {version} is newer than this lutengine supports ({FORMAT_VERSION})")
    if version < OLDEST_READ:
        raise ModelError(f"{path}: format version {version} was written by an older lutengine; "
                         "quantize the model again")
    return meta


def _read_config(meta: dict, path: Path, n_tensors: int) -> ModelConfig:
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as e:
        raise ModelError(f"{path}: metadata config is missing or malformed ({e})") from None
    check_config(config, path, n_tensors)
    return config


def _tensor_meta(meta: dict, path: Path) -> dict:
    tm = meta.get("tensors")
    if not isinstance(tm, dict):
        raise ModelError(f"{path}: metadata has no tensors table")
    return tm


def _array(buf, base: int, size: int, entry, path: Path, name: str) -> np.ndarray:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape, (start, end) = tuple(entry["shape"]), entry["data_offsets"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (*shape, start, end)):
            raise TypeError("integers expected")
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{path}: tensor {name}: malformed header entry {entry!r:.200} "
                         f"(dtype must be one of {', '.join(DTYPES)})") from None
    count = math.prod(shape)
    if (min(shape, default=0) < 0 or not 0 <= start <= end or end - start != count * dtype.itemsize
            or len(shape) > MAX_DIMS or max(shape, default=0) > size):  # no dimension outgrows the file
        raise ModelError(f"{path}: tensor {name}: data_offsets {[start, end]} disagree with "
                         f"{entry['dtype']} {list(shape)[:MAX_DIMS + 1]}")
    if base + end > size:
        raise ModelError(f"{path}: tensor {name}: data ends at byte {base + end} beyond the file's {size} (truncated?)")
    a = np.frombuffer(buf, dtype, count, base + start).reshape(shape)
    return a.copy() if (base + start) % dtype.itemsize else a  # a misaligned view would be UB for the C kernels


def _packed(arrays: dict[str, np.ndarray], name: str, info, path: Path) -> lk.PackedLinear | lk.TrellisLinear:
    if isinstance(info, dict) and info.get("format") == "trellis":
        return _trellis(arrays, name, info, path)
    try:
        M, K, P, G, has_off, uniform = (info[k] for k in ("M", "K", "planes", "group", "offsets", "uniform"))
        scale_bits, int_grid = info.get("scale_bits", 16), info.get("int_grid", False)
        _ints(M=M, K=K, planes=P, group=G)
        lk.check_shape(M, K, P, G)
        for key, v in (("offsets", has_off), ("uniform", uniform), ("int_grid", int_grid)):
            if not isinstance(v, bool):
                raise TypeError(f"{key} must be true or false, got {v!r}")
        if int_grid and (not uniform or has_off):
            raise TypeError("int_grid needs a uniform layer without stored offsets")
        if scale_bits not in (8, 16) or isinstance(scale_bits, bool):
            raise TypeError(f"scale_bits must be 16 or 8, got {scale_bits!r}")
    except (KeyError, TypeError, lk.LayoutError) as e:
        raise ModelError(f"{path}: tensor {name}: bad packed-layer metadata ({e})") from None
    Mt = -(-M // lk.layout.TILE)
    expect = {"planes": ("U8", (Mt, K // 32, P, 64)),
              "scales": ("U8" if scale_bits == 8 else "F16", (Mt, K // G, 1 if uniform else P, 16)),
              "offsets": ("I8" if scale_bits == 8 else "F16", (Mt, K // G, 16))}
    parts = {}
    for part in PARTS:
        key = f"{name}.{part}"
        if part == "offsets" and not has_off:
            if key in arrays:
                raise ModelError(f"{path}: tensor {name}: metadata says no offsets, but {key} is present")
            parts[part] = None
            continue
        if key not in arrays:
            raise ModelError(f"{path}: tensor {name}: {key} is missing")
        a = arrays.pop(key)
        dtype, shape = expect[part]
        if a.dtype != DTYPES[dtype] or a.shape != shape:
            raise ModelError(f"{path}: tensor {key} is {a.dtype} {list(a.shape)}; metadata "
                             f"(M={M}, K={K}, P={P}, G={G}, uniform={uniform}, scale_bits={scale_bits}) "
                             f"needs {dtype} {list(shape)}")
        parts[part] = a
    return lk.PackedLinear(M, K, P, G, parts["planes"], parts["scales"], parts["offsets"], uniform, scale_bits == 8,
                           int_grid)


def _trellis(arrays: dict[str, np.ndarray], name: str, info: dict, path: Path) -> lk.TrellisLinear:
    try:
        M, K, k = (info[key] for key in ("M", "K", "bits"))
        _ints(M=M, K=K, bits=k)
        lk.trellis.check_shape(M, K, k)
    except (KeyError, TypeError, lk.trellis.TrellisError) as e:
        raise ModelError(f"{path}: tensor {name}: bad trellis-layer metadata ({e})") from None
    Mt = -(-M // lk.layout.TILE)
    parts = {}
    for part, dtype, shape in (("streams", "U8", (K * (2 * k * Mt + 1) + lk.trellis.SLACK,)),
                               ("scales", "F32", (Mt * lk.layout.TILE,))):
        key = f"{name}.{part}"
        if key not in arrays:
            raise ModelError(f"{path}: tensor {name}: {key} is missing")
        a = arrays.pop(key)
        if a.dtype != DTYPES[dtype] or a.shape != shape:
            raise ModelError(f"{path}: tensor {key} is {a.dtype} {list(a.shape)}; metadata (trellis, M={M}, K={K}, "
                             f"bits={k}) needs {dtype} {list(shape)}")
        parts[part] = a
    return lk.TrellisLinear(M, K, k, parts["streams"], parts["scales"])


def _ints(**values) -> None:
    for key, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{key} must be an integer, got {str(v)[:40]!r}")


def _check_complete(qf: QFile) -> None:
    """Every tensor the config needs, with its shape (the head may be packed even when tied)."""
    c = qf.config
    expected = c.expected_shapes()
    expected["lm_head.weight"] = (c.vocab, c.hidden)
    for name, shape in expected.items():
        if name in qf.packed:
            got = (qf.packed[name].M, qf.packed[name].K)
        elif name in qf.tensors:
            got = qf.tensors[name].shape
        elif name == "lm_head.weight" and c.tied_embeddings:
            continue
        else:
            raise ModelError(f"{qf.path}: missing tensor {name}")
        if tuple(got) != shape:
            raise ModelError(f"{qf.path}: tensor {name} has shape {list(got)}, config says {list(shape)}")
    check_mlp_rotation(c, qf.tensors, qf.path)
