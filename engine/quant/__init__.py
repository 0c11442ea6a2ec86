"""Quantizers: float32 weights to PackedLinear layers, and the settings that choose them.

Settings are a plain dict (stored verbatim in the quantized model file):
    method     "rtn" (round to nearest, engine/quant/rtn.py)
    bits       planes per linear layer weight (1..8)
    group      preferred group size; lowered per matrix to the largest kernel group size dividing K
    symmetric  no offsets, grid symmetric around 0
    head_bits  bits of the output head (lm_head, or a packed copy of a tied embedding)
"""
from __future__ import annotations

import numpy as np

import lutkernels as lk
from models.config import ModelConfig

from . import rtn

DEFAULT = {"method": "rtn", "bits": 4, "group": 32, "symmetric": False, "head_bits": 8}
METHODS = {"rtn": rtn.quantize}

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def settings(quant: dict | None = None) -> dict:
    """DEFAULT updated by `quant`, checked."""
    s = {**DEFAULT, **(quant or {})}
    unknown = set(s) - set(DEFAULT)
    if unknown:
        raise ValueError(f"unknown quantizer settings: {', '.join(sorted(unknown))}")
    if s["method"] not in METHODS:
        raise ValueError(f"unknown quantization method {s['method']!r} (known: {', '.join(METHODS)})")
    for key in ("bits", "head_bits"):
        if not isinstance(s[key], int) or not 1 <= s[key] <= 8:
            raise ValueError(f"{key} must be an integer 1..8, got {s[key]!r}")
    return s


def quantize_model(config: ModelConfig, tensors: dict[str, np.ndarray], quant: dict | None = None):
    """HF-named float32 tensors -> (weights, info).

    weights: every linear layer and the head as PackedLinear, the embedding as
    float16 (only rows are looked up), norms and biases float32. A tied head
    becomes a packed copy under lm_head.weight. info: {name: {"method", "bits"}}
    for every packed layer."""
    s = settings(quant)
    fn = METHODS[s["method"]]
    weights: dict[str, np.ndarray | lk.PackedLinear] = {}
    info: dict[str, dict] = {}
    linear = {f"model.layers.{i}.{name}" for i in range(config.n_layers) for name in config.linear_shapes()}
    for name, t in tensors.items():
        if name in linear:
            weights[name] = fn(np.asarray(t, np.float32), s["bits"], s["group"], s["symmetric"])
            info[name] = {"method": s["method"], "bits": s["bits"]}
        elif name != HEAD:
            weights[name] = np.asarray(t, np.float32)
    head = tensors[EMBED] if config.tied_embeddings else tensors[HEAD]
    weights[HEAD] = fn(np.asarray(head, np.float32), s["head_bits"], s["group"], s["symmetric"])
    info[HEAD] = {"method": s["method"], "bits": s["head_bits"]}
    weights[EMBED] = _to_f16(tensors[EMBED])
    return weights, info


def _to_f16(a: np.ndarray) -> np.ndarray:
    h = np.asarray(a).astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("embedding out of float16 range")
    return h
