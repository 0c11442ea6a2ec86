"""`lutengine info`: what a model is and what it costs, in honest bits per weight.

Bits are read from what is stored (bytes of every tensor as laid out on
disk), never from a format's nominal rate: linear layers, embedding and head
are reported separately, as ../shared/PROTOCOL.md asks.
"""
from __future__ import annotations

from pathlib import Path

from models import catalog
from models.config import ModelConfig, ModelError, check_architecture

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _linear_names(config: ModelConfig) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(config.n_layers) for n in config.linear_shapes()]


def parameters(config: ModelConfig) -> int:
    return sum(int(_prod(s)) for s in config.expected_shapes().values())


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _bpw(bits: dict[str, tuple[float, int]], names) -> float | None:
    """bits: name -> (stored bits, weights)."""
    got = [bits[n] for n in names if n in bits]
    return round(sum(b for b, _ in got) / sum(w for _, w in got), 4) if got else None


def summary(path: Path, fmt: str, config: ModelConfig, bits: dict[str, tuple[float, int]], extra: dict) -> dict:
    return {
        "path": str(path), "format": fmt, "architecture": config.arch, "parameters": parameters(config),
        "layers": config.n_layers, "hidden": config.hidden, "heads": f"{config.n_heads} (kv {config.n_kv_heads})",
        "ffn": config.ffn, "vocab": config.vocab, "context": config.max_context, **extra,
        "bpw_linear": _bpw(bits, _linear_names(config)), "bpw_embedding": _bpw(bits, [EMBED]),
        "bpw_head": _bpw(bits, [HEAD]) if HEAD in bits else "tied (embedding)",
        "file_bytes": path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir()),
    }


def describe_qfile(path: Path) -> dict:
    from models import qfile

    q = qfile.load(path)
    bits = {n: (t["bpw"] * t["M"] * t["K"], t["M"] * t["K"]) for n, t in q.meta["tensors"].items()}
    for n, a in q.tensors.items():
        bits[n] = (8.0 * a.nbytes, a.size)
    s = q.meta.get("quantizer", {})
    return summary(path, "lutengine", q.config,
                   bits, {"quantization": s, "source": q.meta.get("source", {}).get("path")})


def describe_gguf(path: Path) -> dict:
    from models.gguf_loader import gguf_config, hf_tensor_name, read_gguf

    md, raw = read_gguf(path)
    arch = md.get("general.architecture")
    check_architecture(arch, path)
    config = gguf_config(md, raw, arch, path)
    bits, types = {}, {}
    for g, t in raw.items():
        name = hf_tensor_name(g, arch)
        if name is not None:
            bits[name] = (8.0 * t.data.nbytes, _prod(t.shape))
            types[t.type.name] = types.get(t.type.name, 0) + 1
    return summary(path, "gguf", config, bits, {"tensor_types": types})


def describe_hf(path: Path) -> dict:
    from models.hf_loader import hf_config, read_json, read_safetensors

    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json")
    cfg = read_json(path / "config.json")
    config = hf_config(cfg, path / "config.json")
    bits = {}
    for f in path.glob("*.safetensors"):
        for name, t in read_safetensors(f).items():
            bits[name] = (8.0 * t.data.nbytes, _prod(t.shape))
    return summary(path, "hf", config, bits, {})


def describe(name_or_path: str | None, max_context: int | None = None, kv_type: str | None = None) -> dict:
    """A catalog name describes what runs by default: its cached quantized file (made if missing,
    unless it will not fit). kv_cache and memory: what generate would need for the context, the
    model's own at most 4096 positions unless max_context says (engine/memory.py)."""
    from . import memory
    from .load import cached_qfile

    kv_type = kv_type or memory.DEFAULT_KV_TYPE
    est = memory.for_model(name_or_path, max_context, kv_type)
    name = name_or_path or catalog.DEFAULT
    if est is not None and not est.fits and name in catalog.CATALOG and not cached_qfile(name).exists():
        raise est.refusal(name)  # before converting
    info = _describe(name_or_path)
    est = est or memory.for_model(name_or_path, max_context, kv_type)  # a catalog model pulled just now
    if est is not None:
        info["kv_cache"] = f"{est.kv_type}, {est.positions} positions: {est.kv:,} bytes"
        info["memory"] = est.line()
    return info


def _describe(name_or_path: str | None) -> dict:
    from .load import default_qfile, is_qfile

    name = name_or_path or catalog.DEFAULT
    path = Path(name).expanduser()
    if is_qfile(path):
        return describe_qfile(path)
    if path.is_dir():
        return describe_hf(path)
    if path.is_file():
        return describe_gguf(path)
    if name not in catalog.CATALOG:
        raise ModelError(f"no such model file, folder or catalog name: {name} (catalog: {', '.join(catalog.CATALOG)})")
    return describe_qfile(default_qfile(name, progress=True))
