"""`lutengine bench` on a tiny model: the JSON and markdown outputs, bad arguments, and the
llama.cpp comparison driven through a stand-in llama_cpp module (llama-cpp-python is not a
test dependency), so the worker protocol, the alternation and the ratios are exercised."""
import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

from tiny_models import write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"model", "engine", "format", "bpw", "bpw_head", "size_bytes", "threads", "test", "n", "tok_s_mean",
          "tok_s_sd", "tok_s_median", "runs_tok_s", "peak_rss_bytes", "other_cores_max", "steal_pct_max"}

# Enough of llama-cpp-python's surface for engine/llamacpp_peer.py: each eval sleeps 1 ms a token.
FAKE_LLAMA_CPP = '''
import ctypes, time
__version__ = "0.0-fake"
_logits = (ctypes.c_float * 8)(*range(8))

def llama_print_system_info():
    return b"FAKE = 1"

def llama_get_logits_ith(ctx, i):
    return ctypes.cast(_logits, ctypes.POINTER(ctypes.c_float))

class _Ctx:
    ctx = None

class Llama:
    def __init__(self, model_path, **kw):
        self._ctx = _Ctx()
    def n_vocab(self):
        return 8
    def reset(self):
        pass
    def eval(self, ids):
        time.sleep(0.001 * len(ids))
'''


def bench(tmp_path, *args, env=None):
    env = {**os.environ, "LUTENGINE_HOME": str(tmp_path / "home"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_gguf(tmp_path_factory.mktemp("bench") / "tiny.gguf", "llama"))


def test_json_has_every_row_and_field(tiny, tmp_path):
    proc = bench(tmp_path, "-m", tiny, "-p", "16,32", "-n", "8", "-t", "1,2", "-r", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["rows"]
    assert [(r["threads"], r["test"]) for r in rows] == [(t, k) for t in (1, 2) for k in ("pp16", "pp32", "tg8")]
    for r in rows:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["engine"] == "lutengine" and r["format"] == "rtn4g32s8" and 4 < r["bpw"] < 5
        assert len(r["runs_tok_s"]) == 3 and r["tok_s_mean"] == pytest.approx(statistics.fmean(r["runs_tok_s"]))
        assert r["tok_s_sd"] == pytest.approx(statistics.stdev(r["runs_tok_s"]))
        assert r["peak_rss_bytes"] > 10 * 2**20 and r["size_bytes"] > 0
    assert result["machine"]["isa"] in result["machine"]["isa_supported"]
    assert "run 3/3" in proc.stderr  # progress goes to stderr, not into the JSON
    assert "--vs-llama-cpp" in proc.stderr  # says how to get the comparison


def test_markdown_table(tiny, tmp_path):
    proc = bench(tmp_path, "-m", tiny, "-p", "16", "-n", "0", "-t", "1", "-r", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| model | format | bpw | size | threads | test | tok/s | peak RSS |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == tiny and cells[1] == "rtn4g32s8" and cells[4] == "1" and cells[5] == "pp16"
    assert " ± " in cells[6] and cells[7].endswith("MiB")
    assert len([x for x in lines if x.startswith("| ")]) == 2  # header and one row


@pytest.mark.parametrize("args, error", [
    (["-p", "128,abc"], "-p takes a comma-separated list of integers >= 0, got '128,abc'"),
    (["-p", "-5"], "-p takes a comma-separated list of integers >= 0, got '-5'"),
    (["-t", "0"], "-t takes a comma-separated list of integers >= 1, got '0'"),
    (["-t", "1,,2"], "-t takes a comma-separated list of integers >= 1, got '1,,2'"),
    (["-r", "0"], "-r takes an integer >= 1, got 0"),
    (["-p", "0", "-n", "0"], "nothing to run: -p and -n are both 0"),
    (["--vs-llama-cpp", "/nonexistent.gguf"], "/nonexistent.gguf: no such GGUF file (--vs-llama-cpp)"),
])
def test_bad_arguments_are_one_line_errors(tiny, tmp_path, args, error):
    proc = bench(tmp_path, "-m", tiny, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lutengine: error: {error}"


def test_without_llama_cpp_it_says_how_to_get_it(tiny, tmp_path):
    proc = bench(tmp_path, "-m", tiny, "--vs-llama-cpp", tiny, "--llama-python", "/bin/false")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("lutengine: error: --vs-llama-cpp needs llama-cpp-python, which /bin/false "
                                   "cannot import: pip install llama-cpp-python (into this venv, or into another "
                                   "and pass its python with --llama-python PATH)")


def test_versus_llama_cpp_alternates_and_reports_ratios(tiny, tmp_path):
    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(textwrap.dedent(FAKE_LLAMA_CPP))
    env = {"PYTHONPATH": str(fake)}
    # 3 runs: with 2 the median is the mean, and a ratio of means would pass for one of medians
    proc = bench(tmp_path, "-m", tiny, "-p", "16", "-n", "4", "-t", "1", "-r", "3", "--json",
                 "--vs-llama-cpp", tiny, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["rows"]
    assert [(r["engine"], r["test"]) for r in rows] == [("lutengine", "pp16"), ("llama.cpp", "pp16"),
                                                        ("lutengine", "tg4"), ("llama.cpp", "tg4")]
    assert result["llama_cpp"]["version"] == "0.0-fake"
    for ours, peer in (rows[:2], rows[2:]):
        assert peer["format"] == "ALL_F32" and peer["bpw"] == pytest.approx(32.0)
        assert ours["vs_llama_cpp"]["ALL_F32"] == pytest.approx(ours["tok_s_median"] / peer["tok_s_median"])
        # the stand-in sleeps 1 ms a token: its rate cannot exceed 1000 tok/s
        assert peer["tok_s_median"] < 1000 and peer["peak_rss_bytes"] > 0
    # runs alternate: the progress lines switch engines within each test
    engines = [ln.split()[2] for ln in proc.stderr.splitlines() if " run " in ln and ln.startswith("bench: ")]
    assert engines == ["lutengine", "llama.cpp"] * 2 + ["llama.cpp", "lutengine"] * 2 + ["lutengine", "llama.cpp"] * 2
    md = bench(tmp_path, "-m", tiny, "-p", "16", "-n", "0", "-t", "1", "-r", "1", "--vs-llama-cpp", tiny, env=env)
    assert md.returncode == 0, md.stderr
    assert md.stdout.splitlines()[0].endswith("| peak RSS | ours / llama.cpp ALL_F32 |")
    assert "llama.cpp ALL_F32" in md.stdout and "llama-cpp-python 0.0-fake" in md.stdout
