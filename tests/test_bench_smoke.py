"""Smoke test of the kernel benchmark: `python -m bench.kernels --quick --no-write` runs and prints its table."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["shape", "P", "G", "bpw", "ISA", "threads", "us/GEMV", "GB/s", "x numpy", "% roofline"]


def test_bench_kernels_quick():
    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "--quick", "--no-write"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "## Kernels (bench/kernels)" in out
    header = next((line for line in out.splitlines() if line.startswith("| shape |")), None)
    assert header is not None, out
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[: len(COLUMNS)] == COLUMNS
    rows = [line for line in out.splitlines() if line.startswith("| ") and line != header]
    assert rows, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len([c for c in header.strip("|").split("|")])
        assert float(cells[6]) > 0  # us/GEMV
        assert cells[9].endswith("%")
    assert "### Targets" in out
    assert "AVX-512 vs AVX2" in out
