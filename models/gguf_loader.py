"""GGUF files (llama.cpp) to a ModelSource: HF tensor names, float32, Q/K rows in rotate-half order.

The header is parsed here rather than with gguf.GGUFReader, which builds a numpy
view per string and takes ~17 s on Qwen's 150k-token vocabulary; this parser
takes well under a second. gguf's constants and dequantizers are still used.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import dequantize

from .config import (ARCHITECTURES, ModelConfig, ModelError, check_architecture, check_config, check_fused,
                     check_tensors, fused_rows, global_every)
from .source import LazyTensors, ModelSource, drop_pages

# GGUF tensor names -> HF names (models/config.py); a ".weight"/".bias" suffix follows both.
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER_NAMES = {  # blk.{i}.<key> -> model.layers.{i}.<value>
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# where an architecture's GGUF names differ (llama.cpp's tensor map): ffn_norm is gemma3's
# pre-MLP norm, its post_attention_layernorm normalises the attention output; phi3 keeps
# fused tensors (ffn_up holds gate and up), split at load (config.FUSED)
GGUF_ARCH_LAYER_NAMES = {
    "gemma3": {**GGUF_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "phi3": {**GGUF_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
# llama.cpp's converter permutes Q/K rows of these architectures for its interleaved RoPE.
PERMUTED_ARCHS = {"llama", "mistral"}

_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays: no model writes them (llama.cpp refuses any), Python's stack would run out


class GGUFTensor(NamedTuple):
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, [out, in]: GGUF's ne reversed
    data: np.ndarray  # uint8 over the memory map, [*shape[:-1], bytes per row]


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from a buffer, in the values GGUFReader's field.contents() gives.

    Every length and count is checked against the bytes left before anything is
    sized by it, so a header that lies about them fails at once."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> tuple:
        self._need(struct.calcsize("<" + fmt))
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise _Truncated(f"{n} bytes needed at byte {self.pos}, the file has {len(self.buf)}")

    def count(self, what: str, min_bytes: int) -> int:
        """A count of items of at least min_bytes each, refused when the rest of the file cannot hold them."""
        n = self.scalar("Q")
        if n * min_bytes > len(self.buf) - self.pos:
            raise _Truncated(f"{n} {what} claimed at byte {self.pos - 8}, the file has {len(self.buf)} bytes")
        return n

    def scalar(self, fmt: str):
        return self.unpack(fmt)[0]

    def string(self) -> str:
        n = self.scalar("Q")
        self._need(n)
        self.pos += n
        return str(self.buf[self.pos - n:self.pos], "utf-8")

    def value(self, vtype: GGUFValueType, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[vtype])
        if depth >= _MAX_NESTING:
            raise ValueError(f"arrays nested deeper than {_MAX_NESTING} at byte {self.pos}")
        itype = GGUFValueType(self.scalar("I"))
        size = np.dtype(_SCALARS[itype]).itemsize if itype in _SCALARS else 8 if itype == GGUFValueType.STRING else 12
        n = self.count("array items", size)
        if itype in _SCALARS:  # numeric arrays in one go: token types have 150k entries
            dtype = np.dtype("<" + _SCALARS[itype])
            values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return values
        return [self.value(itype, depth + 1) for _ in range(n)]


def read_gguf(path) -> tuple[dict, dict[str, GGUFTensor]]:
    """Metadata {key: value} and tensors {GGUF name: GGUFTensor} of a GGUF file, memory-mapped."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{path}: not a GGUF file (bad magic)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    c = _Cursor(buf)
    c.pos = 4
    try:
        version = c.scalar("I")
        if version not in (2, 3):
            raise ModelError(f"{path}: unsupported GGUF version {version}")
        n_tensors = c.count("tensors", 24)  # name length, dimension count, type, offset
        n_kv = c.count("metadata entries", 13)  # key length, value type, the smallest value
        metadata = {}
        for _ in range(n_kv):
            key = c.string()
            metadata[key] = c.value(GGUFValueType(c.scalar("I")))
        infos = {}
        for _ in range(n_tensors):
            name, n_dims = c.string(), c.scalar("I")
            if not name.isprintable():
                raise ModelError(f"{path}: tensor name {name!r} holds control characters (corrupt header?)")
            if n_dims > _MAX_DIMS:
                raise ModelError(f"{path}: tensor {name} has {n_dims} dimensions (corrupt header?)")
            if name in infos:
                raise ModelError(f"{path}: tensor {name} appears twice in the tensor table")
            ne = c.unpack("Q" * n_dims)
            infos[name] = (ne, GGMLQuantizationType(c.scalar("I")), c.scalar("Q"))
    except ModelError:
        raise
    except _Truncated as e:
        raise ModelError(f"{path}: truncated GGUF header ({e})") from None
    except ValueError as e:  # unknown value or tensor type codes, bad UTF-8, arrays of arrays of ...
        raise ModelError(f"{path}: corrupt GGUF header ({e})") from None

    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0:
        raise ModelError(f"{path}: bad general.alignment {align!r}")
    start = -(-c.pos // align) * align
    tensors = {}
    for name, (ne, qtype, offset) in infos.items():
        block, type_size = GGML_QUANT_SIZES[qtype]
        if not ne or ne[0] % block:
            raise ModelError(f"{path}: tensor {name} shape {list(ne)} does not fit {qtype.name} blocks of {block}")
        if offset % align:
            raise ModelError(f"{path}: tensor {name} data offset {offset} is not a multiple of the alignment {align}")
        row_bytes = ne[0] // block * type_size
        shape = tuple(reversed(ne))
        begin, nbytes = start + offset, row_bytes * math.prod(shape[:-1])
        if begin + nbytes > len(buf):
            raise ModelError(f"{path}: tensor {name} data ends at byte {begin + nbytes}, "
                             f"beyond the end of the file ({len(buf)} bytes): truncated?")
        data = np.frombuffer(buf, np.uint8, nbytes, begin)
        tensors[name] = GGUFTensor(qtype, shape, data.reshape(shape[:-1] + (row_bytes,)))
    return metadata, tensors


def layer_names(arch: str) -> dict[str, str]:
    """GGUF layer tensor names -> HF names (after model.layers.{i}.) for arch."""
    return GGUF_ARCH_LAYER_NAMES.get(arch, GGUF_LAYER_NAMES)


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor, or None for tensors the runtime does not use."""
    base, _, kind = gguf_name.rpartition(".")
    if base in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[base]}.{kind}"
    parts, names = base.split("."), layer_names(arch)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{kind}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: per head, interleaved RoPE pairs back to rotate-half halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path, tokenizer: bool = True, lazy: bool = False) -> ModelSource:
    """lazy: tensors dequantized when read, one at a time (models/source.py LazyTensors), not all now."""
    path = Path(path)
    metadata, raw = read_gguf(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path}: no general.architecture in the metadata")
    check_architecture(arch, path)
    if "rope_freqs.weight" in raw:  # llama3-style RoPE scaling, which the runtime cannot apply
        raise ModelError(f"{path}: per-frequency RoPE factors (rope_freqs.weight) are not supported")
    if "rope_factors_long.weight" in raw or "rope_factors_short.weight" in raw:
        raise ModelError(f"{path}: unsupported: rope_factors_long/short (Phi-3's long-context RoPE)")
    config = gguf_config(metadata, raw, arch, path)
    check_config(config, path, len(raw))
    named = {hf: raw[g] for g in raw if (hf := hf_tensor_name(g, arch)) is not None}
    fused = fused_rows(config)
    if fused:
        check_fused(config, {n: t.shape for n, t in named.items()}, path)
        named.update({part: GGUFTensor(named[f].type, (end - begin, named[f].shape[1]), named[f].data[begin:end])
                      for part, (f, begin, end) in fused.items()})
        for f in {f for f, _, _ in fused.values()}:
            del named[f]
    check_tensors(config, named, path)  # shapes only, before seconds of dequantization

    heads = {}
    if arch in PERMUTED_ARCHS:
        for i in range(config.n_layers):
            for kind in ("weight", "bias"):
                heads[f"model.layers.{i}.self_attn.q_proj.{kind}"] = config.n_heads
                heads[f"model.layers.{i}.self_attn.k_proj.{kind}"] = config.n_kv_heads

    def convert(name: str):
        t = named[name]
        a = _dequantize(t.data, t.type, name, path).reshape(t.shape)
        if t.type == GGMLQuantizationType.F32:
            a = a.copy()  # own the memory rather than view the read-only map
        if lazy:
            drop_pages(t.data)
        return unpermute_rows(a, heads[name]) if name in heads else a

    if lazy:
        for name, t in named.items():  # an unsupported type fails now, not at first use: one block of it
            _dequantize(np.zeros(GGML_QUANT_SIZES[t.type][1], np.uint8), t.type, name, path)
        tensors = LazyTensors(convert, named)
    else:  # numpy releases the GIL in the dequantizers' array operations
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            tensors = dict(zip(named, pool.map(convert, named)))

    if tokenizer:
        from .gguf_tokenizer import tokenizer_from_gguf
        tok = tokenizer_from_gguf(metadata, path)
    else:
        tok = None
    meta = {
        "file_type": _file_type_name(metadata.get("general.file_type")),
        "tensor_types": {name: t.type.name for name, t in named.items()},
        "metadata": metadata,
    }
    return ModelSource(path, "gguf", config, tensors, tok, None, meta)


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType, name: str, path: Path) -> np.ndarray:
    try:
        return dequantize(data, qtype)
    except NotImplementedError:
        raise ModelError(f"{path}: tensor {name} has unsupported type {qtype.name}") from None


def gguf_config(md: dict, raw: dict, arch: str, path: Path) -> ModelConfig:
    def get(key, default=None, kind=int):
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{path}: missing metadata key {arch}.{key}")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelError(f"{path}: metadata key {arch}.{key} is {str(value)[:40]!r}, expected a positive integer")
        if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value)):
            raise ModelError(f"{path}: metadata key {arch}.{key} is {str(value)[:40]!r}, expected a finite number")
        return kind(value)

    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", md.get(f"{arch}.rope.dimension_count", hidden // n_heads))
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        vocab = get("vocab_size", len(tokens) or None)
    else:
        vocab = get("vocab_size", raw["token_embd.weight"].shape[0] if "token_embd.weight" in raw else None)
    scaling = md.get(f"{arch}.rope.scaling.type")
    if scaling is not None and not isinstance(scaling, str):
        raise ModelError(f"{path}: metadata key {arch}.rope.scaling.type is {str(scaling)[:40]!r}, expected a name")
    rope_scaling = None
    if scaling and scaling != "none":
        rope_scaling = {"rope_type": scaling, "factor": get("rope.scaling.factor", 1.0, float)}
        if f"{arch}.rope.scaling.original_context_length" in md:
            rope_scaling["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    return ModelConfig(
        arch=arch,
        n_layers=get("block_count"),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        ffn=get("feed_forward_length"),
        vocab=vocab,
        norm_eps=get("attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=get("rope.freq_base", ARCHITECTURES[arch].default_rope_theta, float),
        tied_embeddings="output.weight" not in raw,
        max_context=get("context_length"),
        rope_scaling=rope_scaling,
        **_arch_fields(md, arch, n_heads, hidden, head_dim, get, path),
    )


def _arch_fields(md: dict, arch: str, n_heads: int, hidden: int, head_dim: int, get, path: Path) -> dict:
    """The ModelConfig fields beyond llama's; where GGUF has no key, llama.cpp's values for the architecture."""
    window = get("attention.sliding_window") if f"{arch}.attention.sliding_window" in md else None
    if arch in ("mistral", "phi3"):
        return {"sliding_window": window}
    if arch != "gemma3":
        return {}
    if f"{arch}.attn_logit_softcapping" in md:
        raise ModelError(f"{path}: unsupported: {arch}.attn_logit_softcapping (attention score soft-capping)")
    softcap = get("final_logit_softcapping", kind=float) if f"{arch}.final_logit_softcapping" in md else None
    # llama.cpp's defaults (src/models/gemma3.cpp): every 6th layer global, local RoPE base 10000,
    # queries scaled by 1/sqrt(head_dim) except in the 62-layer 27B model, 1/sqrt(hidden/heads)
    query = hidden / n_heads if get("block_count") == 62 else head_dim
    return {"sliding_window": window, "global_every": _global_every(md, arch, get, path),
            "rope_local_theta": get("rope.freq_base_swa", 10000.0, float),
            "query_scale": float(query), "final_softcap": softcap}


def _global_every(md: dict, arch: str, get, path: Path) -> int:
    """{arch}.attention.sliding_window_pattern: every n-th layer global, or a flag per layer (true:
    windowed) that must be that periodic pattern; absent: 6."""
    pattern, n_layers = md.get(f"{arch}.attention.sliding_window_pattern"), get("block_count")
    if not isinstance(pattern, list):
        return get("attention.sliding_window_pattern", 6)
    if len(pattern) != n_layers or not all(isinstance(v, bool) for v in pattern):
        raise ModelError(f"{path}: {arch}.attention.sliding_window_pattern is not one flag per layer")
    return global_every(pattern, path, f"{arch}.attention.sliding_window_pattern")


def _file_type_name(file_type):
    try:
        return LlamaFileType(file_type).name
    except ValueError:
        return file_type  # absent (None) or a type newer than this gguf package
