#!/usr/bin/env bash
# Build the standalone C harness (test_lut.c) with the core compiled in, and
# run it on a vectors file from tests/gen_vectors.py.
#
#   c/tests/run.sh native  VECTORS   host gcc, ASan + UBSan, every ISA of this CPU
#
# test_trellis.c (trellis-coded layers, no vectors file) runs first in both modes.
#   c/tests/run.sh aarch64 VECTORS   cross gcc, static, run under qemu-aarch64
#
# Binaries go to $LUT_BUILD_DIR (default c/build). The core gets the flags of
# lutkernels/_build.py that decide results: C11 and no FMA contraction (an
# AArch64 compiler would otherwise fuse the table rounding's multiply-add).
set -euo pipefail

usage() { echo "usage: $0 native|aarch64 VECTORS" >&2; exit 2; }
[ $# -eq 2 ] || usage
mode=$1
vectors=$2
[ -f "$vectors" ] || { echo "$0: no vectors file $vectors (make one with tests/gen_vectors.py)" >&2; exit 2; }

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${LUT_BUILD_DIR:-$root/c/build}
mkdir -p "$build"
flags=(-std=c11 -ffp-contract=off -fno-math-errno -Wall -Wextra -I"$root/c" -pthread)
core=("$root/c/lut.c" "$root/c/pool.c" "$root/c/kernel_scalar.c" "$root/c/trellis.c")

need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$0: $tool not found" >&2; exit 3; }
    done
}

case $mode in
native)
    cc=${CC:-gcc}
    need "$cc"
    case $("$cc" -dumpmachine) in
    x86_64* | i?86*) core+=("$root/c/kernel_avx2.c" "$root/c/kernel_avx512.c") ;;
    aarch64*) core+=("$root/c/kernel_neon.c") ;;
    esac
    san=(-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all)
    # trellis layers first: the caller reads test_lut's count from the last line
    "$cc" "${flags[@]}" "${san[@]}" "$root/c/tests/test_trellis.c" "${core[@]}" -lm -o "$build/test_trellis_native"
    "$build/test_trellis_native"
    exe=$build/test_lut_native
    "$cc" "${flags[@]}" "${san[@]}" "$root/c/tests/test_lut.c" "${core[@]}" -lm -o "$exe"
    "$exe" "$vectors"
    ;;
aarch64)
    need aarch64-linux-gnu-gcc qemu-aarch64
    exe=$build/test_lut_aarch64
    # -march=armv8-a and a Cortex-A53 (ARMv8.0) CPU model: the kernel must not
    # need anything beyond the AArch64 baseline.
    aarch64-linux-gnu-gcc "${flags[@]}" -O2 -static -march=armv8-a \
        "$root/c/tests/test_trellis.c" "${core[@]}" "$root/c/kernel_neon.c" -lm -o "$build/test_trellis_aarch64"
    qemu-aarch64 -cpu cortex-a53 "$build/test_trellis_aarch64"
    aarch64-linux-gnu-gcc "${flags[@]}" -O2 -static -march=armv8-a \
        "$root/c/tests/test_lut.c" "${core[@]}" "$root/c/kernel_neon.c" -lm -o "$exe"
    qemu-aarch64 -cpu cortex-a53 "$exe" "$vectors"
    ;;
*)
    usage
    ;;
esac
