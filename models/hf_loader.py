"""Hugging Face folders (config.json, *.safetensors, tokenizer files) to a ModelSource.

HF checkpoints already use the runtime's tensor names and rotate-half Q/K order,
so loading is reading: the safetensors parser below checks every header field
against the file before trusting it.
"""
from __future__ import annotations

import json
import math
import mmap
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import (ARCHITECTURES, ModelConfig, ModelError, check_architecture, check_config, check_fused,
                     check_tensors, fused_rows, global_every)
from .source import LazyTensors, ModelSource, TokenizerInfo, check_tokenizer, drop_pages, tokenizers_errors

# BF16 is read as its raw uint16 bits: numpy has no bfloat16
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_MAX_DIMS = 8


class SafeTensor(NamedTuple):
    dtype: str  # "F32" | "F16" | "BF16"
    shape: tuple[int, ...]
    data: np.ndarray  # over the memory map, in the stored dtype (BF16 as uint16)

    def float32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32)  # a copy, so it does not pin the map

    def rows(self, begin: int, end: int) -> "SafeTensor":
        return SafeTensor(self.dtype, (end - begin, *self.shape[1:]), self.data[begin:end])


class _Gain(NamedTuple):
    """A gemma3 norm weight, stored as the factor minus one (Gemma3RMSNorm multiplies by 1 + w)."""
    stored: SafeTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    @property
    def dtype(self) -> str:
        return self.stored.dtype

    def float32(self) -> np.ndarray:
        return self.stored.float32() + np.float32(1)


def read_safetensors(path) -> dict[str, SafeTensor]:
    """The tensors of one .safetensors file, memory-mapped, after validating its header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                raise ModelError(f"{path}: safetensors header length {n} goes beyond the end of the file ({size} bytes)")
            text = f.read(n)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)

    data_start, data_len = 8 + n, size - 8 - n
    spans, tensors = [], {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(entry, name, path)
        if dtype not in _DTYPES:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype} (supported: {', '.join(_DTYPES)})")
        if not 0 <= begin <= end <= data_len:
            raise ModelError(f"{path}: tensor {name} data offsets [{begin}, {end}] are out of order "
                             f"or beyond the end of the data ({data_len} bytes)")
        need = math.prod(shape) * _DTYPES[dtype].itemsize
        if len(shape) > _MAX_DIMS or max(shape, default=0) > data_len:  # only an empty tensor could claim that
            raise ModelError(f"{path}: tensor {name} has shape {list(shape)[:_MAX_DIMS + 1]}, "
                             f"which the data ({data_len} bytes) cannot hold")
        if end - begin != need:
            raise ModelError(f"{path}: tensor {name} has {end - begin} bytes, but {dtype} {list(shape)} needs {need}")
        spans.append((begin, end, name))
        data = np.frombuffer(buf, _DTYPES[dtype], math.prod(shape), data_start + begin)
        tensors[name] = SafeTensor(dtype, shape, data.reshape(shape))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise ModelError(f"{path}: tensor {name} overlaps tensor {prev}")
    return tensors


def _entry(entry, name: str, path: Path):
    try:
        dtype, shape, offsets = entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"])
    except (KeyError, TypeError) as e:
        raise ModelError(f"{path}: tensor {name} has a malformed header entry ({e!r})") from None
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + offsets)
    if not isinstance(dtype, str) or len(offsets) != 2 or not ints:
        raise ModelError(f"{path}: tensor {name} has a malformed header entry")
    return dtype, shape, offsets


def load_hf(folder, tokenizer: bool = True, lazy: bool = False) -> ModelSource:
    """lazy: tensors converted to float32 when read, one at a time (models/source.py LazyTensors)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder}: no config.json")
    cfg = read_json(config_path)
    config = hf_config(cfg, config_path)

    raw = {}
    for file in _weight_files(folder):
        raw.update(read_safetensors(file))
    check_config(config, config_path, len(raw))
    if config.tied_embeddings:  # some tied checkpoints still store a copy of the head
        raw.pop("lm_head.weight", None)
    raw = _runtime_tensors(config, raw, folder)
    check_tensors(config, raw, folder)
    names = config.expected_shapes()
    tensors = LazyTensors(lambda name: _converted(raw[name]), names) if lazy else {n: raw[n].float32() for n in names}
    meta = {"tensor_types": {name: raw[name].dtype for name in tensors}}
    tok = hf_tokenizer(folder, cfg) if tokenizer else None
    return ModelSource(folder, "hf", config, tensors, tok, None, meta)


def _runtime_tensors(config: ModelConfig, raw: dict[str, SafeTensor], folder: Path) -> dict:
    """The checkpoint's tensors as the runtime names and holds them (models/config.py): fused ones
    split into their parts, gemma3's norm weights made factors."""
    fused = fused_rows(config)
    if fused:
        check_fused(config, {n: t.shape for n, t in raw.items()}, folder)
        raw = {**raw, **{part: raw[name].rows(begin, end) for part, (name, begin, end) in fused.items()}}
    if config.gemma:
        raw = {n: _Gain(t) if n.endswith("norm.weight") else t for n, t in raw.items()}
    return raw


# model_type -> architecture, where they differ
HF_ARCHS = {"gemma3_text": "gemma3"}


def hf_config(cfg: dict, path: Path) -> ModelConfig:
    def get(key, default=None, kind=int):
        value = cfg.get(key)
        value = default if value is None else value
        if value is None:
            raise ModelError(f"{path}: missing {key}")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelError(f"{path}: {key} is {str(value)[:40]!r}, expected a positive integer")
        if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value)):
            raise ModelError(f"{path}: {key} is {str(value)[:40]!r}, expected a finite number")
        return kind(value)

    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:
        raise ModelError(f"{path}: unsupported: gemma3 with a vision tower (Gemma3ForConditionalGeneration); "
                         f"use a text-only checkpoint (model_type gemma3_text)")
    arch = HF_ARCHS.get(model_type, model_type) if isinstance(model_type, str) else model_type
    check_architecture(arch, path)
    hidden, n_heads = get("hidden_size"), get("num_attention_heads")
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ModelError(f"{path}: rope_scaling is {str(scaling)[:40]!r}, expected an object")
    if scaling is not None:  # older configs spell rope_type as "type"
        scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    return ModelConfig(
        arch=arch,
        n_layers=get("num_hidden_layers"),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", n_heads),
        head_dim=get("head_dim", 256 if arch == "gemma3" else hidden // n_heads),
        ffn=get("intermediate_size"),
        vocab=get("vocab_size"),
        norm_eps=get("rms_norm_eps", 1e-6, float),  # the HF default for all three architectures
        rope_theta=get("rope_theta", ARCHITECTURES[arch].default_rope_theta, float),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),  # the HF defaults
        max_context=get("max_position_embeddings"),
        rope_scaling=scaling,
        **_arch_fields(arch, cfg, get, path),
    )


def _arch_fields(arch: str, cfg: dict, get, path: Path) -> dict:
    """The ModelConfig fields beyond llama's, as each architecture's HF config gives them (HF defaults
    where a key is absent); features the runtime does not implement are refused by name."""
    act = cfg.get("hidden_act" if arch != "gemma3" else "hidden_activation")
    wanted = "gelu_pytorch_tanh" if arch == "gemma3" else "silu"
    if act is not None and act != wanted:
        raise ModelError(f"{path}: unsupported: activation {str(act)[:40]!r} for {arch} (supported: {wanted})")
    if arch == "mistral":  # MistralConfig's default window is 4096; null turns it off
        return {"sliding_window": 4096 if "sliding_window" not in cfg else _window(cfg, get)}
    if arch == "phi3":
        rotary = cfg.get("partial_rotary_factor", 1.0)
        if rotary != 1.0:
            raise ModelError(f"{path}: unsupported: partial_rotary_factor {str(rotary)[:40]} (partial RoPE)")
        kind = (cfg.get("rope_scaling") or {}).get("type", (cfg.get("rope_scaling") or {}).get("rope_type"))
        if kind is not None and kind not in ("linear", "llama3", "default"):
            raise ModelError(f"{path}: unsupported: rope_scaling {str(kind)[:40]!r} (Phi-3's long-context RoPE)")
        return {"sliding_window": _window(cfg, get)}
    if arch != "gemma3":
        return {}
    if cfg.get("attn_logit_softcapping") is not None:
        raise ModelError(f"{path}: unsupported: attn_logit_softcapping (attention score soft-capping)")
    window = get("sliding_window", 4096)
    return {"sliding_window": window, "global_every": _global_every(cfg, get, path),
            "rope_local_theta": get("rope_local_base_freq", 10000.0, float),
            "query_scale": get("query_pre_attn_scalar", 256, float),
            "final_softcap": (get("final_logit_softcapping", kind=float)
                              if cfg.get("final_logit_softcapping") is not None else None)}


def _window(cfg: dict, get) -> int | None:
    return None if cfg.get("sliding_window") is None else get("sliding_window")


def _global_every(cfg: dict, get, path: Path) -> int:
    """Gemma3's layer pattern: layer_types when the config lists them (newer transformers), else
    sliding_window_pattern (every n-th layer global); only periodic patterns are representable."""
    n_layers, types = get("num_hidden_layers"), cfg.get("layer_types")
    if types is None:
        return get("sliding_window_pattern", 6)
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {"sliding_attention",
                                                                                     "full_attention"}:
        raise ModelError(f"{path}: layer_types is not a list of {n_layers} sliding_attention/full_attention")
    return global_every([t == "sliding_attention" for t in types], path, "layer_types")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index}: no weight_map")
        if not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in weight_map.values()):
            raise ModelError(f"{index}: weight_map names something other than files beside it")
        names = set(weight_map.values())
        files = [folder / name for name in sorted(names)]
        for file in files:
            try:
                present = file.is_file()
            except OSError as e:  # a name longer than the file system allows, say
                raise ModelError(f"{index}: shard {file.name[:80]!r}: {e.strerror}") from None
            if not present:
                raise ModelError(f"{index}: shard {file.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights")
    return files


def hf_tokenizer(folder: Path, cfg: dict) -> TokenizerInfo:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no tokenizer.json")
    with tokenizers_errors(f"{path}: cannot load tokenizer"):
        tok = Tokenizer.from_file(str(path))
    tc_path, gc_path = folder / "tokenizer_config.json", folder / "generation_config.json"
    tc = read_json(tc_path) if tc_path.is_file() else {}
    gc = read_json(gc_path) if gc_path.is_file() else {}

    def token_id(value):
        text = value.get("content") if isinstance(value, dict) else value
        if text is None:
            return None
        if not isinstance(text, str):
            raise ModelError(f"{tc_path}: special token {str(text)[:40]!r} is not a string")
        tid = tok.token_to_id(text)
        if tid is None:
            raise ModelError(f"{tc_path}: special token {text!r:.80} is not in the vocabulary")
        return tid

    check_tokenizer(tok, path)
    n = tok.get_vocab_size()
    bos = token_id(tc.get("bos_token"))
    if bos is None:
        bos = cfg.get("bos_token_id")
        if isinstance(bos, list):  # some configs list several; the first is the one prepended
            bos = bos[0] if bos else None
        _ids(bos, n, folder / "config.json")
    eos = ([token_id(tc.get("eos_token"))] + _ids(gc.get("eos_token_id"), n, gc_path)
           + _ids(cfg.get("eos_token_id"), n, folder / "config.json"))
    add_bos = tc.get("add_bos_token")
    if add_bos is None:  # then tokenizer.json's post-processor decides, as in transformers
        add_bos = bos is not None and tok.encode("a").ids[:1] == [bos]

    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"{jinja}: cannot read: {e}") from None
    if template is not None and not isinstance(template, str):
        raise ModelError(f"{tc_path}: chat_template is {str(template)[:40]!r}, expected a string")
    return TokenizerInfo(tok, bos, tuple(dict.fromkeys(i for i in eos if i is not None)), bool(add_bos), template)


def _ids(value, n: int, path: Path) -> list[int]:
    """Token ids given as one id or a list of them: each an integer below the vocabulary size n."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
            raise ModelError(f"{path}: token id {str(i)[:40]!r} is not one of the tokenizer's {n} ids")
    return ids


def read_json(path: Path) -> dict:
    """A JSON object from a file; every JSON file of an HF folder holds one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object")
    return data


def _converted(t: SafeTensor) -> np.ndarray:
    """A lazy source's float32 tensor, its file pages let go once it owns its values."""
    a = t.float32()
    if not np.shares_memory(a, t.data):
        drop_pages(t.data)
    return a
