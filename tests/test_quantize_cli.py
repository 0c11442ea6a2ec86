"""`lutengine quantize` in a subprocess, on tiny random models written by the tests."""
import json

import numpy as np
import pytest

import lutkernels as lk
from engine.quant import rotate, settings
from models import qfile
from models.load import open_source
from test_cli import cli, one_line_error
from tiny_models import write_gguf, write_hf

CALIB = ["--n-calib", 8, "--calib-len", 64]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "llama")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_hf(tmp_path_factory.mktemp("hf"), "qwen2")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A calibration text of a few thousand tokens (the tiny tokenizer is nearly byte level)."""
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(words, 3000)))
    return path


def quantize(src, out, *args):
    return cli("quantize", src, "-o", out, *args, timeout=300)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("method", [["--method", "rtn"], ["--method", "hlq", "--bits", "3"],
                                    ["--method", "gptq", "--grid", "hlq", "--bits", "2", "--act-order"],
                                    ["--method", "gptq", "--grid", "rtn", "--bits", "3", "--group", "64"],
                                    ["--method", "gptq", "--grid", "rtn", "--bits", "2", "--tune", "2"],
                                    ["--method", "gptq", "--grid", "rtn", "--bits", "3", "--no-rotate"],
                                    ["--method", "rtn", "--bits", "3", "--rotate"],
                                    ["--method", "gptq", "--grid", "msb", "--bits", "3"],
                                    ["--method", "gptq", "--grid", "trellis", "--bits", "2"],
                                    ["--method", "rtn", "--grid", "int", "--bits", "5",
                                     "--layer", "*.mlp.down_proj.weight=4/32:rtn"],
                                    ["--method", "msb", "--bits", "2"], ["--method", "binary", "--bits", "2"],
                                    ["--method", "ternary", "--bits", "2"]])
def test_quantize_writes_a_runnable_file_with_a_layer_summary(gguf, text, tmp_path, method):
    out = tmp_path / "m.lut.safetensors"
    calib_args = ["--calib", text, *CALIB] if "gptq" in method else []
    if "--no-rotate" in method:  # gptq calibrating on text the model samples itself
        calib_args = CALIB
    proc = quantize(gguf, out, *method, *calib_args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    layer_lines = [ln for ln in lines if ln.startswith("layer")]
    assert len(layer_lines) == 2  # the tiny model's layers
    assert all(("output err" if calib_args else "weight err") in ln and "bpw" in ln for ln in layer_lines)
    assert all(("tuned block err" in ln) is ("--tune" in method) for ln in layer_lines)
    assert ("sampling calibration text" in proc.stderr) is ("--calib" not in calib_args and "gptq" in method)
    assert lines[-1].startswith(f"wrote {out}: {out.stat().st_size:,} bytes")
    assert "layer" in proc.stderr  # the progress bar
    assert leftovers(tmp_path) == [out.name]
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["quantization"]["method"] == method[1]
    assert info["quantization"]["rotate"] == ("--rotate" in method or ("gptq" in method and "--no-rotate" not in method))
    assert info["bpw_linear"] > 0
    gen = cli("generate", "-m", out, "-p", "the weather", "-n", 4, "--temp", 0, "--ignore-eos", "-t", 1)
    assert gen.returncode == 0, gen.stderr


def test_the_file_records_the_settings_and_each_layers_method(hf, text, tmp_path):
    out = tmp_path / "m.lut.safetensors"
    args = ["--method", "gptq", "--grid", "hlq", "--bits", "2", "--calib", text, *CALIB,
            "--layer", "*.mlp.down_proj.weight=3/64"]
    proc = quantize(hf, out, *args)
    assert proc.returncode == 0, proc.stderr
    q = qfile.load(out)
    assert q.meta["quantizer"] == settings({"method": "gptq", "grid": "hlq", "bits": 2, "calib": str(text),
                                            "n_calib": 8, "calib_len": 64,
                                            "layers": {"*.mlp.down_proj.weight": {"bits": 3, "group": 64}}})
    assert q.meta["quantizer"]["rotate"] is True  # gptq's default: the layers are the rotated model's
    src = open_source(hf)
    rotated = rotate.rotate(src.config, src.tensors)
    for name, t in q.meta["tensors"].items():
        down = name.endswith("down_proj.weight")
        if name == "lm_head.weight":
            assert (t["method"], t["bits"]) == ("rtn", 8)
            continue
        assert (t["method"], t["bits"], t["group"]) == ("gptq+hlq", 3 if down else 2, 64 if down else 32)
        W, Wq = rotated[name], lk.dense(q.packed[name])
        assert np.linalg.norm(Wq - W) < 0.8 * np.linalg.norm(W)  # 2-3 bits; gptq trades weight for output error


@pytest.mark.parametrize("args, scale_bits", [([], 8), (["--scale-bits", "16"], 16), (["--bits", "8"], 16)])
def test_scale_bits_flag_and_default(gguf, tmp_path, args, scale_bits):
    """rtn up to 4 bits stores 8-bit scales unless told otherwise: 4 + 16/G bits instead of 4 + 32/G."""
    out = tmp_path / "m.lut.safetensors"
    proc = quantize(gguf, out, "--group", "32", *args)
    assert proc.returncode == 0, proc.stderr
    q = qfile.load(out)
    assert q.meta["quantizer"]["scale_bits"] == scale_bits
    bits = 8 if "--bits" in args else 4
    for name, t in q.meta["tensors"].items():
        if name != "lm_head.weight":
            assert t["scale_bits"] == scale_bits and q.packed[name].scale8 is (scale_bits == 8)
            assert t["bpw"] == pytest.approx((bits + 2 * scale_bits / 32) * q.packed[name].tiles * 16 / t["M"])


@pytest.mark.parametrize("args, words", [
    (["--method", "awq"], ["unknown quantization method 'awq'"]),
    (["--bits", "9"], ["bits must be an integer 1..8"]),
    (["--group", "96"], ["group size 96 fits no matrix"]),
    (["--group", "16"], ["group must be an integer of at least 32"]),
    (["--method", "gptq", "--calib-len", "1024"], ["exceed the model's context"]),
    (["--method", "gptq", "--calib", "MISSING"], ["cannot read the calibration text"]),
    (["--method", "gptq", "--calib", "DIR"], ["cannot read the calibration text"]),
    (["--method", "gptq", "--calib", "TEXT", "--n-calib", "1000"], ["calibration sequences of 64 need"]),
    (["--method", "gptq", "--calib", "TEXT", "--calib-len", "1024"], ["exceed the model's context"]),
    (["--layer", "*.mlp.dwn_proj.weight=3"], ["matches no linear layer"]),
    (["--method", "rtn", "--tune", "2"], ["tune is a gptq setting"]),
    (["--method", "gptq", "--tune", "-1"], ["tune must be an integer of at least 0"]),
    (["--layer", "*.mlp.down_proj.weight"], ["expected GLOB=BITS"]),
    (["--grid", "int", "--symmetric"], ["the integer grid takes", "symmetric by itself"]),
    (["-o", "NOFOLDER"], ["cannot write", "no folder"]),
    (["-o", "UNDERFILE"], ["cannot write", "no folder"]),
    (["-o", "NOSUFFIX"], ["must end in .safetensors"]),
])
def test_bad_input_is_a_one_line_error_and_leaves_no_file(gguf, text, tmp_path, args, words):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    where = {"MISSING": tmp_path / "missing.txt", "DIR": tmp_path / "folder", "TEXT": text,
             "NOFOLDER": tmp_path / "no" / "m.safetensors", "UNDERFILE": tmp_path / "afile" / "m.safetensors",
             "NOSUFFIX": tmp_path / "m.bin"}
    args = [where.get(a, a) for a in args]
    out = tmp_path / "m.lut.safetensors"
    proc = cli("quantize", gguf, *([] if "-o" in args else ["-o", out]), *(CALIB if "--calib" in args else []), *args)
    one_line_error(proc, *words)
    assert leftovers(tmp_path) == ["afile", "folder"]


def test_unknown_source_is_a_one_line_error(tmp_path):
    one_line_error(quantize(tmp_path / "nothing.gguf", tmp_path / "m.safetensors"), "no such model")
    assert leftovers(tmp_path) == []


def test_help_lists_the_quantize_options():
    proc = cli("quantize", "--help")
    assert proc.returncode == 0
    for opt in ("--method", "--grid", "--bits", "--group", "--calib", "--n-calib", "--calib-len", "--act-order",
                "--rotate", "--layer", "--head-bits", "--symmetric", "--tune"):
        assert opt in proc.stdout


@pytest.mark.parametrize("calib", ["text", "sampled", "none"])
def test_bpw_budget_is_never_exceeded(gguf, text, tmp_path, calib):
    """gptq on a text or on text the model samples itself; --method rtn plans without calibration."""
    out = tmp_path / "m.lut.safetensors"
    calib_args = {"text": ["--calib", text, *CALIB], "sampled": CALIB, "none": ["--method", "rtn"]}[calib]
    proc = quantize(gguf, out, "--bpw", "2.6", *calib_args)
    assert proc.returncode == 0, proc.stderr
    assert ("sampled from the model itself" in proc.stdout) is (calib == "sampled")
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["bpw_linear"] <= 2.6
    assert info["quantization"]["bpw"] == 2.6
    assert info["quantization"]["method"] == ("rtn" if calib == "none" else "gptq")
    assert info["quantization"]["act_order"] is (calib != "none")  # gptq's default under a budget


def test_layer_overrides_parse_bits_group_and_grid():
    from engine.quantize_cmd import parse_layers

    assert parse_layers(["*.v_proj.weight=8/32:int", "*down*=4", "*up*=3:rtn"]) == {
        "*.v_proj.weight": {"bits": 8, "group": 32, "grid": "int"}, "*down*": {"bits": 4},
        "*up*": {"bits": 3, "grid": "rtn"}}
    with pytest.raises(ValueError, match="expected GLOB=BITS"):
        parse_layers(["*down*=four:int"])
