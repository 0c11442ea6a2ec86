"""Test vectors for the standalone C harness (c/tests/test_lut.c).

    python tests/gen_vectors.py OUT [--cases N] [--random R] [--seed S]

--cases N writes the first N structured cases (plan); --random R appends R
seeded random shapes (random_plan), the same case writer for both.

Only numpy is needed: the expected values come from lutkernels/layout.py and
lutkernels/reference.py, loaded without the package's __init__ (which imports
the compiled module), so vectors can be made where the C core is not built,
e.g. for a cross-compiled harness.

File format, little-endian:
    header  char[8] "LUTVEC4\\0", uint32 0x01020304 (byte-order check), uint32 ncases
    case    int32 M, K, P, G, Kb, has_offsets, N, exact, uniform, scale8, int_grid
            uint8   planes  [Mt, K/32, P, 64]
            uint16  scales  [Mt, K/G, S, 16]         (fp16 bits, or uint8 codes if scale8; S = 1 if uniform else P)
            uint16  offsets [Mt, K/G, 16]            (only if has_offsets; fp16 bits, or int8 if scale8)
            float32 x       [N, K]
            int32   sums    [N, Mt*16, P, K/Kb]      (the exact integer block sums, per plane)
            float64 y       [N, M]                   (float64 reference output)
            float64 mag     [N, M]                   (sum of |terms| of each output)
"""
import argparse
import importlib
import struct
import sys
import types
from pathlib import Path

import numpy as np

MAGIC = b"LUTVEC4\0"
GROUPS = (32, 64, 128, 256, "K")
FAST_EXTREME = np.float32([63.5, 63.5, 63.5, 61.5])  # a group of 4 at the fast tables' largest entry


def _load_spec():
    """lutkernels.layout and lutkernels.reference as submodules of a stand-in
    package whose __init__ is never run: their relative imports still resolve."""
    name = "_lutkernels_spec"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(__file__).resolve().parent.parent / "lutkernels")]
        sys.modules[name] = pkg
    return importlib.import_module(name + ".layout"), importlib.import_module(name + ".reference")


layout, reference = _load_spec()


def magnitude(w, x, sums, exact):
    """Sum of |terms| of each output: float32 accumulation error is relative to this, not to |y|.
    Taken per plane, it also bounds a uniform layer's combined terms |sum_p 2^p S_p| * h."""
    _, ts = reference.tables(x, w.K, w.G, exact)
    _, scales, offsets = layout.unpack(w)
    blk = np.repeat(np.abs(scales.astype(np.float64)), w.G // layout.act_block(w.K, w.G), axis=2)
    mag = np.einsum("nmpb,pmb,nb->nm", np.abs(sums[:, : w.M].astype(np.float64)), blk, ts.astype(np.float64))
    if offsets is not None:
        mag += np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, w.G).sum(-1) @ np.abs(offsets.T)
    return mag


def plan(ncases, rng):
    """Shapes. G, exact, offsets, uniform and 8-bit scales cycle with periods 5,
    2, 4, 8 and 16, so any 80 consecutive cases hold all 80 combinations; the
    edge cases that replace the first slots leave 80 consecutive ones from 95
    cases on. Uniform layers without offsets take the integer grid every other
    16 cases (period 32)."""
    out = []
    for i in range(ncases):
        G = GROUPS[i % 5]
        if G == "K":
            K = 32 * int(rng.integers(1, 33))
            G = K
        else:
            K = G * int(rng.integers(1, 1024 // G + 1))
        M = int(rng.integers(1, 81))
        if i % 4 == 0:
            M = 16 * int(rng.integers(1, 5))  # whole tiles too, not only a partial last one
        off, uniform = (i // 2) % 2 == 1, (i // 4) % 2 == 1
        # one exact case in three has 8..17 tokens: the integer GEMM's token blocks and their tails
        N = 8 + (i // 6) % 10 if i % 6 == 5 else 1 + i % 3
        out.append(dict(M=M, K=K, P=int(rng.integers(1, 9)), G=G, off=off, N=N, exact=i % 2 == 1,
                        uniform=uniform, scale8=(i // 8) % 2 == 1, int_grid=uniform and not off and (i // 16) % 2 == 1,
                        kind="random"))
    # Edge cases overwrite the first slots so the count stays ncases.
    edges = [
        dict(M=1, K=32, P=1, G=32, off=False, N=1, exact=False, uniform=False, kind="random"),
        dict(M=33, K=992, P=3, G=992, off=True, N=2, exact=True, uniform=True, kind="random"),  # G=K, act block 32
        dict(M=17, K=320, P=2, G=320, off=False, N=1, exact=False, uniform=False, kind="random"),  # act block 64
        dict(M=40, K=384, P=5, G=384, off=True, N=3, exact=False, uniform=True, kind="random"),  # act block 128
        dict(M=31, K=1024, P=8, G=1024, off=True, N=3, exact=True, uniform=False, kind="random"),  # act block 256
        dict(M=20, K=512, P=2, G=256, off=False, N=2, exact=False, uniform=False, kind="extreme"),  # int16, fast
        dict(M=20, K=1024, P=2, G=1024, off=True, N=1, exact=True, uniform=False, kind="extreme"),  # int16, exact
        # the uniform combination's bound: 8 equal planes, 255 * 64 * 254 (fast), 255 * 64 * 8188 (exact)
        dict(M=20, K=512, P=8, G=256, off=True, N=2, exact=False, uniform=True, kind="extreme"),
        dict(M=20, K=1024, P=8, G=1024, off=False, N=1, exact=True, uniform=True, kind="extreme_sum"),
        dict(M=25, K=256, P=4, G=64, off=True, N=3, exact=False, uniform=True, kind="zero_token"),
        dict(M=45, K=512, P=3, G=128, off=True, N=2, exact=True, uniform=True, kind="subnormal"),
        # 8-bit scales at both ends of their range (and 0), offsets at both ends of theirs
        dict(M=36, K=256, P=4, G=32, off=True, N=2, exact=False, uniform=True, scale8=True, kind="f8_range"),
        # a run of 5 planes summed in int16 at its bound (lut_plane_run): 31 * 8 lookups of 127 (fast), of -128 (exact)
        dict(M=20, K=256, P=5, G=32, off=True, N=1, exact=False, uniform=True, kind="extreme_run"),
        dict(M=20, K=256, P=5, G=32, off=False, N=1, exact=True, uniform=True, kind="extreme_run"),
        dict(M=24, K=256, P=5, G=32, off=False, N=2, exact=True, uniform=True, int_grid=True, kind="random"),
    ]
    for e in edges:
        e.setdefault("scale8", False)
        e.setdefault("int_grid", False)
    out[: len(edges)] = edges[:ncases]
    return out


def random_plan(ncases, rng):
    """Random shapes on top of plan's structured ones. P and G cycle (periods 8
    and 5), so any 40 consecutive cases hold every (P, G); the rest is drawn: M
    mostly 1..70 (odd ones, below one tile, partial tiles), one in ten up to
    300; K from 32 (one in six the smallest K the group allows) to 1024, and
    one in fifty 8192, those with M <= 16 and one token to keep the file small;
    offsets, uniform, 8-bit scales, exact tables and (uniform without offsets)
    the integer grid each half the time."""
    out = []
    for i in range(ncases):
        P, G = 1 + i % 8, GROUPS[(i // 8) % 5]
        unit = 32 if G == "K" else G
        big = rng.random() < 0.02
        if big:
            K = 8192
        elif rng.random() < 1 / 6:
            K = unit
        else:
            K = unit * int(rng.integers(1, 1024 // unit + 1))
        G = K if G == "K" else G
        if big:
            M, N = int(rng.integers(1, 17)), 1
        else:
            M = int(rng.integers(71, 301)) if rng.random() < 0.1 else int(rng.integers(1, 71))
            N = int(rng.choice([1, 1, 1, 2, 3, 5]))
        off, uniform, scale8, exact, grid = (bool(b) for b in rng.integers(0, 2, 5))
        out.append(dict(M=M, K=K, P=P, G=G, off=off, N=N, exact=exact, uniform=uniform, scale8=scale8,
                        int_grid=uniform and not off and grid, kind="random"))
    return out


def make_case(c, rng):
    M, K, P, G, N = c["M"], c["K"], c["P"], c["G"], c["N"]
    planes = rng.integers(0, 2, (P, M, K), dtype=np.int8) * 2 - 1
    scales = rng.standard_normal((1 if c["uniform"] else P, M, K // G)).astype(np.float32)
    offsets = rng.standard_normal((M, K // G)).astype(np.float32) if c["off"] else None
    if c["scale8"]:  # what 8-bit scales hold: non-negative, offsets within [-16, 15.875] times plane 0's scale
        scales = np.abs(scales)
        if c["off"]:
            h0 = layout.F8_VALUES[layout.f8_encode(scales[0])]  # as stored: a tiny scale may round to 0
            offsets = (h0 * rng.uniform(-15, 15, (M, K // G))).astype(np.float32)
    x = (rng.standard_normal((N, K)) * rng.uniform(0.01, 100)).astype(np.float32)
    if c["kind"] == "extreme_sum":
        # Exact mode, the largest block sum: all activations equal quantize to
        # 2047, so the all-+1 entry is 8188 and a 256-activation block sums to
        # +-524032 in every plane.
        planes[:] = np.where(np.arange(M)[None, :, None] % 2 == 0, 1, -1)
        x[:] = 127.0
    elif c["kind"] == "extreme":
        # Every lookup of a row picks the same extreme entry: rows alternate
        # all +1 / all -1. Fast mode: every group (63.5, 63.5, 63.5, 61.5) has the
        # block's largest sum, 252, and rounds to (64, 64, 64, 62): entry +-254,
        # stored as the half +-127, so a 256-activation block sums to +-8128 in
        # int16 and +-16256 in all. Exact mode: groups summing to
        # 128 mod 256 make the low byte -128 (the exact bound, -8192 per block).
        planes[:] = np.where(np.arange(M)[None, :, None] % 2 == 0, 1, -1)
        if c["exact"]:
            x[:] = 32.0
            x[:, ::256] = 2047.0  # the block maximum, so the activations quantize to themselves
            x[:, 1::256] = 129.0
            x[:, 2::256] = 0.0
            x[:, 3::256] = 0.0
        else:
            x[:] = np.tile(FAST_EXTREME, K // 4)
    elif c["kind"] == "zero_token":
        x[1] = 0.0  # all-zero tables and a zero table scale
    elif c["kind"] == "extreme_run":
        planes[:] = np.where(np.arange(M)[None, :, None] % 2 == 0, 1, -1)
        x[:] = np.tile(FAST_EXTREME, K // 4)
        if c["exact"]:  # as "extreme", per 32-activation block: every group sums to 128 mod 256, low byte -128
            x[:] = 32.0
            x[:, ::32], x[:, 1::32], x[:, 2::32], x[:, 3::32] = 2047.0, 129.0, 0.0, 0.0
    elif c["kind"] == "f8_range":
        scales[:] = rng.choice(layout.F8_VALUES[[0, 1, 2, 254, 255]], scales.shape)
        offsets[:] = scales[0] * rng.choice([-16.0, 15.875, 0.125], offsets.shape)
    elif c["kind"] == "subnormal":
        scales *= 1e-6  # mostly float16 subnormals
        offsets *= 1e-6
    w = layout.pack(planes, scales, offsets, uniform=c["uniform"], scale8=c["scale8"], int_grid=c["int_grid"])
    y, sums = reference.gemm(w, x, c["exact"])
    return w, x, y, sums, magnitude(w, x, sums, c["exact"])


def write(path, ncases=95, seed=0, nrandom=0):
    rng = np.random.default_rng(seed)
    # the random shapes draw from their own stream: adding them leaves the structured cases as they were
    cases = plan(ncases, rng) + random_plan(nrandom, np.random.default_rng([seed, 1]))
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<II", 0x01020304, len(cases)))
        for c in cases:
            w, x, y, sums, mag = make_case(c, rng)
            Kb = layout.act_block(w.K, w.G)
            f.write(struct.pack("<11i", w.M, w.K, w.P, w.G, Kb, int(w.offsets is not None), x.shape[0], int(c["exact"]),
                                int(w.uniform), int(w.scale8), int(w.int_grid)))
            arrays = [w.planes.astype("<u1"), w.scales if w.scale8 else w.scales.view(np.uint16).astype("<u2")]
            if w.offsets is not None:
                arrays.append(w.offsets if w.scale8 else w.offsets.view(np.uint16).astype("<u2"))
            arrays += [x.astype("<f4"), sums.astype("<i4"), y.astype("<f8"), mag.astype("<f8")]
            for a in arrays:
                f.write(np.ascontiguousarray(a).tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--cases", type=int, default=95)
    ap.add_argument("--random", type=int, default=0, help="random shapes appended (random_plan)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cases < 1 or args.random < 0:
        ap.error("--cases must be at least 1 and --random at least 0")
    write(args.out, args.cases, args.seed, args.random)


if __name__ == "__main__":
    main()
