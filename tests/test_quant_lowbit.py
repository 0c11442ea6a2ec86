"""Low-bit quantizers: WGM dynamic grouping, multi-scale binary, binary, ternary."""
import itertools
import math

import numpy as np
import pytest

import lutkernels as lk
from engine.quant import binary, msb, rtn, ternary, wgm

# Measured on 80 unit-scale normal inputs (n = 256, 4 or 8 bands, window 4): WGM's cost
# is at most 1.45x the exact DP's, greedy's 1.56x. At real weight scale (|w| ~ 0.02)
# lam/n dominates small inputs and the bound does not hold: the DP then takes one band
# where WGM and greedy always end with exactly `groups` (the authors' loop).
WGM_OVER_DP = 2.0


def matrix(M=40, K=192, seed=0):
    """Small weights with the awkward cases: padding rows (M % 16), a zero row, a constant group."""
    W = (np.random.default_rng(seed).standard_normal((M, K)) * 0.02).astype(np.float32)
    W[3] = 0
    W[5, :64] = 0.01
    return W


FITS = [("msb", b, g, lambda W, b=b, g=g: msb.fit(W, b, g, iters=3)[0]) for b in (0, 1, 2, 3) for g in (32, 64, 0)]
FITS += [("msb", 2, g, lambda W, g=g: msb.fit(W, 2, g, iters=2, keep_max=False, init="uniform")[0]) for g in (32, 0)]
FITS += [("binary", p, g, lambda W, p=p, g=g: binary.fit(W, p, g)) for p in (1, 2) for g in (32, 64, 0)]
FITS += [("ternary", 2, g, lambda W, g=g: ternary.fit(W, g)) for g in (32, 64, 0)]


@pytest.mark.parametrize("name,n,group,fit", FITS, ids=[f"{m}-{n}-g{g}" for m, n, g, _ in FITS])
def test_packed_layer_is_the_fit(name, n, group, fit):
    W = matrix()
    f = fit(W)
    assert np.array_equal(f.scales, f.scales.astype(np.float16).astype(np.float32))
    assert f.offsets is None or np.array_equal(f.offsets, f.offsets.astype(np.float16).astype(np.float32))
    packed = binary.to_packed(f)
    assert np.array_equal(lk.dense(packed), binary.reconstruct(f))
    assert np.abs(binary.reconstruct(f) - W).max() < np.abs(W).max()


@pytest.mark.parametrize("name,n,group,fit", FITS, ids=[f"{m}-{n}-g{g}" for m, n, g, _ in FITS])
def test_documented_bits_are_the_stored_bytes(name, n, group, fit):
    M, K = 40, 192
    G = group or K
    P, values = {"msb": (n + 1, n + 1), "binary": (n, n + 1), "ternary": (2, 2)}[name]
    packed = binary.to_packed(fit(matrix(M, K)))
    assert packed.P == P
    assert packed.bits_per_weight() == pytest.approx((P + 16 * values / G) * math.ceil(M / 16) * 16 / M)


def test_group_is_lowered_to_a_kernel_size_dividing_k():
    assert binary.fit(matrix(K=96), 1, 128).G == 32
    assert ternary.fit(matrix(K=192), 256).G == 64
    assert msb.fit(matrix(K=192), 1, 192)[0].G == 192
    assert binary.fit(matrix(K=192), 1, 100).G == 64
    assert msb.fit(matrix(K=192), 1, 48)[0].G == 32


@pytest.mark.parametrize("quantize", [lambda W, G: binary.quantize(W, 1, G), lambda W, G: msb.quantize(W, 1, G),
                                      ternary.quantize, lambda W, G: rtn.quantize(W, 2, G)],
                         ids=["binary", "msb", "ternary", "rtn"])
def test_one_matrixs_row_length_is_lowered_on_another_as_rtn_lowers_it(quantize):
    """`quantize --group 576` on SmolLM2: whole rows where K is 576, groups of 256 on down_proj (K 1536)."""
    assert quantize(matrix(K=192), 192).G == 192
    assert quantize(matrix(K=512), 192).G == 128


# ---- WGM ----------------------------------------------------------------------------------------

def test_bands_are_runs_of_sorted_magnitudes_and_signs_are_kept():
    W = matrix()
    boundaries, means = wgm.bands(W, groups=8, window=16)
    assert len(boundaries) == 9 and boundaries[0] == 0 and boundaries[-1] == np.count_nonzero(W)
    idx = wgm.band_index(W, boundaries)
    a = np.abs(W)
    for j in range(7):
        assert a[idx == j].max() <= a[idx == j + 1].min()
        assert means[j] == np.float16(a[idx == j].astype(np.float64).mean())
    D = wgm.dequantize(W, boundaries, means)
    assert (D[W == 0] == 0).all() and (np.sign(D) == np.sign(W)).all()
    assert set(np.abs(D[W != 0]).tolist()) <= set(means.tolist())


def test_dp_is_exact_on_tiny_inputs():
    x = np.random.default_rng(3).standard_normal((1, 9))
    n = np.count_nonzero(x)
    for groups in (1, 2, 3, 4):
        best = min(wgm.objective(x, np.array([0, *cuts, n]))
                   for k in range(groups) for cuts in itertools.combinations(range(1, n), k))
        assert wgm.objective(x, wgm.bands(x, groups, solver="dp")[0]) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("groups", [4, 8])
def test_dp_never_above_greedy_or_wgm_and_wgm_within_bound(seed, groups):
    x = np.random.default_rng(seed).standard_normal((1, 256))
    cost = {s: wgm.objective(x, wgm.bands(x, groups, window=4, solver=s)[0]) for s in wgm.SOLVERS}
    assert cost["dp"] <= min(cost["wgm"], cost["greedy"]) * (1 + 1e-12)
    assert cost["wgm"] <= WGM_OVER_DP * cost["dp"]
    assert len(wgm.bands(x, groups, window=4)[0]) == groups + 1


def test_honest_bits_are_an_actual_encoding():
    W = matrix(M=64, K=256)
    W[W == 0] = 0.001  # no zeros: every weight is a sign and one of G indices
    boundaries, means = wgm.bands(W, groups=32, window=8)
    G, N = len(means), W.size
    idx = wgm.band_index(W, boundaries)
    width = math.ceil(math.log2(G))
    stream = np.concatenate([np.packbits(W.ravel() < 0),
                             np.packbits((idx.ravel()[:, None] >> np.arange(width)) & 1),
                             np.frombuffer(means.astype(np.float16).tobytes(), np.uint8)])
    fixed, entropy = wgm.honest_bits(boundaries, N)
    assert fixed == pytest.approx(8 * stream.size / N)
    assert fixed == pytest.approx(1 + 5 + 16 * 32 / N)
    assert wgm.paper_bits(boundaries) == pytest.approx(1 + 16 * 32 / N)
    assert wgm.paper_bits(boundaries) < entropy <= fixed


def test_zeros_cost_an_index_symbol():
    W = matrix()  # has zeros: 32 bands plus "zero" is 33 symbols, 6 index bits
    boundaries, _ = wgm.bands(W, groups=32, window=4)
    assert wgm.honest_bits(boundaries, W.size)[0] == pytest.approx(1 + 6 + 16 * 32 / W.size)


# ---- multi-scale binary ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 1, 2, 3])
@pytest.mark.parametrize("group", [32, 0])
@pytest.mark.parametrize("keep_max,init", [(True, "wgm"), (False, "wgm"), (True, "uniform")])
def test_msb_error_never_increases(bits, group, keep_max, init):
    W = matrix(M=48, K=256, seed=bits)
    f, errors = msb.fit(W, bits, group, iters=6, keep_max=keep_max, init=init)
    assert len(errors) == 7
    assert all(b <= a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] or bits == 0
    final = float(((binary.reconstruct(f).astype(np.float64) - W) ** 2).sum())
    assert final == pytest.approx(errors[-1], rel=1e-5)


def test_msb_beats_sign_binary_at_equal_planes_and_improves_with_planes():
    W = matrix(M=64, K=256, seed=5)

    def err(f):
        return np.linalg.norm(binary.reconstruct(f) - W)

    for group in (32, 64, 0):
        e = [err(msb.fit(W, b, group, keep_max=False)[0]) for b in (1, 2, 3)]
        assert e[0] < err(binary.fit(W, 2, group))
        assert e[0] > e[1] > e[2]
        pinned = [err(msb.fit(W, b, group)[0]) for b in (1, 2, 3)]
        assert pinned[0] > pinned[1] > pinned[2]


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("init", ["wgm", "uniform"])
def test_msb_keep_max_puts_each_groups_largest_weight_on_a_level(bits, init):
    W = matrix(M=32, K=128, seed=6)
    W[3] = 1e-3  # no all-zero group: the relative error below divides by max|w|
    a = np.abs(W).reshape(32, -1, 32)
    j = a.argmax(-1)[..., None]
    for keep_max, bound in ((True, 2e-3), (False, None)):
        D = binary.reconstruct(msb.fit(W, bits, 32, keep_max=keep_max, init=init)[0]).reshape(32, -1, 32)
        rel = np.abs(np.take_along_axis(D - W.reshape(32, -1, 32), j, -1)) / np.take_along_axis(a, j, -1)
        if keep_max:
            assert rel.max() < bound  # float16 scales: the level is max|w| to 3 digits
        else:
            assert np.median(rel) > 0.01  # least squares trades the largest weight for the many small ones


# ---- binary and ternary -----------------------------------------------------------------------------

def test_residual_plane_lowers_binary_error():
    W = matrix(seed=2)
    e1, e2 = (np.linalg.norm(binary.reconstruct(binary.fit(W, p, 64)) - W) for p in (1, 2))
    assert e2 < e1 < np.linalg.norm(W - W.mean())


@pytest.mark.parametrize("group", [32, 64, 0])
def test_ternary_values_are_minus_s_zero_plus_s(group):
    W = matrix(seed=4)
    f = ternary.fit(W, group)
    G = f.G
    R = binary.reconstruct(f).reshape(40, -1, G)
    s = 2 * f.scales[0][..., None]
    assert np.array_equal(f.scales[0], f.scales[1])
    assert (np.isclose(R, 0, atol=0) | (R == s) | (R == -s)).all()
    nonzero = np.abs(W.reshape(40, -1, G)) > ternary.THRESHOLD * np.abs(W.reshape(40, -1, G)).mean(-1, keepdims=True)
    assert np.array_equal(R != 0, nonzero & (s != 0))


# ---- arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: msb.quantize(matrix(), bits=8),
    lambda: msb.quantize(matrix(), bits=-1),
    lambda: msb.quantize(matrix(), bits=1.5),
    lambda: msb.quantize(matrix(), bits=1, group=-64),
    lambda: msb.fit(matrix(), 1, 64, iters=-1),
    lambda: msb.fit(matrix(), 1, 64, init="kmeans"),
    lambda: binary.quantize(matrix(), planes=3),
    lambda: binary.quantize(matrix(), group=16),
    lambda: binary.quantize(matrix(K=200)),
    lambda: ternary.quantize(matrix()[0]),
    lambda: wgm.bands(matrix(), groups=0),
    lambda: wgm.bands(matrix(), window=0),
    lambda: wgm.bands(matrix(), solver="kmeans"),
    lambda: wgm.bands(np.zeros((4, 32))),
    lambda: wgm.bands(matrix(), solver="dp"),
    lambda: wgm.band_index(matrix(), np.array([0, 10])),
], ids=["msb-bits-9-planes", "msb-bits-negative", "msb-bits-float", "msb-group-negative", "msb-iters", "msb-init",
        "binary-planes-3",
        "binary-group-16", "binary-K-200", "ternary-vector", "wgm-groups-0", "wgm-window-0", "wgm-solver",
        "wgm-all-zero", "wgm-dp-too-large", "wgm-boundaries-mismatch"])
def test_bad_arguments_are_one_line_value_errors(call):
    with pytest.raises(ValueError) as e:
        call()
    assert "\n" not in str(e.value) and str(e.value)
