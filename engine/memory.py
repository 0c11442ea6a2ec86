"""Will a model fit in memory? Said before its weights are read, so that a model too big
for the machine is refused with one line instead of the process being killed.

need = weights + KV cache for the context + OVERHEAD, against MemAvailable of
/proc/meminfo (or LUTENGINE_MEMORY_LIMIT_MB, which overrides it). Weights: a
lutengine file (as given, or a source's cached conversion) is memory-mapped and
every byte of it is read at each token, so its size; a source run --dense is held
as float32, 4 bytes a parameter; a source still to be converted counts as its own
size (about the packed size of a 4-bit GGUF; more than it for a float16 folder,
so such a source may be refused on a machine that would just hold it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from models import catalog
from models.config import ModelConfig, ModelError

KV_TYPES = ("f32", "f16", "q8")  # engine/model.py KVCache; lut.h LUT_KV_*
# What load(), the API and the command line run: on SmolLM2-135M at ctx 512 its wiki perplexity is
# within 0.1% of f32's (bench/RESULTS.md "KV cache types"), at half the bytes.
DEFAULT_KV_TYPE = "f16"
KV_ELEMENT_BYTES = {"f32": 4, "f16": 2, "q8": 1}
Q8_SCALE_BYTES = 4  # one float32 per (position, kv head) row
OVERHEAD = 200 << 20  # interpreter, numpy, tokenizer, decode buffers: generate's RSS beyond weights and cache
LIMIT_ENV = "LUTENGINE_MEMORY_LIMIT_MB"
MIB = 1 << 20


class MemoryLimitError(ModelError):
    """The model, its KV cache and the runtime need more memory than is available."""


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv: int
    kv_type: str
    positions: int
    available: int | None  # None: unknown (no /proc/meminfo), nothing is refused
    available_from: str
    # the lutengine file whose header gave the figures (models.qfile.QFile), or None: engine.load.load takes it
    # rather than parse the header of a 1B model again (a few tenths of a second)
    qfile: object = field(default=None, compare=False, repr=False)

    @property
    def need(self) -> int:
        return self.weights + self.kv + OVERHEAD

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available

    def line(self) -> str:
        parts = (f"about {self.need / MIB:,.0f} MiB (weights {self.weights / MIB:,.0f} MiB + KV cache "
                 f"{self.kv_type} {self.kv / MIB:,.1f} MiB for {self.positions} positions + {OVERHEAD // MIB} MiB)")
        if self.available is None:
            return f"needs {parts}; available memory unknown"
        verdict = "fits" if self.fits else "will not fit"
        return f"{verdict}: needs {parts}, {self.available / MIB:,.0f} MiB available ({self.available_from})"

    def refusal(self, name: str) -> MemoryLimitError:
        smaller = "a smaller --ctx-size" + (" or --kv-type q8" if self.kv_type != "q8" else "")
        return MemoryLimitError(f"{name}: {self.line()}; {smaller} needs less "
                                f"({LIMIT_ENV} overrides the available figure)")


def check_kv_type(kv_type: str) -> str:
    if kv_type not in KV_TYPES:
        raise ValueError(f"unknown KV cache type {kv_type!r} (known: {', '.join(KV_TYPES)})")
    return kv_type


def kv_cache_bytes(config: ModelConfig, positions: int, kv_type: str) -> int:
    """Bytes of the keys and values of `positions` positions: what model.KVCache allocates."""
    row = config.head_dim * KV_ELEMENT_BYTES[check_kv_type(kv_type)] + (Q8_SCALE_BYTES if kv_type == "q8" else 0)
    return 2 * config.n_layers * positions * config.n_kv_heads * row


def available() -> tuple[int | None, str]:
    """Bytes this process may use and where the figure comes from."""
    limit = os.environ.get(LIMIT_ENV)
    if limit is not None:
        try:
            return int(float(limit) * MIB), LIMIT_ENV
        except ValueError:
            raise ModelError(f"{LIMIT_ENV}={limit!r} is not a number of MiB") from None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    return None, "unknown"


def estimate(config: ModelConfig, weights: int, max_context: int | None, kv_type: str, qfile=None) -> Estimate:
    from .model import _context

    positions = _context(config, max_context)
    return Estimate(weights, kv_cache_bytes(config, positions, kv_type), kv_type, positions, *available(), qfile)


def for_model(name_or_path: str | None, max_context: int | None, kv_type: str, dense: bool = False
              ) -> Estimate | None:
    """The estimate for what engine.load would run, from file headers only; None for a catalog
    model not yet pulled (nothing on disk tells its shapes)."""
    from .load import cached_qfile, converted_qfile, is_qfile

    name = name_or_path or catalog.DEFAULT
    path = Path(name).expanduser()
    if path.exists():
        if not dense and not is_qfile(path):
            converted = converted_qfile(path)
            path = converted if converted.exists() else path
    elif name in catalog.CATALOG:
        path = cached_qfile(name)
        if dense or not path.exists():
            path = catalog.model_path(name)
        if not path.exists():
            return None
    else:
        return None  # the loader names what is missing
    if is_qfile(path):
        from models import qfile

        q = qfile.load(path)
        return estimate(q.config, path.stat().st_size, max_context, kv_type, q)
    from .info import parameters

    config = source_config(path)
    weights = 4 * parameters(config) if dense else _bytes(path)
    return estimate(config, weights, max_context, kv_type)


def check(name_or_path: str | None, max_context: int | None, kv_type: str, dense: bool = False
          ) -> Estimate | None:
    """for_model, refusing with MemoryLimitError when it will not fit."""
    est = for_model(name_or_path, max_context, kv_type, dense)
    if est is not None and not est.fits:
        raise est.refusal(name_or_path or catalog.DEFAULT)
    return est


def source_config(path: Path) -> ModelConfig:
    """The config of a GGUF file or HF folder, from its header or config.json."""
    from models.config import check_architecture

    if path.is_dir():
        from models.hf_loader import hf_config, read_json

        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json")
        cfg = read_json(path / "config.json")
        return hf_config(cfg, path / "config.json")
    from models.gguf_loader import gguf_config, read_gguf

    md, raw = read_gguf(path)
    arch = md.get("general.architecture")
    check_architecture(arch, path)
    return gguf_config(md, raw, arch, path)


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir() if p.is_file())
