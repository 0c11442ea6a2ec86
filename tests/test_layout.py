"""The packed format (lutkernels/layout.py): round trips, dense form, honest bits, bad shapes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lutkernels as lk
from conftest import random_layer


@st.composite
def shapes(draw):
    K = 32 * draw(st.integers(1, 24))
    G = draw(st.sampled_from([g for g in (32, 64, 128, 256) if K % g == 0] + [K]))
    return draw(st.integers(1, 70)), K, draw(st.integers(1, 8)), G, draw(st.booleans())


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(shapes(), st.booleans(), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(shape, uniform, seed):
    M, K, P, G, off = shape
    planes, scales, offs = random_layer(np.random.default_rng(seed), M, K, P, G, off)
    if uniform:
        scales = scales[:1]  # plane 0's scale h; unpack gives plane p's as h * 2^p
    w = lk.pack(planes, scales, offs, uniform=uniform)
    assert w.uniform is uniform and w.scales.shape == (w.tiles, K // G, 1 if uniform else P, 16)
    p2, s2, o2 = lk.unpack(w)
    np.testing.assert_array_equal(p2, planes)
    expect = f16(scales) * np.float32(2.0) ** np.arange(P, dtype=np.float32)[:, None, None] if uniform else f16(scales)
    np.testing.assert_array_equal(s2, expect)
    if off:
        np.testing.assert_array_equal(o2, offs.astype(np.float16).astype(np.float32))
    else:
        assert o2 is None


@settings(max_examples=40, deadline=None)
@given(shapes(), st.booleans(), st.integers(0, 2**32 - 1))
def test_scale8_round_trip_stores_the_nearest_codes(shape, uniform, seed):
    M, K, P, G, off = shape
    planes, scales, offs = random_layer(np.random.default_rng(seed), M, K, P, G, off, scale8=True)
    scales = scales[:1] if uniform else scales
    w = lk.pack(planes, scales, offs, uniform=uniform, scale8=True)
    assert w.scales.dtype == np.uint8 and (w.offsets is None or w.offsets.dtype == np.int8)
    p2, s2, o2 = lk.unpack(w)
    np.testing.assert_array_equal(p2, planes)
    # every stored scale is an 8-bit value no farther from the wanted one than any other 8-bit value
    stored = s2[:1] if uniform else s2
    gap = np.abs(stored.astype(np.float64) - scales)
    assert (gap <= np.abs(lk.layout.F8_VALUES.astype(np.float64)[:, None, None, None] - scales).min(0)).all()
    if off:
        h0 = s2[0].astype(np.float64)
        assert (np.abs(o2 - offs) <= h0 / 16 * (1 + 1e-6)).all()  # half an eighth of h0
        np.testing.assert_array_equal(o2 * 8 / np.where(h0 > 0, h0, 1), np.rint(o2 * 8 / np.where(h0 > 0, h0, 1)))


def test_f8_codes_are_the_documented_floats():
    """Code 0 is 0; code 16e + m is (1 + m/16) * 2^(e - 13), increasing from about 1.3e-4 to 7.75."""
    expect = [0.0] + [(1 + (u & 15) / 16) * 2.0 ** ((u >> 4) - 13) for u in range(1, 256)]
    np.testing.assert_array_equal(lk.layout.f8_decode(np.arange(256)), np.float32(expect))
    assert lk.layout.F8_MAX == 7.75 and (np.diff(expect) > 0).all()


def test_scale8_bad_values_are_clear_errors():
    planes = np.ones((1, 16, 32), np.int8)
    with pytest.raises(lk.LayoutError, match=r"8-bit scales must lie in \[0, 7.75\]"):
        lk.pack(planes, -np.ones((1, 16, 1), np.float32), scale8=True)
    with pytest.raises(lk.LayoutError, match="8-bit scales"):
        lk.pack(planes, np.full((1, 16, 1), 8.0, np.float32), scale8=True)
    with pytest.raises(lk.LayoutError, match=r"\[-16, 15.875\] times their group's first scale"):
        lk.pack(planes, np.ones((1, 16, 1), np.float32), np.full((16, 1), 16.0, np.float32), scale8=True)


def test_dense_matches_the_formula():
    rng = np.random.default_rng(1)
    M, K, P, G = 21, 128, 3, 32
    planes, scales, offs = random_layer(rng, M, K, P, G, True)
    s16 = scales.astype(np.float16).astype(np.float32)
    o16 = offs.astype(np.float16).astype(np.float32)
    expect = np.zeros((M, K), np.float64)
    for p in range(P):
        for m in range(M):
            for k in range(K):
                expect[m, k] += s16[p, m, k // G] * planes[p, m, k]
    expect += np.repeat(o16, G, axis=1)
    np.testing.assert_allclose(lk.dense(lk.pack(planes, scales, offs)), expect, rtol=1e-6, atol=1e-6)


def test_uniform_dense_is_the_step_grid():
    """Uniform: W = h * sum_p 2^p * B_p + z, i.e. a b-bit grid of step s = 2h: s * (q - (2^b - 1)/2) + z."""
    rng = np.random.default_rng(3)
    M, K, P, G = 19, 64, 3, 32
    q = rng.integers(0, 2**P, (M, K))
    planes = ((q[None] >> np.arange(P)[:, None, None]) & 1) * 2 - 1
    h = f16(rng.uniform(0.01, 1, (1, M, K // G)))
    z = f16(rng.standard_normal((M, K // G)))
    expect = 2 * np.repeat(h[0], G, axis=1) * (q - (2**P - 1) / 2) + np.repeat(z, G, axis=1)
    np.testing.assert_allclose(lk.dense(lk.pack(planes, h, z, uniform=True)), expect, rtol=1e-6)


def test_bit_layout_of_one_weight():
    """Row 17, column 37 of a plane: tile 1, chunk 1, column 5 of the chunk ->
    lane 1 (columns 4..7), low nibble, bit 1; byte 16*lane + row%16 = 17."""
    P, M, K = 1, 20, 64
    planes = -np.ones((P, M, K), np.int8)
    planes[0, 17, 37] = 1
    w = lk.pack(planes, np.ones((P, M, K // 32), np.float32))
    nz = np.argwhere(w.planes)
    assert nz.tolist() == [[1, 1, 0, 17]]
    assert w.planes[1, 1, 0, 17] == 0b0010


def test_bits_per_weight_counts_every_stored_byte():
    rng = np.random.default_rng(2)
    # M = 20 pads to 32 rows; 2 planes, G = 64, offsets: planes 2 bits, scales 2*16/64, offsets 16/64, all * 32/20
    w = lk.pack(*random_layer(rng, 20, 128, 2, 64, True))
    assert w.nbytes() == w.planes.nbytes + w.scales.nbytes + w.offsets.nbytes
    assert w.bits_per_weight() == pytest.approx((2 + 2 * 16 / 64 + 16 / 64) * 32 / 20)
    w = lk.pack(*random_layer(rng, 32, 128, 1, 128, False))
    assert w.bits_per_weight() == pytest.approx(1 + 16 / 128)


def test_uniform_stores_one_scale_per_group():
    """4 bits, G = 32, offsets: 4 + 16/32 + 16/32 = 5.0 bits uniform (llama.cpp's Q4_1), 6.5 per plane,
    and 4 + 8/32 + 8/32 = 4.5 with 8-bit scales."""
    planes, scales, offs = random_layer(np.random.default_rng(4), 64, 256, 4, 32, True)
    assert lk.pack(planes, scales[:1], offs, uniform=True).bits_per_weight() == 5.0
    assert lk.pack(planes, scales, offs).bits_per_weight() == 6.5
    planes, scales, offs = random_layer(np.random.default_rng(4), 64, 256, 4, 32, True, scale8=True)
    assert lk.pack(planes, scales[:1], offs, uniform=True, scale8=True).bits_per_weight() == 4.5


@pytest.mark.parametrize("M,K,P,ngroups,msg", [
    (8, 48, 1, 1, "multiple of 32"),
    (8, 64, 1, 4, "group size must be one of"),
    (8, 96, 1, 2, "group size must be one of"),
    (8, 64, 9, 2, "planes must be 1..8"),
    (0, 64, 1, 2, "M must be at least 1"),
])
def test_bad_shapes_are_clear_errors(M, K, P, ngroups, msg):
    planes = np.ones((P, M, K), np.int8)
    with pytest.raises(lk.LayoutError, match=msg):
        lk.pack(planes, np.ones((P, M, ngroups), np.float32))


def test_mismatched_scales_and_offsets():
    planes = np.ones((2, 8, 64), np.int8)
    with pytest.raises(lk.LayoutError, match=r"scales must be \[P=2, M=8, K/G\]"):
        lk.pack(planes, np.ones((1, 8, 2), np.float32))
    with pytest.raises(lk.LayoutError, match=r"scales must be \[1 \(uniform\), M=8, K/G\]"):
        lk.pack(planes, np.ones((2, 8, 2), np.float32), uniform=True)
    with pytest.raises(lk.LayoutError, match="offsets must be"):
        lk.pack(planes, np.ones((2, 8, 2), np.float32), np.ones((8, 3), np.float32))
    with pytest.raises(lk.LayoutError, match=r"planes must be \[P, M, K\]"):
        lk.pack(np.ones((8, 64)), np.ones((1, 8, 2), np.float32))
