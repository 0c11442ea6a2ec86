"""The `lutengine` command line in a subprocess, on tiny random models written by the tests."""
import json
import os
import subprocess
import sys

import pytest

from tiny_models import write_gguf, write_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, stdin=None, home=None, timeout=120):
    env = {**os.environ, "LUTENGINE_HOME": str(home)} if home else None
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lutengine: error:"), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_hf(tmp_path_factory.mktemp("hf"), "qwen2")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "llama")


@pytest.mark.parametrize("dense", [False, True])
def test_generate_prints_the_requested_number_of_tokens(hf, dense):
    from engine.load import load

    args = ["generate", "-m", hf, "-p", "the weather", "-n", 12, "--temp", 0, "--ignore-eos", "-t", 1]
    proc = cli(*args, *(["--dense"] if dense else []))
    assert proc.returncode == 0, proc.stderr
    assert "generation: 12 tokens" in proc.stderr and "tok/s" in proc.stderr
    want = load(str(hf), dense=dense).generate("the weather", 12, temperature=0, ignore_eos=True)
    assert proc.stdout == want + "\n"


def test_inference_does_not_import_numba(tmp_path, gguf):
    """numba (the quantizer loops, ~0.5 s to import) stays off the path of chat and generate,
    here with a quantization on load; `quantize --method hlq` does load it."""
    def imports(*args):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "engine", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}

    assert "numba" not in imports("generate", "-m", gguf, "-p", "in the", "-n", 2, "-t", 1)
    assert "numba" in imports("quantize", gguf, "-o", tmp_path / "q.safetensors", "--method", "hlq", "--bits", 2)


def test_seeded_sampling_is_reproducible(gguf):
    run = lambda seed: cli("generate", "-m", gguf, "-p", "in the", "-n", 16, "--seed", seed, "--ignore-eos",
                           "--top-k", 0, "--top-p", 1, "--min-p", 0, "--temp", 1.5)
    a, b, c = run(3), run(3), run(4)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_chat_answers_two_turns_through_stdin_and_exits(gguf):
    proc = cli("chat", "-m", gguf, "-n", 8, "--temp", 0, stdin="hello there\nand again\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("generation:") == 2, proc.stderr


def test_chat_reset_and_exit_commands(gguf):
    proc = cli("chat", "-m", gguf, "-n", 4, "--temp", 0, stdin="hi\n/reset\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    assert "conversation reset" in proc.stderr and proc.stderr.count("generation:") == 1


def test_tokenize_json_matches_the_tokenizer(gguf):
    from engine.load import load_tokenizer

    proc = cli("tokenize", "-m", gguf, "-p", "the theme <|im_start|>", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == load_tokenizer(str(gguf)).encode("the theme <|im_start|>")


def test_info_reports_stored_bits(gguf):
    proc = cli("info", gguf, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "llama" and info["bpw_linear"] == 32.0 and info["format"] == "gguf"


def test_ppl_scores_windows_times_ctx_minus_one(hf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the weather in the north is rather fine. " * 40)
    proc = cli("ppl", hf, "--text", text, "--ctx", 32, "--windows", 4, "--json", "--dense")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["n_scored"] == 4 * 31 and r["ppl"] > 1


def test_over_long_prompt_is_a_clear_error(hf):
    one_line_error(cli("generate", "-m", hf, "-p", "the " * 300, "-c", 64), "does not fit the context")


def test_invalid_utf8_prompt_file_is_a_clear_error(hf, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    one_line_error(cli("generate", "-m", hf, "--file", bad), str(bad), "UTF-8")


def test_unknown_catalog_name_is_a_clear_error(tmp_path):
    one_line_error(cli("generate", "-m", "no-such-model", "-p", "x", home=tmp_path), "no-such-model")


def test_truncated_gguf_is_a_clear_error(gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[:5000])
    one_line_error(cli("generate", "-m", cut, "-p", "x"), str(cut))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    folder = write_hf(tmp_path / "m", "llama")
    (folder / "tokenizer.json").unlink()
    one_line_error(cli("generate", "-m", folder, "-p", "x"), "tokenizer.json")
