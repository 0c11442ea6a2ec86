"""HLQ, GPTQ and the calibration pass (engine/quant/hlq.py, gptq.py, calib.py, __init__.py)."""
import numpy as np
import pytest

import lutkernels as lk
from engine.model import Transformer, rmsnorm
from engine.quant import DEFAULT, calib, check_model, gptq, hlq, layer_settings, quantize_model, rotate, rtn, settings
from engine.tokenizer import Tokenizer
from tiny_models import random_weights, tiny_config, tiny_tokenizer

WORDS = "the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea".split()


def heavy_tailed(rng, M, K):
    """Weights with outliers, as trained layers have (and as rtn grids handle badly)."""
    return (rng.standard_t(4, (M, K)) * 0.02).astype(np.float32)


def correlated_inputs(rng, N, K):
    """Activations with correlated features and a few loud channels, so the Hessian is far from diagonal."""
    X = rng.standard_normal((N, K)) @ (np.eye(K) + 0.5 * rng.standard_normal((K, K)) / np.sqrt(K))
    X[:, rng.choice(K, 4, replace=False)] *= 10
    return X.astype(np.float32)


def output_error(W, Wq, X):
    return np.linalg.norm(X @ (Wq - W).T) / np.linalg.norm(X @ W.T)


def group_sse(W, Wq, G):
    M, K = W.shape
    return ((Wq.astype(np.float64) - W) ** 2).reshape(M, K // G, G).sum(-1)


def gptq_planes(W, X, bits, G, grid="rtn", act_order=False, symmetric=False):
    f = gptq.factor(X.T.astype(np.float64) @ X / len(X), act_order)
    fit = (lambda Wg: hlq.rtn_grid(Wg, bits, symmetric, int_grid=grid == "int")) if grid in ("rtn", "int") else \
        (lambda Wg: hlq.fit_groups(Wg, bits, symmetric)[0])
    return gptq.quantize(W, f, G, fit)


# ---- HLQ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hlq_never_does_worse_than_its_rtn_start_in_any_group(bits, G, symmetric):
    W = heavy_tailed(np.random.default_rng(bits * G), 48, 256)
    W[3, :G] = 0.5  # a constant group: planes collinear with the offset
    f = hlq.fit(W, bits, G, symmetric)
    start = group_sse(W, rtn.reconstruct(rtn.codes(W, bits, G, symmetric)), G)
    got = group_sse(W, f.dense(), G)
    assert (got <= start).all()
    if bits > 1:
        assert got.sum() < 0.95 * start.sum()  # and it does better overall


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hlq_packed_layer_is_exactly_what_it_chose(bits, symmetric):
    rng = np.random.default_rng(1)
    W = heavy_tailed(rng, 40, 128)  # 40 rows: the last tile is padded
    f = hlq.fit(W, bits, 32, symmetric)
    packed = f.packed()
    np.testing.assert_array_equal(lk.dense(packed), f.dense())
    planes, scales, offsets = lk.unpack(packed)
    np.testing.assert_array_equal(scales, f.scales)
    assert (offsets is None) == symmetric
    # every weight sits on one of its group's 2^b levels, the nearest one
    lev = hlq.levels(f.scales.reshape(bits, -1), None if symmetric else f.offset.reshape(-1))
    dist = np.abs(W.reshape(-1, 32, 1) - lev[:, None, :])
    chosen = np.abs(W - f.dense()).reshape(-1, 32)
    np.testing.assert_allclose(chosen, dist.min(-1), rtol=0, atol=1e-7)


def test_hlq_scales_are_float16_values_and_plane_scales_differ():
    W = heavy_tailed(np.random.default_rng(2), 16, 64)
    f = hlq.fit(W, 3, 32)
    np.testing.assert_array_equal(f.scales, f.scales.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(f.offset, f.offset.astype(np.float16).astype(np.float32))
    assert not f.packed().uniform  # per-plane scales are stored as such


def test_grid_rounds_to_the_nearest_level():
    rng = np.random.default_rng(3)
    grid = hlq.Grid(rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32))
    w = rng.standard_normal((5, 200)).astype(np.float32) * 3
    codes, values = grid.round(w)
    lev = hlq.levels(grid.scales, grid.offset)
    np.testing.assert_array_equal(values, np.take_along_axis(lev, codes.astype(np.intp), 1))
    np.testing.assert_allclose(np.abs(values - w), np.abs(w[..., None] - lev[:, None]).min(-1), atol=1e-6)


# ---- GPTQ -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("grid", ["rtn", "hlq", "int"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_calibration_output_error_at_equal_bits(bits, grid, act_order):
    rng = np.random.default_rng(bits)
    W, X = heavy_tailed(rng, 64, 256), correlated_inputs(rng, 2048, 256)
    p = gptq_planes(W, X, bits, 64, grid, act_order)
    base = hlq.fit(W, bits, 64) if grid == "hlq" else rtn.to_packed(rtn.codes(W, bits, 64, int_grid=grid == "int"))
    base = base.packed() if grid == "hlq" else base
    assert p.packed(int_grid=grid == "int").bits_per_weight() == base.bits_per_weight()
    assert output_error(W, p.dense(), X) < 0.95 * output_error(W, lk.dense(base), X)


@pytest.mark.parametrize("grid", ["rtn", "hlq", "int"])
@pytest.mark.parametrize("G", [32, 256, 512])  # 512: one group per row, as a --bpw plan may choose
def test_gptq_packed_layer_is_exactly_what_it_chose(grid, G):
    rng = np.random.default_rng(4)
    W, X = heavy_tailed(rng, 24, 512), correlated_inputs(rng, 1024, 512)
    p = gptq_planes(W, X, 3, G, grid, act_order=True)
    packed = p.packed(int_grid=grid == "int")
    np.testing.assert_array_equal(lk.dense(packed), p.dense())
    assert packed.uniform == (grid != "hlq")  # a uniform grid stores one scale per group
    assert (packed.offsets is None) == packed.int_grid == (grid == "int")


def test_gptq_without_correlations_is_round_to_nearest():
    """H = I: no error has anywhere to go, so every column rounds to the rtn grid of its group."""
    W = heavy_tailed(np.random.default_rng(5), 32, 128)
    f = gptq.factor(np.eye(128))
    p = gptq.quantize(W, f, 32, lambda Wg: hlq.rtn_grid(Wg, 3))
    want = rtn.reconstruct(rtn.codes(W, 3, 32))
    assert np.mean(p.dense() == want) > 0.999


def test_gptq_rows_are_independent():
    """Row blocks quantized apart give the layer quantized whole, so layers can be split across cores."""
    rng = np.random.default_rng(6)
    W, X = heavy_tailed(rng, 40, 128), correlated_inputs(rng, 512, 128)
    f = gptq.factor(X.T.astype(np.float64) @ X / len(X), act_order=True)
    fit = lambda Wg: hlq.fit_groups(Wg, 2)[0]  # noqa: E731
    whole = gptq.quantize(W, f, 64, fit)
    split = hlq.stack_rows([gptq.quantize(W[:17], f, 64, fit), gptq.quantize(W[17:], f, 64, fit)])
    np.testing.assert_array_equal(split.dense(), whole.dense())


def test_factor_is_the_upper_cholesky_of_the_damped_inverse_hessian():
    rng = np.random.default_rng(7)
    X = correlated_inputs(rng, 600, 300)
    X[:, 7] = 0  # an input never active
    H = X.T.astype(np.float64) @ X / len(X)
    for act_order in (False, True):
        f = gptq.factor(H, act_order)
        d = np.diag(H).copy()
        d[7] = 1
        perm = np.argsort(-d, kind="stable") if act_order else np.arange(300)
        np.testing.assert_array_equal(f.perm, perm)
        Hd = H.copy()
        Hd[np.diag_indices(300)] = d + gptq.DAMP * d.mean()
        np.testing.assert_array_equal(np.triu(f.U), f.U)
        np.testing.assert_allclose(f.U.T.astype(np.float64) @ f.U, np.linalg.inv(Hd[np.ix_(perm, perm)]),
                                   rtol=0, atol=2e-5 * np.abs(np.linalg.inv(Hd)).max())


def test_aim_solves_the_damped_least_squares_to_the_dense_output():
    """aim is `mix` of the way from W to argmin_V ||X Vᵀ - Xd Wᵀ||² + damping·||V - W||²: its normal
    equations hold, and with no upstream error it is W."""
    rng = np.random.default_rng(13)
    X = correlated_inputs(rng, 800, 96)
    X[:, 5] = 0  # an input never active: damped like gptq.factor damps it
    Xd = X @ (np.eye(96) + 0.1 * rng.standard_normal((96, 96))).astype(np.float32)  # upstream error, linear in X
    W = heavy_tailed(rng, 24, 96)
    H = X.T.astype(np.float64) @ X / 800
    D = X.T.astype(np.float64) @ ((Xd - X).astype(np.float64) @ W.T) / 800
    d = np.diag(H).copy()
    d[5] = 1
    Hd = H.copy()
    Hd[np.diag_indices(96)] = d + gptq.DAMP * d.mean()
    workers = calib.Workers(2)
    for act_order in (False, True):
        f = gptq.factor(H, act_order)
        V = gptq.aim(W, f, D, 1.0).astype(np.float64)
        np.testing.assert_allclose(gptq.aim(W, f, D, 1.0, workers), V, rtol=0, atol=1e-6 * np.abs(V).max())
        np.testing.assert_allclose((V - W) @ Hd, D.T, rtol=0, atol=1e-4 * np.abs(D).max())
        np.testing.assert_array_equal(gptq.aim(W, f, D, 0.0), W)
        np.testing.assert_array_equal(gptq.aim(W, f, 0 * D, 1.0), W)
        np.testing.assert_allclose(gptq.aim(W, f, D, 0.3), 0.3 * V + 0.7 * W, rtol=0, atol=1e-5)
    workers.close()
    # the full target matches the dense output better than W itself does, on the inputs it was fitted to
    assert np.linalg.norm(X @ V.T - Xd @ W.T) < 0.9 * np.linalg.norm(X @ W.T - Xd @ W.T)


@pytest.mark.parametrize("rows", [[8], [10, 6, 6], [40, 24, 24]])
def test_dense_products_are_xt_dx_wt_in_either_order(rows):
    """Few rows go through (Xd - X) Wᵀ, many through Xᵀ(Xd - X): both are Xᵀ (Xd - X) Wᵀ / N."""
    rng = np.random.default_rng(14)
    X = correlated_inputs(rng, 9000, 64)  # more than one row block of the sums
    Xd = X + 0.1 * rng.standard_normal(X.shape).astype(np.float32)
    Ws = [heavy_tailed(rng, m, 64) for m in rows]
    workers = calib.Workers(2)
    try:
        got = calib.dense_products(Xd, X, Ws, workers)
    finally:
        workers.close()
    for W, g in zip(Ws, got):
        want = X.T.astype(np.float64) @ ((Xd - X).astype(np.float64) @ W.T) / len(X)
        assert g.shape == want.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-4 * np.abs(want).max())


# ---- calibration and the model pass ---------------------------------------------------------------

@pytest.fixture(params=["llama", "qwen2"])
def tiny(request):
    c = tiny_config(request.param)
    return c, random_weights(c, 3)


@pytest.mark.parametrize("rot", [False, True])
def test_calibration_forward_is_the_transformer(tiny, rot):
    """Rotated, the MLP rotation too is applied as the runtime applies it."""
    c, t = tiny
    t = rotate.rotate(c, t) if rot else t
    tokens = np.random.default_rng(8).integers(0, c.vocab, (3, 40))
    workers = calib.Workers(2)
    seen = []

    def fit(names, X):
        seen.append(names)
        return [t[n] for n in names]
    *_, (last, x) = calib.layers(c, t, tokens, fit, workers)
    workers.close()
    assert last == c.n_layers - 1 and len(seen) == 4 * c.n_layers
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    logits = rmsnorm(x, t["model.norm.weight"], c.norm_eps) @ head.T
    m = Transformer(c, t)
    for s, seq in enumerate(tokens):
        m.reset()
        np.testing.assert_allclose(logits[s * 40:(s + 1) * 40], m.forward(seq, 0, all_logits=True),
                                   rtol=1e-4, atol=1e-4)


def test_dense_inputs_are_what_the_dense_model_feeds_each_layer(tiny):
    """With dense_inputs, fit also gets each layer's input in the dense model for that many leading
    sequences, while the stream it returns weights for runs on its own (here: perturbed) weights."""
    c, t = tiny
    tokens = np.random.default_rng(14).integers(0, c.vocab, (2, 24))
    workers = calib.Workers(2)
    dense = {}

    def record(names, X):
        dense[names[0]] = X.copy()
        return [t[n] for n in names]
    for _ in calib.layers(c, t, tokens, record, workers):
        pass
    got, own = {}, {}

    def fit(names, X, Xd):
        got[names[0]], own[names[0]] = Xd.copy(), X.copy()
        return [t[n] * 0.9 for n in names]
    for _ in calib.layers(c, t, tokens, fit, workers, dense_inputs=1):
        pass
    workers.close()
    assert got.keys() == dense.keys() and len(got) == 4 * c.n_layers
    for n in dense:
        # the first sequence's rows (fewer rows block the products differently: last-bit differences)
        np.testing.assert_allclose(got[n], dense[n][:24], rtol=1e-5, atol=1e-5)
    assert not np.allclose(own["model.layers.1.mlp.down_proj.weight"], dense["model.layers.1.mlp.down_proj.weight"])


def test_loops_round_to_float16_as_numpy_does():
    from engine.quant import loops

    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.uniform(-9, 5, 4000),
                        [0.0, 65504.0, 7e4, -1e9, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1.5 * 2.0**-24, 1 + 2.0**-11]])
    want = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal([loops._f16(v) for v in x], want)


@pytest.mark.parametrize("bits", [1, 2, 4, 6])  # counted midpoints up to 16 levels, binary search above
def test_grid_rounding_picks_the_nearest_level(bits):
    rng = np.random.default_rng(bits)
    Wg = rng.standard_normal((50, 64)).astype(np.float32)
    grid = hlq.fit_groups(Wg, bits)[0]
    codes, values = grid.round(Wg)
    lev = hlq.levels(grid.scales, grid.offset)
    dist = np.abs(lev[:, None, :].astype(np.float64) - Wg[:, :, None])
    np.testing.assert_array_equal(np.abs(values - Wg.astype(np.float64)), dist.min(-1))
    np.testing.assert_array_equal(values, np.take_along_axis(lev, codes.astype(np.intp), 1))


@pytest.mark.parametrize("K", [64, calib.ROWS + 40])  # the sum of the threads' parts in one row block, and in two
def test_hessian_is_the_mean_outer_product(K):
    X = np.random.default_rng(9).standard_normal((1000, K)).astype(np.float32)
    workers = calib.Workers(2)
    np.testing.assert_allclose(calib.hessian(X, workers), X.T.astype(np.float64) @ X / 1000, rtol=1e-5, atol=1e-6)
    workers.close()


def test_calibration_tokens_are_evenly_spaced_windows():
    tok = tiny_tokenizer("llama")
    from models.source import TokenizerInfo

    info = TokenizerInfo(tok, 256, (258,), True, None)
    text = " ".join(np.random.default_rng(12).choice(WORDS, 600))
    ids = Tokenizer(info).encode(text, add_bos=False)
    got = calib.tokens(text, info, 5, 50)
    assert got.shape == (5, 50) and got.dtype == np.int64
    starts = [next(i for i in range(len(ids)) if ids[i:i + 50] == list(row)) for row in got]
    assert starts[0] == 0 and starts[-1] == len(ids) - 50
    assert all(b - a >= 50 for a, b in zip(starts, starts[1:]))  # no overlap
    with pytest.raises(ValueError, match="calibration sequences of 50 need"):
        calib.tokens(" ".join(WORDS), info, 5, 50)


def test_unreadable_calibration_text_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the calibration text"):
        calib.read_text(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        calib.read_text(tmp_path / "bad.txt")


@pytest.mark.parametrize("grid", ["rtn", "hlq"])
def test_gptq_model_beats_its_grid_on_calibration_output_error(tiny, grid):
    """Layer by layer on the outputs of quantized layers: every layer's output error is lower with gptq."""
    c, t = tiny
    tokens = np.random.default_rng(10).integers(0, c.vocab, (8, 48))
    errors = {}
    for method in ("gptq", grid):
        stats = {}
        quantize_model(c, t, {"method": method, "grid": grid, "bits": 2, "calib": "c4"}, tokens,
                       lambda i, s, tuned: stats.update(s))
        assert len(stats) == 7 * c.n_layers
        errors[method] = stats
    g, base = errors["gptq"], errors[grid]
    assert all(g[n][1] == base[n][1] for n in g)  # same bits per weight
    assert sum(e for e, _, _ in g.values()) < 0.95 * sum(e for e, _, _ in base.values())
    assert np.mean([g[n][0] < base[n][0] for n in g]) > 0.8


def test_quantize_model_with_calibration_runs_and_records_the_method(tiny):
    c, t = tiny
    tokens = np.random.default_rng(11).integers(0, c.vocab, (4, 32))
    quant = {"method": "gptq", "grid": "hlq", "bits": 3, "calib": "c4", "act_order": True,
             "layers": {"*.mlp.down_proj.weight": {"bits": 4}}}
    weights, info = quantize_model(c, t, quant, tokens)
    down, q = "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert info[down] == {"method": "gptq+hlq", "bits": 4} and info[q] == {"method": "gptq+hlq", "bits": 3}
    assert weights[down].P == 4 and weights[q].P == 3
    assert info["lm_head.weight"] == {"method": "rtn", "bits": DEFAULT["head_bits"]}
    logits = Transformer(c, weights).forward([1, 2, 3], 0)
    assert np.isfinite(logits).all()


def test_rtn_and_hlq_need_no_calibration(tiny):
    c, t = tiny
    for method in ("rtn", "hlq"):
        stats = {}
        weights, info = quantize_model(c, t, {"method": method, "bits": 3}, None, lambda i, s, tuned: stats.update(s))
        assert {v["method"] for n, v in info.items() if n != "lm_head.weight"} == {method}
        assert all(0 < e < 0.3 for e, _, _ in stats.values())


# ---- settings -------------------------------------------------------------------------------------

def test_settings_defaults_and_keys():
    assert settings(None) == {**DEFAULT, "scale_bits": 8, "grid": "rtn", "act_order": False, "rotate": False, "dense_target": 0.0}
    assert set(DEFAULT) == {"method", "bits", "group", "symmetric", "scale_bits", "head_bits", "grid", "act_order",
                            "rotate", "calib", "n_calib", "calib_len", "layers", "bpw", "dense_target", "tune"}
    s = settings({"method": "gptq", "grid": "hlq", "calib": "c4.txt", "layers": {"*down*": {"bits": 4}}})
    assert s["method"] == "gptq" and s["layers"] == {"*down*": {"bits": 4}}


def test_act_order_defaults_on_under_a_budget_only():
    assert settings({"method": "gptq", "calib": "c4.txt"})["act_order"] is False
    assert settings({"method": "gptq", "calib": "c4.txt", "bpw": 3.3})["act_order"] is True
    assert settings({"method": "gptq", "calib": "c4.txt", "bpw": 3.3, "act_order": False})["act_order"] is False


def test_dense_target_defaults_on_for_gptq_at_3_bits_or_below_4_bpw():
    assert settings({"method": "gptq", "calib": "c4.txt", "bits": 3})["dense_target"] == 0.15
    assert settings({"method": "gptq", "calib": "c4.txt", "bits": 4})["dense_target"] == 0
    assert settings({"method": "gptq", "calib": "c4.txt", "bits": 4, "dense_target": 0.5})["dense_target"] == 0.5
    assert settings({"method": "gptq", "calib": "c4.txt", "bits": 3, "dense_target": 0})["dense_target"] == 0
    assert settings({"method": "gptq", "calib": "c4.txt", "bpw": 3.3})["dense_target"] == 0.15
    assert settings({"method": "gptq", "calib": "c4.txt", "bpw": 4.5})["dense_target"] == 0
    assert settings({"method": "hlq"})["dense_target"] == 0
    with pytest.raises(ValueError, match="dense_target is a gptq setting"):
        settings({"method": "rtn", "dense_target": 0.5})
    with pytest.raises(ValueError, match="dense_target must be a number from 0 to 1"):
        settings({"method": "gptq", "calib": "c4.txt", "dense_target": 1.5})


def test_rotate_defaults_on_for_gptq_below_4_bits_per_weight():
    assert settings({"method": "gptq", "calib": "c4.txt"})["rotate"] is True
    assert settings({"method": "gptq", "calib": "c4.txt", "rotate": False})["rotate"] is False
    assert settings({"method": "gptq", "calib": "c4.txt", "bpw": 3.3})["rotate"] is True
    assert settings({"method": "gptq", "calib": "c4.txt", "bpw": 4.5})["rotate"] is False
    assert settings({"method": "hlq"})["rotate"] is False
    with pytest.raises(ValueError, match="rotate must be true or false"):
        settings({"rotate": "yes"})


@pytest.mark.parametrize("quant, message", [
    ({"method": "awq"}, "unknown quantization method 'awq'"),
    ({"grid": "nf4"}, "unknown gptq grid"),
    ({"bits": 0}, "bits must be an integer 1..8"),
    ({"bits": 9}, "bits must be an integer 1..8"),
    ({"bits": True}, "bits must be an integer"),
    ({"group": 16}, "group must be an integer of at least 32"),
    ({"n_calib": 0}, "n_calib must be"),
    ({"act_order": "yes"}, "act_order must be true or false"),
    ({"layers": {"*down*": {"bits": 9}}}, r"bits \(layer override '\*down\*'\) must be"),
    ({"layers": {"*down*": {"method": "hlq"}}}, "may only set bits, group, scale_bits, grid"),
    ({"colour": 1}, "unknown quantizer settings: colour"),
    ({"scale_bits": 12}, "scale_bits must be 16 or 8, got 12"),
    ({"method": "hlq", "scale_bits": 8}, r"8-bit scales are made on the rtn grid \(method rtn or gptq\), not hlq"),
    ({"method": "gptq", "grid": "hlq", "calib": "c", "layers": {"*": {"scale_bits": 8}}}, "not gptq\\+hlq"),
    ({"layers": {"*down*": {"scale_bits": 4}}}, r"scale_bits \(layer override '\*down\*'\) must be 16 or 8"),
    ({"grid": "hlq"}, "rtn rounds to the rtn or int grid, not 'hlq'"),
    ({"grid": "int", "symmetric": True}, "the integer grid takes 2..8 bits on 16-bit scales and is symmetric by itself"),
    ({"grid": "int", "scale_bits": 8}, "the integer grid takes"),
    ({"grid": "int", "bits": 1}, "the integer grid takes"),
    ({"layers": {"*down*": {"grid": "int", "bits": 1}}}, r"the integer grid \(layer override '\*down\*'\) takes"),
    ({"layers": {"*down*": {"grid": "int", "scale_bits": 8}}}, r"the integer grid \(layer override '\*down\*'\)"),
    ({"layers": {"*down*": {"grid": "hlq"}}}, "a grid override swaps the rtn and int grids"),
    ({"method": "gptq", "grid": "hlq", "calib": "c", "layers": {"*down*": {"grid": "int"}}},
     r"a grid override swaps the rtn and int grids \(settings grid 'hlq'\)"),
])
def test_bad_settings_are_one_line_errors(quant, message):
    with pytest.raises(ValueError, match=message):
        settings(quant)


@pytest.mark.parametrize("quant, scale_bits", [
    ({}, 8), ({"bits": 2}, 8), ({"bits": 8}, 16), ({"layers": {"*down*": {"bits": 6}}}, 16),
    ({"method": "hlq"}, 16), ({"bits": 8, "scale_bits": 8}, 8), ({"method": "gptq", "calib": "c"}, 8),
    ({"method": "gptq", "grid": "hlq", "calib": "c"}, 16), ({"bpw": 4.5}, None),  # None: the plan picks per layer
    ({"grid": "int"}, 16),  # the integer grid stores no offsets: 16-bit scales
])
def test_scale_bits_default_to_8_where_rtn_offsets_reach(quant, scale_bits):
    """8-bit offsets reach 16 plane-0 scales: enough for an rtn grid of up to 4 bits, not wider."""
    assert settings(quant)["scale_bits"] == scale_bits


def test_settings_that_do_not_fit_the_model():
    c = tiny_config("llama")  # K is 64 (hidden) or 128 (ffn)
    check_model(settings({"group": 128}), c)  # lowered to 64 where K = 64
    check_model(settings({"group": 64}), c)
    with pytest.raises(ValueError, match="group size 96 fits no matrix"):
        check_model(settings({"group": 96}), c)
    with pytest.raises(ValueError, match="group size 512 fits no matrix"):
        check_model(settings({"layers": {"*down*": {"group": 512}}}), c)
    with pytest.raises(ValueError, match="matches no linear layer"):
        check_model(settings({"layers": {"*down_prj*": {"bits": 3}}}), c)
    with pytest.raises(ValueError, match="calibration sequences of 300 tokens exceed the model's context of 256"):
        quantize_model(c, random_weights(c), {"method": "gptq", "calib": "c4.txt"}, np.zeros((2, 300), np.int64))


def test_later_layer_overrides_win():
    s = settings({"bits": 2, "layers": {"*.mlp.*": {"bits": 3, "group": 64}, "*down*": {"bits": 4}}})
    assert layer_settings(s, "model.layers.0.mlp.down_proj.weight")[:2] == (4, 64)
    assert layer_settings(s, "model.layers.0.mlp.up_proj.weight")[:2] == (3, 64)
    assert layer_settings(s, "model.layers.0.self_attn.q_proj.weight") == (2, 32, True, False)  # rtn <= 4 bits: 8-bit scales
