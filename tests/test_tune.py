"""Block tuning (engine/quant/tune.py): its block pass is calib.py's, its gradients are the
finite differences of its loss, and tuning lowers a block's output error without changing its bits."""
import numpy as np
import pytest

import lutkernels as lk
from engine.quant import calib, hlq, quantize_model, rotate, rtn, settings, tune
from tiny_models import random_weights, tiny_config


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request):
    c = tiny_config(request.param)
    return c, rotate.rotate(c, random_weights(c, 5))


def _block_weights(c, t, i=0):
    p = f"model.layers.{i}."
    W = {k: np.asarray(t[f"{p}{v}.weight"], np.float32) for k, v in tune.KEYS.items()}
    bias = {m: t[f"{p}self_attn.{m}_proj.bias"] for m in "qkv"} if c.qkv_bias else None
    gains = [np.asarray(t[p + n], np.float32) for n in tune.NORMS]
    return W, bias, gains


def _unrotated(t, W):
    """down_proj acting on the MLP activations before the rotation the runtime applies."""
    R = lk.rotation.apply(np.eye(W["down"].shape[1], dtype=np.float32), t["model.mlp_rotation.signs"],
                          t["model.mlp_rotation.mix"])
    return {**W, "down": W["down"] @ R.T}


def test_block_forward_is_the_calibration_pass(tiny):
    c, t = tiny
    W, bias, gains = _block_weights(c, t)
    L, n = 12, 3
    x = np.random.default_rng(1).standard_normal((n * L, c.hidden)).astype(np.float32)
    want = x.copy()
    workers = calib.Workers(2)
    calib._Block(c, t, n, L, workers)(0, want, lambda names, X: [t[m] for m in names])
    workers.close()
    got = tune.Block(c, L, bias).forward(_unrotated(t, W), *gains, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_block_gradients_are_finite_differences(tiny):
    c, t = tiny
    W, bias, gains = _block_weights(c, t)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    W = {k: f64(v) for k, v in _unrotated(t, W).items()}
    bias = None if bias is None else {k: f64(v) for k, v in bias.items()}
    gains = [f64(g) * 1.1 for g in gains]
    L = 8
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2 * L, c.hidden))
    R = rng.standard_normal(x.shape)
    blk = tune.Block(c, L, bias, np.float64)

    def loss(W, g1, g2):
        return float((blk.forward(W, g1, g2, x) * R).sum())
    blk.forward(W, *gains, x, cache=True)
    dW, dg1, dg2 = blk.backward(W, gains[1], R)
    h = 1e-6
    for k in W:
        for _ in range(3):
            i, j = rng.integers(W[k].shape[0]), rng.integers(W[k].shape[1])
            moved = [{**W, k: W[k].copy()} for _ in range(2)]
            moved[0][k][i, j] += h
            moved[1][k][i, j] -= h
            num = (loss(moved[0], *gains) - loss(moved[1], *gains)) / (2 * h)
            assert num == pytest.approx(dW[k][i, j], rel=1e-5, abs=1e-7), k
    for which, grad in ((0, dg1), (1, dg2)):
        j = 3
        up, down = [list(gains), list(gains)]
        up[which], down[which] = gains[which].copy(), gains[which].copy()
        up[which][j] += h
        down[which][j] -= h
        assert (loss(W, *up) - loss(W, *down)) / (2 * h) == pytest.approx(grad[j], rel=1e-5)


@pytest.mark.parametrize("kind", ["rtn8", "rtn16", "hlq"])
def test_layer_starts_at_the_packed_layer_and_differentiates_its_scales(kind):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((32, 128)).astype(np.float32)
    w = hlq.quantize(W, 3, 64) if kind == "hlq" else rtn.quantize(W, 3, 64, scale8=kind == "rtn8")
    layer = tune.Layer(w)
    np.testing.assert_array_equal(lk.dense(layer.packed()), lk.dense(w))
    np.testing.assert_allclose(layer.dense(), lk.dense(w), rtol=1e-6, atol=1e-6)
    G = rng.standard_normal(W.shape)
    grads = layer.grads(G.astype(np.float32))
    h = 1e-3
    for param, grad in zip(layer.params(), grads):
        idx = tuple(rng.integers(s) for s in param.shape)
        param[idx] += h
        up = float((layer.dense().astype(np.float64) * G).sum())
        param[idx] -= 2 * h
        down = float((layer.dense().astype(np.float64) * G).sum())
        param[idx] += h
        assert (up - down) / (2 * h) == pytest.approx(grad[idx], rel=1e-2, abs=1e-3)


def test_tuning_lowers_the_block_error_and_keeps_its_bits(tiny):
    """The tuned block's output on its inputs is closer to the dense block's; x gets that output,
    and the packed layers and gains it leaves compute it."""
    c, t = tiny
    L, n = 16, 4
    tokens = np.random.default_rng(4).integers(0, c.vocab, (n, L))
    s = settings({"method": "gptq", "bits": 2, "group": 32, "rotate": False, "calib": "x.txt"})
    weights, _ = quantize_model(c, t, s, tokens)
    packed = {k: v for k, v in weights.items() if isinstance(v, lk.PackedLinear)}
    x_in = np.asarray(t["model.embed_tokens.weight"])[tokens.ravel()].astype(np.float32)
    x = x_in.copy()
    workers = calib.Workers(2)
    calib._Block(c, t, n, L, workers)(0, x, lambda names, X: [lk.dense(packed[m]) for m in names])
    tuned = dict(packed)
    tensors = dict(t)
    xd = x_in + 0.01  # the dense stream differs from the quantized one upstream
    xd0, dense = xd.copy(), xd.copy()
    calib._Block(c, t, n, L, workers)(0, dense, lambda names, X: [t[m] for m in names])
    before, after = tune.tune_block(c, tensors, tuned, 0, x_in, x, xd, L, 20, workers)
    assert after < 0.7 * before
    np.testing.assert_allclose(xd, dense, rtol=1e-4, atol=1e-4)
    base = np.mean((dense - xd0) ** 2)
    assert np.mean((x - dense) ** 2) / base == pytest.approx(after, rel=1e-4)
    again = x_in.copy()
    calib._Block(c, tensors, n, L, workers)(0, again, lambda names, X: [lk.dense(tuned[m]) for m in names])
    workers.close()
    np.testing.assert_allclose(again, x, rtol=1e-4, atol=1e-4)
    for name, w in packed.items():
        if name.startswith("model.layers.0."):
            assert tuned[name].nbytes() == w.nbytes() and tuned[name].P == w.P
            np.testing.assert_array_equal(tuned[name].planes, w.planes)
            assert not np.array_equal(tuned[name].scales, w.scales)
    assert not np.array_equal(tensors["model.layers.0.input_layernorm.weight"], t["model.layers.0.input_layernorm.weight"])


def test_quantize_model_tunes_every_block_and_leaves_the_callers_tensors(tiny):
    c, t = tiny
    tokens = np.random.default_rng(6).integers(0, c.vocab, (4, 16))
    gains = {n: t[n].copy() for n in t if n.endswith("layernorm.weight")}
    seen = []
    quant = {"method": "gptq", "bits": 2, "group": 32, "calib": "x.txt", "rotate": False}
    plain, _ = quantize_model(c, t, quant, tokens)
    tuned, _ = quantize_model(c, t, {**quant, "tune": 3}, tokens, lambda i, stats, b: seen.append((i, b)))
    assert [i for i, _ in seen] == list(range(c.n_layers)) and all(a < b for _, (b, a) in seen)
    for n, g in gains.items():
        np.testing.assert_array_equal(t[n], g)
    for name, w in plain.items():  # later blocks' codes come from gptq on the tuned stream
        if isinstance(w, lk.PackedLinear) and name.startswith("model.layers."):
            assert tuned[name].nbytes() == w.nbytes()
        if name.startswith("model.layers.0.") and name.endswith("proj.weight"):
            np.testing.assert_array_equal(tuned[name].planes, w.planes)
    assert any(not np.array_equal(tuned[n], plain[n]) for n in gains)


def test_tune_is_a_gptq_setting():
    assert settings(None)["tune"] == 0
    with pytest.raises(ValueError, match="tune is a gptq setting"):
        settings({"method": "rtn", "tune": 2})
    with pytest.raises(ValueError, match="tune must be an integer"):
        settings({"method": "gptq", "tune": -1})
