"""Trellis-coded layers: the format (lutkernels/trellis.py), its C kernels (c/trellis.c), the Viterbi
quantizer under GPTQ (engine/quant/trellis.py, loops.viterbi), and files and models that hold them."""
import itertools

import numpy as np
import pytest

import lutkernels as lk
from engine.model import Transformer
from engine.quant import gptq, hlq, quantize_model, settings, trellis
from engine.quant.loops import viterbi
from lutkernels import trellis as fmt
from models import qfile
from models.config import ModelError
from test_qfile import edit_meta
from test_quantizers import correlated_inputs, output_error
from models.source import TokenizerInfo
from tiny_models import random_weights, rewrite_safetensors_header, tiny_config, tiny_tokenizer

TOK = TokenizerInfo(tiny_tokenizer(), None, (), False, None)


def random_layer(rng, M, K, k):
    """A layer from random stream bits: every path is a valid one."""
    Mt, L = -(-M // 16), k + fmt.MEMORY
    bits = rng.integers(0, 2, (K, fmt.MEMORY + 16 * k * Mt))
    at = k * np.arange(M)[:, None] + np.arange(L)
    win = (bits[:, at] << np.arange(L)).sum(-1).T
    return fmt.pack(win, (rng.random(M) * 0.01).astype(np.float32), k), win


@pytest.mark.parametrize("k", range(1, fmt.MAX_BITS + 1))
@pytest.mark.parametrize("M,K", [(40, 64), (17, 96), (64, 256)])
def test_streams_hold_exactly_the_windows_packed(k, M, K):
    w, win = random_layer(np.random.default_rng(k), M, K, k)
    np.testing.assert_array_equal(fmt.windows(w)[:M], win)
    assert w.nbytes() == w.streams.nbytes + w.scales.nbytes
    assert w.bits_per_weight() == 8 * (K * (2 * k * w.tiles + 1) + fmt.SLACK + 4 * 16 * w.tiles) / (M * K)


def test_pack_refuses_windows_that_are_no_path():
    _, win = random_layer(np.random.default_rng(0), 16, 32, 3)
    win[5, 7] ^= 1  # a state bit the previous row's window disagrees with
    with pytest.raises(fmt.TrellisError, match="not a trellis path"):
        fmt.pack(win, np.ones(16, np.float32), 3)
    with pytest.raises(fmt.TrellisError, match="1..6"):
        fmt.check_shape(16, 32, 7)


def test_value_is_near_gaussian():
    v = fmt.value(np.arange(1 << 12))
    assert abs(v.mean()) < 5 and abs(v.std() / fmt.VALUE_STD - 1) < 0.02 and np.abs(v).max() <= 510


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("M,K,N", [(40, 64, 1), (17, 96, 3), (64, 256, 5)])
def test_every_isa_computes_the_reference_block_sums(k, M, K, N):
    rng = np.random.default_rng(10 * k + N)
    w, _ = random_layer(rng, M, K, k)
    x = rng.standard_normal((N, K)).astype(np.float32)
    ref, outs = fmt.block_sums(w, x), []
    try:
        for isa in lk.supported_isas():
            lk.set_isa(isa)
            acc = np.empty((N, w.tiles * 16, K // 32), np.int32)
            outs.append(lk.gemm(w, x, acc=acc))
            np.testing.assert_array_equal(acc, ref, err_msg=isa)
            np.testing.assert_array_equal(lk.gemv(w, x[0]), outs[-1][0])
    finally:
        lk.set_isa(lk.supported_isas()[-1])
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])  # the same float operations on every path
    np.testing.assert_allclose(outs[0], fmt.gemm(w, x), rtol=1e-5, atol=1e-6 * np.abs(outs[0]).max())
    dense = x @ lk.dense(w).T  # int8 activations cost about 1% here
    assert np.abs(outs[0] - dense).max() < 0.03 * np.abs(dense).max()


@pytest.mark.parametrize("k,m,n", [(1, 2, 6), (2, 2, 4), (1, 3, 5)])
def test_viterbi_finds_the_best_path(k, m, n):
    """Against every stream of m + k*n bits."""
    rng = np.random.default_rng(n)
    C, z, wt = rng.standard_normal(1 << (k + m)), rng.standard_normal(n), rng.random(n) + 0.5
    best = np.inf
    for bits in itertools.product((0, 1), repeat=m + k * n):
        b = np.array(bits)
        u = [(b[k * i:k * i + k + m] << np.arange(k + m)).sum() for i in range(n)]
        best = min(best, float((wt * (z - C[u]) ** 2).sum()))
    u = viterbi(z, wt, C, k, m)
    assert np.all(u[1:] & ((1 << m) - 1) == u[:-1] >> k)
    assert (wt * (z - C[u]) ** 2).sum() == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_on_the_trellis_grid_beats_the_rtn_grid_at_equal_bits(bits):
    """Gaussian weights (as a rotated model has): the trellis layer's output error is well below gptq on
    the rtn grid with one scale and offset per row, at the same bits up to the trellis layer's
    float32 row scales and 8 state bits per column (0.19 bpw on this small layer)."""
    rng = np.random.default_rng(bits)
    W = (rng.standard_normal((128, 256)) * 0.02).astype(np.float32)
    X = correlated_inputs(rng, 2048, 256)
    f = gptq.factor(X.T.astype(np.float64) @ X / len(X), act_order=True)
    t = trellis.quantize(W, f, bits)
    r = gptq.quantize(W, f, 256, lambda Wg: hlq.rtn_grid(Wg, bits, False)).packed()
    assert t.bits_per_weight() < r.bits_per_weight() + 0.1
    assert output_error(W, lk.dense(t), X) < 0.85 * output_error(W, lk.dense(r), X)


@pytest.fixture(scope="module")
def tiny():
    c = tiny_config()
    return c, random_weights(c, seed=5)


def test_trellis_model_round_trips_through_the_file(tiny, tmp_path):
    c, t = tiny
    tokens = np.random.default_rng(1).integers(0, c.vocab, (4, 32))
    quant = {"method": "gptq", "grid": "trellis", "bits": 3, "calib": "c4",
             "layers": {"*.mlp.down_proj.weight": {"bits": 4}}}
    weights, info = quantize_model(c, t, quant, tokens)
    down = "model.layers.1.mlp.down_proj.weight"
    assert isinstance(weights[down], lk.TrellisLinear) and weights[down].k == 4
    assert info[down] == {"method": "gptq+trellis", "bits": 4}
    path = qfile.write(tmp_path / "t.safetensors", c, weights, TOK, info=info, quantizer=settings(quant))
    qf = qfile.load(path)
    assert qf.meta["tensors"][down] == {"format": "trellis", "method": "gptq+trellis", "bits": 4, "M": c.hidden,
                                        "K": c.ffn, "bpw": weights[down].bits_per_weight()}
    ids = [1, 2, 3, 4]
    np.testing.assert_array_equal(Transformer(c, qf.weights).forward(ids, 0), Transformer(c, weights).forward(ids, 0))
    dense = dict(weights)
    for name, w in weights.items():
        if isinstance(w, lk.TrellisLinear):
            dense[name] = lk.dense(w)
    got, want = Transformer(c, qf.weights).forward(ids, 0), Transformer(c, dense).forward(ids, 0)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # the kernels' int8 activations


def test_a_trellis_tensor_that_disagrees_with_its_metadata_is_a_clear_error(tiny, tmp_path):
    c, t = tiny
    tokens = np.random.default_rng(2).integers(0, c.vocab, (2, 32))
    quant = {"method": "gptq", "grid": "trellis", "bits": 2, "calib": "c4"}
    weights, info = quantize_model(c, t, quant, tokens)
    path = qfile.write(tmp_path / "t.safetensors", c, weights, TOK, info=info)
    name = "model.layers.0.self_attn.q_proj.weight"

    rewrite_safetensors_header(path, edit_meta(lambda m: m["tensors"][name].update(bits=3)))
    want = rf"{name}\.streams is uint8 \[1104\]; metadata \(trellis, M=64, K=64, bits=3\) needs U8 \[1616\]"
    with pytest.raises(ModelError, match=want):
        qfile.load(path)


def test_trellis_settings_are_checked():
    assert settings({"method": "gptq", "bpw": 3.3})["grid"] == "trellis"
    assert settings({"method": "gptq", "bpw": 4.5})["grid"] == "rtn"
    assert settings({"method": "gptq", "bits": 3})["grid"] == "rtn"
    assert settings({"method": "gptq", "grid": "trellis"})["act_order"] is True
    once = settings({"method": "gptq", "grid": "trellis", "bits": 2})
    assert settings(once) == once  # quantize_model checks the CLI's settings again
    with pytest.raises(ValueError, match="1..6 bits, got 8"):
        settings({"method": "gptq", "grid": "trellis", "bits": 8})
    with pytest.raises(ValueError, match="scale_bits does not apply"):
        settings({"method": "gptq", "grid": "trellis", "bits": 3, "scale_bits": 8})
    with pytest.raises(ValueError, match="--symmetric does not apply"):
        settings({"method": "gptq", "grid": "trellis", "symmetric": True})
    with pytest.raises(ValueError, match="not the trellis grid"):
        settings({"method": "gptq", "grid": "trellis", "tune": 1})
    with pytest.raises(ValueError, match="unknown gptq grid"):
        settings({"method": "gptq", "grid": "lattice"})
