"""bench/error_scale: moving a quantized file's layers back (a = 0) gives the source model (up to
the file's head and embedding), a = 1 the file's own weights; files it cannot move back are refused."""
import subprocess
import sys

import numpy as np
import pytest

import lutkernels as lk
from bench import error_scale
from engine.model import Transformer
from models import qfile
from models.load import open_source
from test_cli import ROOT, cli
from tiny_models import write_hf


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny source and its rotated 3-bit rtn file."""
    folder = write_hf(tmp_path_factory.mktemp("hf"), "qwen2")
    out = tmp_path_factory.mktemp("q") / "m.lut.safetensors"
    proc = cli("quantize", folder, "-o", out, "--method", "rtn", "--bits", "3", "--group", "32", "--rotate")
    assert proc.returncode == 0, proc.stderr
    return open_source(folder, progress=False), out


def _logits(config, weights, ids):
    return Transformer(config, weights, 64).forward(ids, 0, all_logits=True)


def test_zero_is_the_source_and_one_the_file(made):
    src, path = made
    qf = qfile.load(path)
    start = error_scale.start_weights(qf, src)
    ids = np.arange(3, 40) % src.config.vocab
    dense = _logits(src.config, src.tensors, ids)
    err = {a: np.abs(_logits(qf.config, error_scale.scaled(qf, start, a), ids) - dense).mean() for a in (0, 0.5, 1)}
    # at 0 only the file's 8-bit head and float16 embedding remain: 0.0065 against 0.43 on this tiny model
    assert err[0] < 0.05 * err[1] and err[0] < err[0.5] < err[1], err
    one, half = (error_scale.scaled(qf, start, a) for a in (1.0, 0.5))
    for name, p in qf.packed.items():
        if name.startswith("model.layers."):
            np.testing.assert_allclose(one[name], lk.dense(p), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(half[name], (lk.dense(p) + start[name]) / 2, rtol=1e-5, atol=1e-6)


def test_another_source_or_tuned_gains_are_refused(made):
    src, path = made
    qf = qfile.load(path)
    other = qfile.QFile(qf.path, qf.config, qf.packed, qf.tensors, {**qf.meta, "source": {"sha256": "0" * 64}})
    with pytest.raises(ValueError, match="quantized from None \\(sha256 0000"):
        error_scale.start_weights(other, src)
    tuned = qfile.QFile(qf.path, qf.config, qf.packed, qf.tensors,
                        {**qf.meta, "quantizer": {**qf.meta["quantizer"], "tune": 2}})
    with pytest.raises(ValueError, match="block tuning changed its norm gains"):
        error_scale.start_weights(tuned, src)


def test_command_prints_one_row_per_scale(made, tmp_path):
    src, path = made
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran " * 20)
    proc = error_scale_cli(path, src.path, "--text", text, "--alpha", "1", "0", "--ctx", 32, "--windows", 4)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "0"]
    assert all(float(r.split("|")[3]) > 1 for r in rows)
    for bad in (error_scale_cli(tmp_path / "missing.safetensors", src.path),
                error_scale_cli(path, src.path, "--text", text, "--ctx", 512)):  # too short a text
        assert bad.returncode != 0 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def error_scale_cli(*args):
    return subprocess.run([sys.executable, "-m", "bench.error_scale", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
