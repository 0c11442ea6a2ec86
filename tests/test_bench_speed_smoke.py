"""Smoke test of the end-to-end speed benchmark on a tiny random model, our engine only (no llama.cpp):
`python -m bench.speed --model tiny.gguf --quick --no-peer --no-write` runs and prints its table."""
import os
import subprocess
import sys

from tiny_models import write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["engine / format", "bpw linear", "threads", "tg128 tok/s", "pp128 tok/s", "pp512 tok/s",
           "tg128 ours/peer", "pp128 ours/peer", "pp512 ours/peer", "MB read/token", "roofline tok/s",
           "tg128 % roofline"]


def test_bench_speed_quick(tmp_path):
    model = write_gguf(tmp_path / "tiny.gguf", "llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The {i} quick brown foxes jumped over the lazy dog." for i in range(200)))
    out_md = tmp_path / "RESULTS.md"
    env = dict(os.environ, LUTENGINE_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "bench.speed", "--model", str(model), "--text", str(text),
                           "--quick", "--no-peer", "--no-write", "--threads", "1", "2", "--stream-mib", "16",
                           "--out", str(out_md)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "## End-to-end speed (bench/speed)" in out
    assert "Machine: " in out and "ISA path: " in out
    assert "Command: `python -m bench.speed " in out
    header = next((line for line in out.splitlines() if line.startswith("| engine / format | bpw")), None)
    assert header is not None, out
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    start = out.splitlines().index(header)
    rows = []
    for line in out.splitlines()[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert [r[2] for r in rows] == ["1", "2"], out  # one row per thread count: ours only
    for r in rows:
        assert len(r) == len(COLUMNS)
        assert r[0].startswith("lutengine")
        for cell in r[3:6]:  # tg128, pp128, pp512
            assert float(cell.split()[0]) > 0
        assert r[6:9] == ["—", "—", "—"]  # no peer to compare with
        assert float(r[9]) > 0 and float(r[10]) > 0 and r[11].endswith("%")
    assert "Interference record" in out
    assert "llama.cpp not run" in out
    assert not out_md.exists()  # --no-write
