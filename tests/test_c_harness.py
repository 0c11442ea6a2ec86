"""The standalone C harness (c/tests): vectors from tests/gen_vectors.py, checked
natively under ASan/UBSan, and for NEON cross-compiled and run under qemu-aarch64."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lutkernels as lk

ROOT = Path(__file__).resolve().parent.parent
NCASES = 95  # every combination of G, exact, offsets, uniform and scale8 after the edge cases (gen_vectors.plan)
THREAD_COUNTS = 2  # test_lut.c runs every ISA on 1 and 2 threads


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    path = tmp_path_factory.mktemp("vectors") / "vectors.bin"
    subprocess.run([sys.executable, str(ROOT / "tests" / "gen_vectors.py"), str(path), "--cases", str(NCASES)],
                   check=True)
    return path


def run_harness(mode, vectors, build_dir, npaths):
    r = subprocess.run(["bash", str(ROOT / "c" / "tests" / "run.sh"), mode, str(vectors)], capture_output=True,
                       text=True, env={**os.environ, "LUT_BUILD_DIR": str(build_dir)})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # Every path must have run: a harness that skipped an ISA would still say "0 failed".
    assert r.stdout.splitlines()[-1] == f"{NCASES * npaths} passed, 0 failed", out


def test_native_under_sanitizers(vectors, tmp_path):
    run_harness("native", vectors, tmp_path, len(lk.supported_isas()) * THREAD_COUNTS)


def test_aarch64_neon_under_qemu(vectors, tmp_path):
    missing = [t for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        msg = f"{', '.join(missing)} not found (Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)"
        if os.environ.get("LUTENGINE_REQUIRE_CROSS") == "1":
            pytest.fail(f"LUTENGINE_REQUIRE_CROSS=1 but {msg}")
        pytest.skip(msg)
    run_harness("aarch64", vectors, tmp_path, 2 * THREAD_COUNTS)  # scalar and neon
