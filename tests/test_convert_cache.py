"""A GGUF file or HF folder is converted to the default format once and cached (engine/load.py)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine.quant
from engine.load import converted_qfile, load
from engine.memory import DEFAULT_KV_TYPE
from engine.model import Transformer
from models import qfile
from models.config import ModelError
from models.load import open_source
from tiny_models import write_gguf, write_hf

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [1, 70, 101, 32, 200, 5, 9]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "converted"
    monkeypatch.setenv("LUTENGINE_CONVERTED", str(d))
    return d


@pytest.fixture
def saves(monkeypatch):
    """Every conversion this process makes, by the file it wrote."""
    made, real = [], qfile.save

    def save(path, src, quant=None):
        made.append(Path(path))
        return real(path, src, quant)

    monkeypatch.setattr(qfile, "save", save)
    return made


def source(tmp_path, kind):
    if kind == "gguf":
        return write_gguf(tmp_path / "m.gguf", "llama", qtype="Q8_0")
    return write_hf(tmp_path / "hf", "qwen2")


def logits(model) -> np.ndarray:
    model.reset()
    return model.forward(TOKENS, 0, all_logits=True).copy()


def in_memory(path) -> np.ndarray:
    """The path loads took before the cache: quantized in memory from the source."""
    return logits(Transformer.from_source(open_source(path), {}, kv_type=DEFAULT_KV_TYPE))


def touch(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_second_load_converts_nothing_and_equals_the_in_memory_path(tmp_path, cache, saves, capsys, kind):
    src = source(tmp_path, kind)
    first = load(str(src))
    err = capsys.readouterr().err
    q = converted_qfile(src)
    assert saves == [q] and first.info["path"] == str(q) and q.parent == cache
    assert err.count("\n") == 1 and f"converting {src} to the default format" in err and f"cached at {q}" in err
    mtime = q.stat().st_mtime_ns

    second = load(str(src))
    assert saves == [q] and q.stat().st_mtime_ns == mtime  # mapped, not made again
    assert capsys.readouterr().err == ""
    want = in_memory(src)
    assert np.array_equal(logits(first.transformer), want)
    assert np.array_equal(logits(second.transformer), want)
    assert second.tokenizer.encode("the weather") == load(str(src), dense=True).tokenizer.encode("the weather")


def test_a_cached_start_reads_the_header_and_the_source_key_once(tmp_path, cache, monkeypatch, capsys):
    """generate's memory check opens the converted file; the load that follows runs that one."""
    from engine.cli import main

    loader = sys.modules["engine.load"]  # engine.load is the function engine/__init__.py exports

    src = source(tmp_path, "gguf")
    want = load(str(src)).generate("Hi", 4, temperature=0)
    calls = {"load": 0, "source_key": 0}

    def counted(name, real):
        def f(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return f

    monkeypatch.setattr(qfile, "load", counted("load", qfile.load))
    monkeypatch.setattr(loader, "source_key", counted("source_key", loader.source_key))
    capsys.readouterr()
    assert main(["generate", "-m", str(src), "-p", "Hi", "-n", "4", "--temp", "0"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert calls == {"load": 1, "source_key": 1}


def test_dense_reads_the_source_and_converts_nothing(tmp_path, cache, saves):
    src = source(tmp_path, "gguf")
    assert load(str(src), dense=True).info["format"] == "gguf"
    assert saves == [] and not cache.exists()


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_touched_source_converts_again_and_replaces_the_old_file(tmp_path, cache, saves, kind):
    src = source(tmp_path, kind)
    load(str(src))
    touch(src / "config.json" if kind == "hf" else src)
    load(str(src))
    assert len(saves) == 2 and saves[0] != saves[1]
    assert sorted(cache.glob("*.safetensors")) == [saves[1]]  # the stale conversion is gone


def test_changed_header_with_the_same_size_and_mtime_converts_again(tmp_path, cache):
    src = source(tmp_path, "gguf")
    before, st, data = converted_qfile(src), src.stat(), bytearray(src.read_bytes())

    def rewrite():
        src.write_bytes(bytes(data))
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))

    rewrite()
    assert converted_qfile(src) == before  # the same bytes and stat: the same key
    data[data.index(b"smollm")] = ord("S")  # a metadata string (the tokenizer's pre) changed in place
    rewrite()
    assert src.stat().st_size == st.st_size and converted_qfile(src) != before


def test_a_new_quantizer_version_converts_again(tmp_path, cache, saves, monkeypatch):
    src = source(tmp_path, "gguf")
    load(str(src))
    monkeypatch.setattr(engine.quant, "QUANTIZER_VERSION", engine.quant.QUANTIZER_VERSION + 1)
    load(str(src))
    assert len(saves) == 2 and saves[0] != saves[1]


def test_only_stale_conversions_are_pruned(tmp_path, cache, saves):
    """Only conversions of the same source path, or of a source that is gone, are removed."""
    a, b = write_gguf(tmp_path / "a.gguf", "llama"), write_gguf(tmp_path / "b.gguf", "llama", seed=1)
    load(str(a))
    load(str(b))
    assert sorted(cache.glob("*.safetensors")) == sorted(saves)
    mine = cache / "mine-0123456789abcdef.lut.safetensors"  # a user's file, not named as a conversion
    mine.write_bytes(saves[1].read_bytes())
    b.unlink()
    touch(a)
    load(str(a))
    assert sorted(cache.glob("*.safetensors")) == sorted([saves[2], mine])
    assert sorted(p.name for p in cache.glob(".*.lock")) == [f".{saves[2].name}.lock"]


def test_unreadable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    src = source(tmp_path, "gguf")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("LUTENGINE_CONVERTED", str(blocker / "converted"))
    with pytest.raises(ModelError, match=f"cannot write {blocker}"):
        load(str(src))


CHILD = """
import hashlib, os, sys, time
sys.path.insert(0, {tests!r})
from engine.load import load
print("ready", flush=True)
while not os.path.exists({go!r}):
    time.sleep(0.001)
m = load({src!r})
print(hashlib.sha256(m.transformer.forward({tokens!r}, 0, all_logits=True).tobytes()).hexdigest(), flush=True)
"""


def test_two_processes_loading_at_once_make_one_file(tmp_path, cache):
    # large enough that the conversion takes a while, so the second process finds it under way
    src = write_gguf(tmp_path / "m.gguf", "llama", qtype="Q8_0", hidden=256, ffn=1024, n_layers=4)
    go = tmp_path / "go"
    code = CHILD.format(tests=str(ROOT / "tests"), go=str(go), src=str(src), tokens=TOKENS)
    env = {**os.environ, "LUTENGINE_CONVERTED": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    go.write_bytes(b"")
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(err.count("converting ") for _, err in outs) == 1, outs
    assert len({out for out, _ in outs}) == 1
    files = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert files == [converted_qfile(src).name]
    want = hashlib.sha256(np.ascontiguousarray(in_memory(src), np.float32).tobytes()).hexdigest()
    assert outs[0][0].strip() == want


# ---- bounded memory (29.1): a lazy source is converted a tensor at a time -----------------------

@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen2", "F16")])
def test_a_lazy_gguf_reads_as_the_eager_one(tmp_path, arch, qtype):
    path = write_gguf(tmp_path / "m.gguf", arch, qtype=qtype)
    eager, lazy = open_source(path), open_source(path, lazy=True)
    assert list(lazy.tensors) == list(eager.tensors) and len(lazy.tensors) == len(eager.tensors)
    for name, a in eager.tensors.items():
        assert np.array_equal(lazy.tensors[name], a) and lazy.tensors[name].dtype == np.float32, name


def test_a_lazy_hf_folder_reads_as_the_eager_one(tmp_path):
    path = write_hf(tmp_path / "hf", "qwen2", dtype="bfloat16")
    eager, lazy = open_source(path), open_source(path, lazy=True)
    assert list(lazy.tensors) == list(eager.tensors)
    assert all(np.array_equal(lazy.tensors[n], a) for n, a in eager.tensors.items())


def test_lazy_tensors_keep_what_is_assigned(tmp_path):
    lazy = open_source(write_gguf(tmp_path / "m.gguf", "llama"), lazy=True).tensors
    name = "model.norm.weight"
    lazy[name] = np.zeros(3, np.float32)
    assert lazy[name].tolist() == [0, 0, 0]
    del lazy[name]
    assert name not in lazy
    with pytest.raises(KeyError):
        lazy[name]


def test_a_lazy_file_quantizes_to_the_same_bytes(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", qtype="Q8_0")
    eager = qfile.save(tmp_path / "eager.lut.safetensors", open_source(path))
    lazy = qfile.save(tmp_path / "lazy.lut.safetensors", open_source(path, lazy=True))
    assert lazy.read_bytes() == eager.read_bytes()


def _rss_file() -> int:
    """Resident file-backed pages of this process, bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_a_converted_tensor_lets_its_source_pages_go(tmp_path):
    """Resident pages of a read-only map count in RSS: drop_pages gives back those of a tensor that
    has been converted (a conversion holds one source tensor's pages, not the whole file's), the
    data reads back the same, and a private writable map keeps its changes."""
    import mmap

    from models.source import drop_pages

    f = tmp_path / "blob"
    f.write_bytes(np.arange(16 << 20, dtype=np.float32).tobytes())  # 64 MiB
    with open(f, "rb") as fh:
        ro = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(ro, np.float32, 8 << 20, 4 << 20)  # 32 MiB from an offset inside a page run
    total = float(view.sum(dtype=np.float64))
    held = _rss_file()
    drop_pages(view)
    assert held - _rss_file() > 24 << 20
    assert float(view.sum(dtype=np.float64)) == total
    with open(f, "r+b") as fh:
        cow = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    mine = np.frombuffer(cow, np.float32)
    mine[:4] = -1.0
    drop_pages(mine)
    assert (mine[:4] == -1.0).all()
    drop_pages(np.ones(1 << 20, np.float32))  # memory of its own: nothing to do, no error
    del view, mine
    ro.close()
    cow.close()


def test_an_unsupported_tensor_type_fails_at_a_lazy_load(tmp_path):
    import gguf

    from models import gguf_loader

    path = write_gguf(tmp_path / "m.gguf", "llama", qtype="Q8_0")
    real = gguf_loader.dequantize

    def no_q8(data, qtype):
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            raise NotImplementedError
        return real(data, qtype)

    gguf_loader.dequantize = no_q8
    try:
        with pytest.raises(ModelError, match="unsupported type Q8_0"):
            open_source(path, lazy=True)
    finally:
        gguf_loader.dequantize = real


MEMORY_CHILD = """
import os, resource, sys
sys.path.insert(0, {tests!r})
from models import qfile
from models.load import open_source
from tiny_models import write_gguf
lazy = {lazy!r}
# every import, and the thread pools' first use, before the limit: it bounds the conversion alone
qfile.save({warm!r} + ".lut.safetensors", open_source(write_gguf({warm!r} + ".gguf", "llama"), lazy=lazy))
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + {budget}, resource.RLIM_INFINITY))
try:
    qfile.save({out!r}, open_source({src!r}, lazy=lazy))
except BaseException as e:
    print(type(e).__name__, flush=True)
    os._exit(3)
print("ok", flush=True)
"""
BIG = dict(hidden=256, ffn=1024, n_layers=40)  # 39M weights: float32 157 MB, Q8_0 42 MB, the file 21 MB
BUDGET = 110 << 20  # over the warm process, measured: lazy needs 40-50 MB of address space (the map), eager 175


@pytest.mark.slow
def test_conversion_fits_a_memory_limit_the_float32_model_would_exceed(tmp_path):
    src = write_gguf(tmp_path / "big.gguf", "llama", qtype="Q8_0", **BIG)
    floats = sum(np.prod(s) for s in tiny_config_shapes(BIG)) * 4
    assert floats > BUDGET + (20 << 20)  # the float32 model alone would not fit

    def convert(lazy: bool) -> tuple[int, str, Path]:
        out = tmp_path / f"{'lazy' if lazy else 'eager'}.lut.safetensors"
        code = MEMORY_CHILD.format(tests=str(ROOT / "tests"), lazy=lazy, warm=str(tmp_path / f"warm{lazy}"),
                                   budget=BUDGET, out=str(out), src=str(src))
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "MALLOC_ARENA_MAX": "2"})  # glibc's per-thread arenas are address space
        return p.returncode, p.stdout + p.stderr, out

    code, said, lazy = convert(True)
    assert code == 0 and said.strip() == "ok", said
    code, said, _ = convert(False)
    assert code == 3 and said.strip() == "MemoryError", said  # the limit binds: the eager load does not fit
    whole = qfile.save(tmp_path / "whole.lut.safetensors", open_source(src))  # no limit in this process
    assert lazy.read_bytes() == whole.read_bytes()


def tiny_config_shapes(dims):
    from tiny_models import tiny_config

    return tiny_config("llama", **dims).expected_shapes().values()
