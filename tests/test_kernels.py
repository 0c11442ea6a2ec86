"""The C kernels against the numpy reference, the dense product, and each other."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lutkernels as lk
from conftest import random_layer
from lutkernels import reference as ref

ISAS = lk.supported_isas()


def packed(rng, M, K, P, G, offsets, uniform=False, scale8=False):
    """A random layer; uniform keeps plane 0's scales (plane p's are implied as 2^p times them)."""
    planes, scales, offs = random_layer(rng, M, K, P, G, offsets, scale8)
    return lk.pack(planes, scales[:1] if uniform else scales, offs, uniform=uniform, scale8=scale8)


@st.composite
def cases(draw):
    K = 32 * draw(st.integers(1, 40))
    G = draw(st.sampled_from([g for g in (32, 64, 128, 256) if K % g == 0] + [K]))
    return dict(M=draw(st.integers(1, 80)), K=K, P=draw(st.integers(1, 8)), G=G, off=draw(st.booleans()),
                uniform=draw(st.booleans()), scale8=draw(st.booleans()), N=draw(st.sampled_from([1, 1, 2, 5])),
                exact=draw(st.booleans()),
                threads=draw(st.sampled_from([1, 2])), seed=draw(st.integers(0, 2**32 - 1)))


def magnitude(w, x, sums, exact):
    """Sum of |terms| of each output: float32 accumulation error is relative to this, not to |y|."""
    _, ts = ref.tables(x, w.K, w.G, exact)
    _, scales, offsets = lk.unpack(w)
    blk = np.repeat(np.abs(scales.astype(np.float64)), w.G // lk.act_block(w.K, w.G), axis=2)
    mag = np.einsum("nmpb,pmb,nb->nm", np.abs(sums[:, : w.M].astype(np.float64)), blk, ts.astype(np.float64))
    if offsets is not None:
        mag += np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, w.G).sum(-1) @ np.abs(offsets.T)
    return mag


def run(w, x, exact, isa, threads):
    lk.set_isa(isa)
    lk.set_threads(threads)
    acc = np.zeros((x.shape[0], w.tiles * 16, w.P, w.K // lk.act_block(w.K, w.G)), np.int32)
    return lk.gemm(w, x, exact=exact, acc=acc), acc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_every_path_matches_the_reference(restore_kernel_state, c):
    rng = np.random.default_rng(c["seed"])
    w = packed(rng, c["M"], c["K"], c["P"], c["G"], c["off"], c["uniform"], c["scale8"])
    x = (rng.standard_normal((c["N"], c["K"])) * rng.uniform(0.01, 100)).astype(np.float32)
    y_ref, sums_ref = ref.gemm(w, x, c["exact"])
    y_scalar, sums_scalar = run(w, x, c["exact"], "scalar", c["threads"])
    np.testing.assert_array_equal(sums_scalar, sums_ref)
    assert (np.abs(y_scalar - y_ref) <= 1e-5 * magnitude(w, x, sums_ref, c["exact"]) + 1e-30).all()
    for isa in ISAS:
        y, sums = run(w, x, c["exact"], isa, c["threads"])
        np.testing.assert_array_equal(sums, sums_scalar, err_msg=isa)
        np.testing.assert_array_equal(y, y_scalar, err_msg=isa)
        # without acc, uniform planes are summed in runs (lut_plane_run): the same integers, the same floats
        np.testing.assert_array_equal(lk.gemm(w, x, exact=c["exact"]), y_scalar, err_msg=isa)


@pytest.mark.parametrize("scale8", [False, True])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("isa", ISAS)
def test_thread_count_does_not_change_results(restore_kernel_state, isa, uniform, scale8):
    rng = np.random.default_rng(3)
    w = packed(rng, 300, 512, 3, 128, True, uniform, scale8)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    outs = [run(w, x, False, isa, t)[0] for t in (1, 2, 3)]
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])


@pytest.mark.parametrize("scale8", [False, True])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("G", [32, 64, 128, 256, 768])
def test_error_against_dense_product_stays_in_bound(G, exact, uniform, scale8):
    rng = np.random.default_rng(G)
    w = packed(rng, 64, 768, 4, G, True, uniform, scale8)
    x = rng.standard_normal((3, 768)).astype(np.float32)
    x[:, 5] = 40.0  # an outlier channel, as LLM activations have
    y = lk.gemm(w, x, exact=exact)
    y_dense = x.astype(np.float64) @ lk.dense(w).T.astype(np.float64)
    bound = ref.error_bound(w, x, exact)
    assert (np.abs(y - y_dense) <= bound + 1e-4 * np.abs(y_dense).max()).all()
    assert np.abs(y - y_dense).max() > 0  # quantized tables: not the dense product


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("isa", ISAS)
def test_uniform_is_the_per_plane_layer_it_implies(restore_kernel_state, isa, exact):
    """The same weights packed uniform (h) and per plane (h * 2^p): equal per-plane integer sums,
    outputs equal up to float rounding (planes combined in integer, one multiply instead of P)."""
    rng = np.random.default_rng(10)
    M, K, P, G = 45, 512, 8, 64
    planes, scales, offs = random_layer(rng, M, K, P, G, True)
    h = scales[:1].astype(np.float16).astype(np.float32)
    u = lk.pack(planes, h, offs, uniform=True)
    w = lk.pack(planes, h * np.float32(2.0) ** np.arange(P, dtype=np.float32)[:, None, None], offs)
    assert u.bits_per_weight() < w.bits_per_weight() and lk.dense(u).tobytes() == lk.dense(w).tobytes()
    x = rng.standard_normal((3, K)).astype(np.float32)
    (y_u, sums_u), (y_w, sums_w) = run(u, x, exact, isa, 1), run(w, x, exact, isa, 1)
    np.testing.assert_array_equal(sums_u, sums_w)
    assert (np.abs(y_u - y_w) <= 2e-5 * magnitude(w, x, sums_w, exact)).all()  # each within 1e-5 of float64


def test_exact_mode_equals_integer_product():
    """Exact mode's integer sums are sum_k B[k] * q[k] with q the activations rounded to 12-bit integers."""
    rng = np.random.default_rng(4)
    M, K, P, G = 40, 512, 2, 128
    planes, scales, offs = random_layer(rng, M, K, P, G, False)
    w = lk.pack(planes, scales)
    x = rng.standard_normal((2, K)).astype(np.float32)
    xb = x.reshape(2, K // G, G)
    q = np.clip(np.rint(xb * (np.float32(2047) / np.abs(xb).max(-1, keepdims=True))), -2047, 2047).astype(np.int64)
    expect = np.einsum("pmbk,nbk->nmpb", planes.reshape(P, M, K // G, G).astype(np.int64), q)
    _, sums = run(w, x, True, lk.get_isa(), 1)
    np.testing.assert_array_equal(sums[:, :M], expect)


def test_gemv_matches_gemm_and_fills_out():
    rng = np.random.default_rng(5)
    w = lk.Layer(lk.pack(*random_layer(rng, 50, 256, 2, 64, True)))
    x = rng.standard_normal(256).astype(np.float32)
    out = np.empty(50, np.float32)
    y = lk.gemv(w, x, out=out)
    assert y.base is out or y is out or np.shares_memory(y, out)
    np.testing.assert_array_equal(out, lk.gemm(w, x[None])[0])


def test_zero_activations_give_offsets_only():
    rng = np.random.default_rng(6)
    w = lk.pack(*random_layer(rng, 20, 64, 2, 32, True))
    np.testing.assert_array_equal(lk.gemm(w, np.zeros((1, 64), np.float32)), np.zeros((1, 20), np.float32))


# ---- bad input -------------------------------------------------------------

@pytest.fixture
def layer():
    return lk.Layer(lk.pack(*random_layer(np.random.default_rng(7), 20, 64, 2, 32, False)))


def test_wrong_dtype(layer):
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        lk.gemm(layer, np.zeros((1, 64)))


def test_non_contiguous(layer):
    x = np.zeros((1, 128), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        lk.gemm(layer, x)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        lk.gemv(layer, np.zeros(128, np.float32)[::2])


def test_mismatched_shapes(layer):
    with pytest.raises(ValueError, match=r"x must have shape \(1, 64\), got \(1, 96\)"):
        lk.gemm(layer, np.zeros((1, 96), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(1, 20\)"):
        lk.gemm(layer, np.zeros((1, 64), np.float32), out=np.zeros((1, 21), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        lk.gemm(layer, np.zeros(64, np.float32))


def test_lying_strides_are_refused_before_c(layer):
    """as_strided can make a C-contiguous view that claims more memory than it has."""
    from numpy.lib.stride_tricks import as_strided

    small = np.zeros(16, np.float32)
    x = as_strided(small, shape=(1, 64), strides=(256, 4))
    with pytest.raises(ValueError, match="x reaches beyond the memory it views"):
        lk.gemm(layer, x)
    out = as_strided(np.zeros(4, np.float32), shape=(1, 20), strides=(80, 4))
    with pytest.raises(ValueError, match="out reaches beyond the memory it views"):
        lk.gemm(layer, np.zeros((1, 64), np.float32), out=out)
    w = layer.w
    planes = as_strided(w.planes[:, :1].copy(), shape=w.planes.shape, strides=w.planes.strides)
    with pytest.raises(ValueError, match="planes reaches beyond"):
        lk.Layer(lk.PackedLinear(w.M, w.K, w.P, w.G, planes, w.scales, None))
    # views that stay inside their memory pass, through any chain of bases (a slice of a buffer)
    buf = bytearray(4 * 64 * 3)
    x = np.frombuffer(buf, np.float32).reshape(3, 64)[1:2]
    assert lk.gemm(layer, x).shape == (1, 20)


def test_tampered_packed_arrays_are_caught():
    w = lk.pack(*random_layer(np.random.default_rng(8), 20, 64, 2, 32, False))
    bad = lk.PackedLinear(w.M, w.K, w.P, w.G, w.planes[:1], w.scales, None)
    with pytest.raises(ValueError, match="planes must have shape"):
        lk.Layer(bad)
    bad = lk.PackedLinear(w.M, w.K, w.P, w.G, w.planes, w.scales.astype(np.float32), None)
    with pytest.raises(TypeError, match="scales must be float16"):
        lk.Layer(bad)
    bad = lk.PackedLinear(w.M, w.K, w.P, w.G, w.planes, w.scales, None, uniform=True)  # P scales, not 1
    with pytest.raises(ValueError, match=r"scales must have shape \(2, 2, 1, 16\)"):
        lk.Layer(bad)
    with pytest.raises(lk.LayoutError, match="multiple of 32"):
        lk.Layer(lk.PackedLinear(20, 48, 2, 48, w.planes, w.scales, None))


def test_c_core_rejects_a_bad_descriptor():
    L = lk.Layer(packed(np.random.default_rng(11), 20, 64, 2, 32, False, True))
    L.c.uniform = 2  # neither mode: the C core must refuse, not guess
    with pytest.raises(lk.KernelError, match="lut_gemm failed with code -1"):
        lk.gemm(L, np.zeros((1, 64), np.float32))


def test_isa_and_thread_errors(restore_kernel_state):
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        lk.set_isa("sse9")
    missing = [i for i in ("avx2", "avx512", "neon") if i not in ISAS]
    for isa in missing:
        with pytest.raises(lk.KernelError, match=f"ISA '{isa}' is not supported by this CPU"):
            lk.set_isa(isa)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        lk.set_threads(0)


def test_env_forces_isa_and_rejects_unsupported():
    code = "import lutkernels as lk; print(lk.get_isa())"
    out = subprocess.run([sys.executable, "-c", code], env={"LUTENGINE_ISA": "scalar", "PATH": ""},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "scalar"
    unsupported = next(i for i in ("neon", "avx512", "avx2") if i not in ISAS)
    out = subprocess.run([sys.executable, "-c", code], env={"LUTENGINE_ISA": unsupported}, capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert f"ISA '{unsupported}' is not supported by this CPU" in out.stderr.strip().splitlines()[-1]


def test_concurrent_python_threads_get_correct_results():
    """Calls release the GIL and are serialized in C: concurrent callers each get their own answer."""
    import threading
    rng = np.random.default_rng(9)
    w = lk.Layer(lk.pack(*random_layer(rng, 200, 512, 2, 128, True)))
    xs = [rng.standard_normal((2, 512)).astype(np.float32) for _ in range(4)]
    expect = [lk.gemm(w, x) for x in xs]
    errors = []

    def worker(i):
        for _ in range(50):
            if not np.array_equal(lk.gemm(w, xs[i]), expect[i]):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("P,G,uniform,offsets,scale8", [
    (4, 32, True, False, True), (3, 64, False, True, False), (8, 256, True, True, False), (1, 128, False, False, True),
    (5, 512, True, True, True), (7, 32, True, False, False)])
@pytest.mark.parametrize("exact", [False, True])
def test_integer_gemm_spec_is_the_tables_sums(P, G, uniform, offsets, scale8, exact):
    """The numpy spec of the integer GEMM gives the tables' integers (per plane and combined) in
    both modes."""
    rng = np.random.default_rng(P * 1000 + G)
    w = packed(rng, 37, 512, P, G, offsets, uniform, scale8)  # G = 512 = K: activation blocks of 256
    x = (rng.standard_normal((5, w.K)) * 3).astype(np.float32)
    S = ref.block_sums(w, ref.tables(x, w.K, w.G, exact)[0])
    np.testing.assert_array_equal(ref.int_gemm_sums(w, x, per_plane=True, exact=exact), S)
    np.testing.assert_array_equal(ref.int_gemm_sums(w, x, exact=exact), ref.scaled_sums(w, S))


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e4, 1e30])
def test_fast_tables_fit_int8_as_halves(scale):
    """Fast mode's integers stay within 127, every group's sum of |q| within 254, and every block
    has an even number of odd groups, so the tables' halves fit int8 and cancel; at most one
    value of a block is off by more than half a step (by at most one): at any activation scale
    and for adversarial groups (ties that round up, one dominant value, equal values)."""
    rng = np.random.default_rng(int(np.log10(scale) + 40))
    K = 256
    x = rng.standard_normal((64, K))
    x[:8] = np.tile([63.5, 63.5, 63.5, 61.5], K // 4)  # the largest entry, 254
    x[8:16, ::4] = 1e6
    x[16:24] = 1.0
    x[24:32] = np.round(rng.uniform(-64, 64, (8, K))) + 0.5
    x = (x * scale).astype(np.float32)
    q, ts = ref.act_ints(x, K, 32, False)
    groups = q.reshape(64, K // 4, 4)
    group = np.abs(groups).sum(-1)
    assert np.abs(q).max() <= 127  # the integer GEMM's int8 dot products take them
    assert group.max() <= 254
    assert group[:8].max() == 254  # the bound is reached, so the check above can fail
    odd = (groups.sum(-1) % 2).reshape(64, K // 32, 8).sum(-1)
    assert (odd % 2 == 0).all()  # an even number of odd groups per block: the halves cancel
    off = np.abs(x.reshape(64, K // 32, 32) / np.where(ts > 0, ts, 1)[..., None] - q.reshape(64, K // 32, 32))
    assert off.max() <= 1.0 + 1e-3 and (off > 0.5 + 1e-3).sum(-1).max() <= 1  # one moved value per block


@pytest.mark.parametrize("int8", [True, False], ids=["int8 where the CPU has it", "int16"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("N", [8, 9, 23, 64])
@pytest.mark.parametrize("isa", ISAS)
def test_integer_gemm_equals_the_tables_bit_for_bit(restore_kernel_state, isa, N, exact, int8):
    """Either mode at N >= lut_igemm_rows runs the integer GEMM: its sums equal the spec's, and its
    outputs equal the table path's (one token per call) bit for bit, on every ISA and thread count,
    for uniform and per-plane layers, with and without offsets, 8-bit or fp16 scales; on its int8
    variant (fast mode, AVX-512 with VNNI, VBMI, BITALG) and, switched off, its int16 one."""
    lk.set_int8_gemm(int8)
    rng = np.random.default_rng(N)
    for M, K, P, G, off, uniform, scale8 in [(40, 96, 3, 32, False, True, True), (17, 128, 2, 64, True, False, False),
                                             (33, 512, 8, 256, True, True, False), (20, 512, 4, 512, True, True, True),
                                             (50, 256, 5, 128, True, False, True)]:
        w = packed(rng, M, K, P, G, off, uniform, scale8)
        x = (rng.standard_normal((N, K)) * rng.uniform(0.01, 100)).astype(np.float32)
        y_ref, _ = ref.gemm(w, x, exact)
        spec = ref.int_gemm_sums(w, x, per_plane=True, exact=exact)
        for threads in (1, 2):
            lk.set_isa(isa)
            lk.set_threads(threads)
            per_token = np.concatenate([lk.gemm(w, x[i:i + 1].copy(), exact=exact) for i in range(N)])
            y, acc = run(w, x, exact, isa, threads)
            np.testing.assert_array_equal(acc, spec)
            np.testing.assert_array_equal(y.view(np.int32), per_token.view(np.int32))
            np.testing.assert_array_equal(lk.gemm(w, x, exact=exact).view(np.int32), per_token.view(np.int32))
            assert (np.abs(y - y_ref) <= 1e-5 * magnitude(w, x, spec, exact) + 1e-30).all()
