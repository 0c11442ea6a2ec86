#!/usr/bin/env bash
# Build the standalone C harness with the core compiled in and run it:
# test_trellis.c (trellis-coded layers, self-contained) first, then test_lut.c
# on a vectors file from tests/gen_vectors.py.
#
#   c/tests/run.sh MODE VECTORS [--cases N] [--trellis R] [--seed S]
#
#   native    host gcc, ASan + UBSan, every ISA of this CPU
#   valgrind  host gcc, no sanitizer, under valgrind memcheck (the ISAs its
#             virtual CPU reports: valgrind has no AVX-512, so not avx512)
#   aarch64   cross gcc, static, run under qemu-aarch64 (scalar and neon)
#
#   --cases N    only the first N cases of VECTORS (default: all)
#   --trellis R  R seeded random trellis shapes after the fixed ones (default 0)
#   --seed S     their seed (default 1)
#
# The last two lines are test_trellis's and test_lut's counts. Binaries go to
# $LUT_BUILD_DIR (default c/build). The core gets the flags of
# lutkernels/_build.py that decide results: C11 and no FMA contraction (an
# AArch64 compiler would otherwise fuse the table rounding's multiply-add).
set -euo pipefail

usage() { echo "usage: $0 native|valgrind|aarch64 VECTORS [--cases N] [--trellis R] [--seed S]" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1
vectors=$2
shift 2
cases=()
trellis=(0 1)
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || usage
    case $1 in
    --cases) cases=("$2") ;;
    --trellis) trellis[0]=$2 ;;
    --seed) trellis[1]=$2 ;;
    *) usage ;;
    esac
    shift 2
done
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

# host_simd CC: the SIMD kernels for CC's target
host_simd() {
    case $("$1" -dumpmachine) in
    x86_64* | i?86*) echo "$root/c/kernel_avx2.c $root/c/kernel_avx512.c" ;;
    aarch64*) echo "$root/c/kernel_neon.c" ;;
    esac
}

# build_and_run CC "RUNNER..." FLAGS...: both harnesses built with CC and FLAGS, run under RUNNER
build_and_run() {
    local cc=$1 runner=$2
    shift 2
    # trellis layers first: the caller reads test_lut's count from the last line
    "$cc" "${flags[@]}" "$@" "$root/c/tests/test_trellis.c" "${core[@]}" -lm -o "$build/test_trellis_$mode"
    $runner "$build/test_trellis_$mode" "${trellis[@]}"
    "$cc" "${flags[@]}" "$@" "$root/c/tests/test_lut.c" "${core[@]}" -lm -o "$build/test_lut_$mode"
    $runner "$build/test_lut_$mode" "$vectors" "${cases[@]}"
}

case $mode in
native)
    cc=${CC:-gcc}
    need "$cc"
    read -ra simd <<<"$(host_simd "$cc")"
    core+=("${simd[@]}")
    build_and_run "$cc" "" -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
    ;;
valgrind)
    cc=${CC:-gcc}
    need "$cc" valgrind
    read -ra simd <<<"$(host_simd "$cc")"
    core+=("${simd[@]}")
    build_and_run "$cc" "valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite" -O2 -g
    ;;
aarch64)
    need aarch64-linux-gnu-gcc qemu-aarch64
    core+=("$root/c/kernel_neon.c")
    # -march=armv8-a and a Cortex-A53 (ARMv8.0) CPU model: the kernel must not
    # need anything beyond the AArch64 baseline.
    build_and_run aarch64-linux-gnu-gcc "qemu-aarch64 -cpu cortex-a53" -O2 -static -march=armv8-a
    ;;
*)
    usage
    ;;
esac
