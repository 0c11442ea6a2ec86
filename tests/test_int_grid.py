"""The integer grid (lutkernels/layout.py int_grid, engine/quant/rtn.py): levels 2h times the
integers -2^(P-1) .. 2^(P-1)-1 with no stored offset, and the sources it keeps exactly."""
import numpy as np
import pytest

import lutkernels as lk
from engine.model import Transformer
from engine.quant import gptq, hlq, quantize_model, rtn
from models import qfile
from models.config import ModelError
from test_qfile import edit_meta, tiny_tok
from tiny_models import random_weights, rewrite_safetensors_header, tiny_config

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def llama_symmetric(rng, M, K, bits, G=32):
    """What llama.cpp's Q4_0 / Q5_0 / Q8_0 dequantize to: d * q per group of 32, d a float16 of
    either sign, q in -2^(b-1) .. 2^(b-1)-1 (Q8_0: |q| <= 127), the largest |q| in every group."""
    n = 2 ** (bits - 1)
    d = (rng.uniform(1e-3, 2e-2, (M, K // G)) * rng.choice([-1, 1], (M, K // G))).astype(np.float16).astype(np.float32)
    q = rng.integers(-n, n, (M, K))
    q[:, ::G] = -n if bits < 8 else rng.choice([-127, 127], (M, K // G))
    return (np.repeat(d, G, axis=1) * q).astype(np.float32)


def k_quant(rng, M, K, G=32):
    """A Q4_K-like source: per group d*q - m, q in 0..15, with neither end of the range always used."""
    d = rng.uniform(1e-3, 2e-2, (M, K // G)).astype(np.float32)
    m = (rng.uniform(0, 8, (M, K // G)) * d).astype(np.float32)
    lo, hi = rng.integers(0, 4, (M, K // G, 1)), rng.integers(12, 16, (M, K // G, 1))
    q = lo + (rng.random((M, K // G, G)) * (hi - lo + 1)).astype(np.int64)
    return (d[..., None] * q - m[..., None]).reshape(M, K).astype(np.float32)


def random_int_layer(rng, M, K, P, G):
    planes = rng.integers(0, 2, (P, M, K)) * 2 - 1
    h = rng.standard_normal((1, M, K // G)).astype(np.float32)
    return planes, h, lk.pack(planes, h, uniform=True, int_grid=True)


def test_levels_are_twice_h_times_the_integers_and_no_offsets_are_stored():
    rng = np.random.default_rng(0)
    planes, h, w = random_int_layer(rng, 32, 64, 3, 32)
    assert w.offsets is None and w.bits_per_weight() == 3 + 16 / 32
    hf = np.repeat(h[0].astype(np.float16).astype(np.float32), 32, axis=1)
    codes = ((planes + 1) // 2 * (1 << np.arange(3))[:, None, None]).sum(0)  # 0 .. 7
    np.testing.assert_allclose(lk.dense(w), 2 * hf * (codes - 4), rtol=1e-6, atol=0)
    with_offsets = lk.pack(planes, h, -h[0], uniform=True)  # the same layer, offsets stored
    assert lk.dense(w).tobytes() == lk.dense(with_offsets).tobytes()


@pytest.mark.parametrize("kwargs", [dict(uniform=False), dict(uniform=True, offsets=np.zeros((4, 2), np.float32))])
def test_int_grid_is_uniform_without_stored_offsets(kwargs):
    offsets = kwargs.pop("offsets", None)
    with pytest.raises(lk.LayoutError, match="integer grid is a uniform layer"):
        lk.pack(np.ones((2, 4, 64)), np.ones((1 if kwargs["uniform"] else 2, 4, 2)), offsets, int_grid=True, **kwargs)


@pytest.mark.parametrize("exact", [False, True])
def test_kernels_match_the_same_layer_with_its_offsets_stored(exact):
    """Implied offsets (-h) and stored ones give the same integer sums and outputs to rounding."""
    rng = np.random.default_rng(1)
    planes, h, w = random_int_layer(rng, 40, 256, 5, 64)
    stored = lk.pack(planes, h, -h[0].astype(np.float16).astype(np.float32), uniform=True)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for isa in lk.supported_isas():
        lk.set_isa(isa)
        acc_i, acc_s = (np.empty((3, 48, 5, 4), np.int32) for _ in range(2))
        y_i, y_s = lk.gemm(w, x, exact=exact, acc=acc_i), lk.gemm(stored, x, exact=exact, acc=acc_s)
        np.testing.assert_array_equal(acc_i, acc_s)
        np.testing.assert_array_equal(y_i, y_s)
    err = np.abs(y_i - x.astype(np.float64) @ lk.dense(w).T.astype(np.float64))
    assert (err <= lk.reference.error_bound(w, x, exact) * 1.001 + 1e-3).all()  # the tables' rounding, no more


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_rtn_keeps_a_llama_symmetric_source_exactly(bits):
    W = llama_symmetric(np.random.default_rng(bits), 48, 256, bits)
    w = rtn.quantize(W, bits, 32, int_grid=True)
    assert w.int_grid and w.bits_per_weight() == bits + 0.5
    np.testing.assert_array_equal(lk.dense(w), W)
    assert not np.array_equal(lk.dense(rtn.quantize(W, bits, 32, symmetric=True)), W)  # the odd grid cannot


def test_int_grid_beats_the_odd_symmetric_grid_on_gaussian_weights():
    W = np.random.default_rng(2).standard_normal((64, 512)).astype(np.float32)
    for bits in (3, 4, 5):
        err = [np.sum((lk.dense(rtn.quantize(W, bits, 32, **kw)) - W) ** 2) for kw in
               (dict(int_grid=True), dict(symmetric=True))]
        assert err[0] < err[1]


def test_rtn_keeps_a_k_quant_source_on_its_lattice():
    """Groups on a 4-bit grid they do not span: rtn finds the lattice (up to float16 steps)."""
    W = k_quant(np.random.default_rng(3), 64, 512)
    err = np.sum((lk.dense(rtn.quantize(W, 4, 32)) - W) ** 2) / np.sum(W ** 2)
    assert err < 1e-6


def test_gptq_keeps_a_layer_already_on_the_int_grid():
    rng = np.random.default_rng(4)
    W = llama_symmetric(rng, 32, 256, 5)
    X = rng.standard_normal((512, 256)).astype(np.float32)
    f = gptq.factor(X.T.astype(np.float64) @ X / len(X), True)
    p = gptq.quantize(W, f, 32, lambda Wg: hlq.rtn_grid(Wg, 5, int_grid=True))
    np.testing.assert_array_equal(lk.dense(p.packed(int_grid=True)), W)


@pytest.fixture
def tiny():
    c = tiny_config()
    return c, random_weights(c)


def test_model_file_round_trips_and_a_bad_flag_is_refused(tiny, tmp_path):
    c, t = tiny
    quant = {"grid": "int", "bits": 5, "layers": {"*.mlp.down_proj.weight": {"grid": "rtn", "bits": 4}}}
    weights, info = quantize_model(c, t, quant)
    path = qfile.write(tmp_path / "int.lut.safetensors", c, weights, tiny_tok(), info=info)
    q = qfile.load(path)
    assert q.packed[Q_PROJ].int_grid and q.meta["tensors"][Q_PROJ]["int_grid"] is True
    assert q.packed[Q_PROJ].offsets is None and q.packed["model.layers.0.mlp.down_proj.weight"].offsets is not None
    assert q.packed["lm_head.weight"].int_grid  # the head rounds to the settings' grid too
    ids = np.arange(12) % c.vocab
    np.testing.assert_array_equal(Transformer.from_qfile(q).forward(ids, 0, all_logits=True),
                                  Transformer(c, weights).forward(ids, 0, all_logits=True))
    rewrite_safetensors_header(path, edit_meta(lambda m: m["tensors"]["model.layers.0.mlp.down_proj.weight"]
                                               .update(int_grid=True)))
    with pytest.raises(ModelError, match="int_grid needs a uniform layer without stored offsets"):
        qfile.load(path)


def test_files_of_5_bits_and_more_run_exact_tables_and_come_closer_to_their_weights(tiny, monkeypatch):
    """engine.model.exact_tables: at 5.5 bpw every LUT layer (head included) builds exact tables,
    and the logits come closer to the float computation on the same (dequantized) weights than
    with int8 tables, in one pass and token by token; the default 4.5-bpw format keeps int8 tables."""
    import engine.model as em

    c, t = tiny
    weights, _ = quantize_model(c, t, {"grid": "int", "bits": 5})
    assert not Transformer(c, quantize_model(c, t, {})[0]).exact
    dense = {n: lk.dense(w) if isinstance(w, lk.PackedLinear) else w for n, w in weights.items()}
    ids = np.arange(16) % c.vocab
    ref = Transformer(c, dense).forward(ids, 0, all_logits=True)

    def errors():
        m = Transformer(c, weights)
        one = m.forward(ids, 0, all_logits=True).copy()
        m.reset()
        steps = np.stack([m.forward([tok], i).copy() for i, tok in enumerate(ids)])
        return m, np.abs(one - ref).max(), np.abs(steps - ref).max()

    m, exact_one, exact_steps = errors()
    assert m.exact and m.head.exact and all(lin.exact for lin in (m.blocks[0].q, m.blocks[-1].down))
    monkeypatch.setattr(em, "EXACT_BPW", 6.0)
    m, fast_one, fast_steps = errors()
    assert not m.exact
    assert exact_one < fast_one / 4 and exact_steps < fast_steps / 4
