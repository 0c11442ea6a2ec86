"""The standalone C harness (c/tests): the structured vectors of tests/gen_vectors.py
plus RANDOM seeded random shapes, and as many random trellis shapes, checked natively
under ASan/UBSan, under valgrind memcheck, and for NEON cross-compiled and run
under qemu-aarch64. Every case runs on every ISA path of the target, on 1 to 4 threads."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lutkernels as lk

ROOT = Path(__file__).resolve().parent.parent
NCASES = 95  # every combination of G, exact, offsets, uniform and scale8 after the edge cases (gen_vectors.plan)
RANDOM = 1000  # random shapes after them (gen_vectors.random_plan; test_trellis.c's check_random)
TRELLIS_FIXED = 36  # test_trellis.c: 6 k x 3 shapes x 2 token counts
THREAD_COUNTS = 4  # both harnesses run every ISA on 1 to 4 threads
VALGRIND_CASES, VALGRIND_TRELLIS = 200, 100  # memcheck is ~50x slower than the native run


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    path = tmp_path_factory.mktemp("vectors") / "vectors.bin"
    subprocess.run([sys.executable, str(ROOT / "tests" / "gen_vectors.py"), str(path), "--cases", str(NCASES),
                    "--random", str(RANDOM)], check=True)
    return path


def run_harness(mode, vectors, build_dir, npaths, cases=NCASES + RANDOM, trellis=RANDOM):
    cmd = ["bash", str(ROOT / "c" / "tests" / "run.sh"), mode, str(vectors), "--cases", str(cases),
           "--trellis", str(trellis), "--seed", "7"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LUT_BUILD_DIR": str(build_dir)})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    # Every path must have run: a harness that skipped an ISA or a case would still say "0 failed".
    lines = r.stdout.splitlines()
    trellis_line, lut_line = next(x for x in lines if x.startswith("trellis: ")), lines[-1]
    ntrellis = TRELLIS_FIXED + trellis
    assert trellis_line == f"trellis: {ntrellis} cases, {ntrellis * npaths} passed, 0 failed", out[-5000:]
    assert lut_line == f"{cases * npaths} passed, 0 failed", out[-5000:]


def test_native_under_sanitizers(vectors, tmp_path):
    run_harness("native", vectors, tmp_path, len(lk.supported_isas()) * THREAD_COUNTS)


def _require(tools, packages):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"{', '.join(missing)} not found (Debian: {packages})"
        if os.environ.get("LUTENGINE_REQUIRE_CROSS") == "1":
            pytest.fail(f"LUTENGINE_REQUIRE_CROSS=1 but {msg}")
        pytest.skip(msg)


def test_under_valgrind(vectors, tmp_path):
    _require(["valgrind"], "valgrind")
    # valgrind's virtual CPU has no AVX-512, so lut_isa_supported() there reports at most scalar and avx2
    isas = len([i for i in lk.supported_isas() if i != "avx512"])
    run_harness("valgrind", vectors, tmp_path, isas * THREAD_COUNTS, VALGRIND_CASES, VALGRIND_TRELLIS)


@pytest.mark.slow
def test_aarch64_neon_under_qemu(vectors, tmp_path):
    _require(["aarch64-linux-gnu-gcc", "qemu-aarch64"], "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user")
    run_harness("aarch64", vectors, tmp_path, 2 * THREAD_COUNTS)  # scalar and neon


def test_harness_refuses_bad_arguments(vectors):
    r = subprocess.run(["bash", str(ROOT / "c" / "tests" / "run.sh"), "native", str(vectors), "--cases"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and re.search(r"usage: .*native\|valgrind\|aarch64", r.stderr)
