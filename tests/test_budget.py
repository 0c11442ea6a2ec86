"""Mixed precision under a bits budget (engine/quant/budget.py)."""
import numpy as np
import pytest

import lutkernels as lk
from engine.model import Transformer
from engine.quant import budget, calib, quantize_model, rtn
from models.load import open_source
from tiny_models import random_weights, tiny_config, write_gguf


def test_plan_spends_the_budget_where_the_error_is_largest():
    # layer a suffers much more from losing bits than b: a gets the extra bits
    opts = {"a": [(2, 64, 16, 2.5, 0.30), (3, 64, 16, 3.5, 0.10), (4, 64, 16, 4.5, 0.03)],
            "b": [(2, 64, 16, 2.5, 0.05), (3, 64, 16, 3.5, 0.02), (4, 64, 16, 4.5, 0.01)]}
    sizes = {"a": 100, "b": 100}
    assert budget.plan(opts, sizes, 3.0) == {"a": {"bits": 3, "group": 64, "scale_bits": 16},
                                             "b": {"bits": 2, "group": 64, "scale_bits": 16}}
    assert budget.plan(opts, sizes, 4.5) == {"a": {"bits": 4, "group": 64, "scale_bits": 16},
                                             "b": {"bits": 4, "group": 64, "scale_bits": 16}}
    opts["a"].append((4, 64, 8, 4.25, 0.035))  # 8-bit scales: nearly as good for less
    assert budget.plan(opts, sizes, 3.9)["a"] == {"bits": 4, "group": 64, "scale_bits": 8}
    with pytest.raises(ValueError, match="smallest format"):
        budget.plan(opts, sizes, 2.0)


def test_plan_never_goes_below_the_best_uniform_format_that_fits():
    # the proxy says b barely minds 2 bits, so a free plan would trade b's bits for a's (2 and 4);
    # 3 bits fit everywhere, and layers only move up from there
    opts = {"a": [(2, 64, 16, 2.5, 0.30), (3, 64, 16, 3.5, 0.10), (4, 64, 16, 4.5, 0.03)],
            "b": [(2, 64, 16, 2.5, 0.001), (3, 64, 16, 3.5, 0.0005), (4, 64, 16, 4.5, 0.0001)]}
    sizes = {"a": 100, "b": 100}
    assert budget.floor(opts, sizes, 3.5) == (3, 64, 16)
    assert budget.plan(opts, sizes, 3.5) == {"a": {"bits": 3, "group": 64, "scale_bits": 16},
                                             "b": {"bits": 3, "group": 64, "scale_bits": 16}}
    assert budget.floor(opts, sizes, 3.4) == (2, 64, 16)
    assert budget.plan(opts, sizes, 3.4)["a"]["bits"] == 3
    opts["b"] = [o for o in opts["b"] if o[0] != 2]  # no format common to every layer fits 2.9
    assert budget.floor(opts, sizes, 2.9) is None


def test_plan_may_take_a_larger_group_at_the_floors_bits_to_move_another_layer_up():
    # b gives up little in groups of 128, which pays for a's 4 bits; b's 2 bits would cost it even
    # less, but no layer goes below the floor's 3 bits
    opts = {"a": [(3, 64, 16, 3.5, 0.10), (3, 128, 16, 3.25, 0.11), (4, 64, 16, 4.5, 0.03)],
            "b": [(2, 64, 16, 2.5, 0.1005), (3, 64, 16, 3.5, 0.10), (3, 128, 16, 3.25, 0.101)]}
    sizes = {"a": 20, "b": 100}
    assert budget.floor(opts, sizes, 3.5) == (3, 64, 16)
    assert budget.plan(opts, sizes, 3.5) == {"a": {"bits": 4, "group": 64, "scale_bits": 16},
                                             "b": {"bits": 3, "group": 128, "scale_bits": 16}}


@pytest.mark.parametrize("bpw", [2.3, 3.3, 4.5])
def test_plan_never_exceeds_the_budget_and_uses_most_of_it(bpw):
    rng = np.random.default_rng(int(bpw * 10))
    opts, sizes = {}, {}
    for i in range(40):
        sizes[f"l{i}"] = int(rng.integers(1, 50)) * 1024
        errs = np.sort(rng.random(len(budget._fitting(1536, None))))[::-1]
        per_group = {16: 32, 8: 16, budget.INT: 16}  # bits of scale and offset (none on the integer grid)
        formats = sorted(((b + per_group[s] / g, b, g, s) for b, g, s in budget._fitting(1536, None)), key=lambda f: f[:3])
        opts[f"l{i}"] = [(b, g, s, cost, e) for (cost, b, g, s), e in zip(formats, errs)]
    choice = budget.plan(opts, sizes, bpw)
    cost = {n: next(o[3] for o in opts[n] if o[:3] == (c["bits"], c["group"],
                                                     budget.INT if c.get("grid") == "int" else c["scale_bits"]))
            for n, c in choice.items()}
    used = sum(cost[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert bpw - 0.5 < used <= bpw


def test_formats_8_bit_scales_cannot_hold_are_not_offered():
    W = (np.random.default_rng(0).standard_normal((32, 64)) * 0.02).astype(np.float32)
    names = lambda opts: {o[:3] for o in opts}  # noqa: E731
    assert (4, 32, 8) in names([budget._option(W, 4, 32, 8, None, None)])
    W[0, :32] = np.linspace(-500, 500, 32)  # a group wider than 31 steps of the largest 8-bit scale
    assert budget._option(W, 4, 32, 8, None, None) is None
    assert budget._option(W, 4, 32, 16, None, None)[:3] == (4, 32, 16)


def test_quantize_model_under_a_budget(tmp_path):
    src = open_source(str(write_gguf(tmp_path / "tiny.gguf", "llama")))
    tokens = np.random.default_rng(0).integers(0, src.config.vocab, (4, 32))
    weights, _ = quantize_model(src.config, src.tensors, {"method": "gptq", "bpw": 3.3, "calib": "x"}, tokens)
    linear = [w for n, w in weights.items() if n.startswith("model.layers.") and hasattr(w, "bits_per_weight")]
    bits = sum(w.bits_per_weight() * w.M * w.K for w in linear) / sum(w.M * w.K for w in linear)
    assert bits <= 3.3
    assert len({w.P for w in linear}) > 1  # a mix, not one format everywhere


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp, lq = (z - z.max(1, keepdims=True) for z in (p_logits.astype(np.float64), q_logits.astype(np.float64)))
    lp, lq = (z - np.log(np.exp(z).sum(1, keepdims=True)) for z in (lp, lq))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sensitivity_is_each_layers_kl_per_unit_of_output_error(arch):
    """Against the Transformer run on the same windows with that one layer rounded to the probe format."""
    c = tiny_config(arch)
    t = random_weights(c, 6)
    tokens = np.random.default_rng(1).integers(0, c.vocab, (6, budget.SENS_LEN + 8))
    workers = calib.Workers(2)
    opts, _ = budget.options(c, t, tokens, workers)
    sens = budget.sensitivity(c, t, tokens, opts, workers)
    workers.close()
    rows = np.linspace(0, len(tokens) - 1, budget.SENS_SEQS).astype(int)

    def logits(m: Transformer, r: int) -> np.ndarray:
        m.reset()
        return m.forward(tokens[r, :budget.SENS_LEN], 0, all_logits=True)
    dense = Transformer(c, t)
    ref = {r: logits(dense, r) for r in rows}
    for name in [f"model.layers.{i}.{m}" for i in (0, c.n_layers - 1) for m in ("self_attn.v_proj.weight", "mlp.down_proj.weight")]:
        probe = max((o for o in opts[name] if o[0] == budget.PROBE_BITS and o[2] == 16), key=lambda o: o[1])
        m = Transformer(c, {**t, name: lk.dense(rtn.quantize(t[name], budget.PROBE_BITS, probe[1]))})
        kl = np.mean([_kl(ref[r], logits(m, r)) for r in rows])
        assert kl > 0
        assert sens[name] == pytest.approx(kl / probe[budget.ERROR], rel=2e-2)


def test_weights_move_bits_to_the_layers_that_matter():
    # equal proxies: the plan cannot choose; a layer worth 10 times more gets the extra bits
    opts = {"a": [(3, 64, 16, 3.5, 0.10), (4, 64, 16, 4.5, 0.03)], "b": [(3, 64, 16, 3.5, 0.10), (4, 64, 16, 4.5, 0.03)]}
    sizes = {"a": 100, "b": 100}
    for heavy in "ab":
        weights = {"a": 1.0, "b": 1.0, heavy: 10.0}
        plan = budget.plan(budget.weigh(opts, weights), sizes, 4.0)
        assert {n: p["bits"] for n, p in plan.items()} == {n: 4 if n == heavy else 3 for n in "ab"}


def test_a_row_may_be_one_group_and_each_format_is_offered_once():
    # rotated rows have one variance along the row, so a plan may trade small groups for bits
    for K in (576, 1536, 256):
        formats = budget._fitting(K, None)
        assert len(formats) == len(set(formats))
        assert {(2, K, 8), (3, K, 16)} <= set(formats)
        assert all(K % G == 0 for _, G, _ in formats)
    assert (2, 256, 8) in budget._fitting(1536, 8) and (2, 256, 16) not in budget._fitting(1536, 8)


def test_a_layer_may_go_below_the_floor_where_it_loses_nothing():
    """A source already on a 4-bit grid (a k-quant layer) keeps its 4 bits under a 5.5 budget whose
    floor is 5 bits, and pays for another layer's 8; elsewhere the floor holds."""
    opts = {"q4k": [(4, 32, 16, 5.0, 0.0), (5, 32, budget.INT, 5.5, 0.002), (8, 32, budget.INT, 8.5, 0.0)],
            "q8": [(4, 32, 16, 5.0, 0.007), (5, 32, budget.INT, 5.5, 0.002), (8, 32, budget.INT, 8.5, 0.0)],
            "q5": [(4, 32, 16, 5.0, 0.007), (5, 32, budget.INT, 5.5, 0.0), (8, 32, budget.INT, 8.5, 0.0)]}
    sizes = {"q4k": 300, "q8": 100, "q5": 600}
    assert budget.floor(opts, sizes, 5.65) == (5, 32, budget.INT)
    assert budget.plan(opts, sizes, 5.65) == {"q4k": {"bits": 4, "group": 32, "scale_bits": 16},
                                              "q8": {"bits": 8, "group": 32, "scale_bits": 16, "grid": "int"},
                                              "q5": {"bits": 5, "group": 32, "scale_bits": 16, "grid": "int"}}
    opts["q4k"][0] = (4, 32, 16, 5.0, 0.003)  # rounding to 4 bits would cost it: the floor holds
    assert budget.plan(opts, sizes, 5.65)["q4k"]["bits"] == 5


def test_int_grid_candidates_keep_a_q5_0_source_layer_exactly():
    rng = np.random.default_rng(7)
    d = rng.uniform(1e-3, 2e-2, (64, 8)).astype(np.float16).astype(np.float32)
    q = rng.integers(-16, 16, (64, 256))
    q[:, ::32] = -16
    W = (np.repeat(d, 32, axis=1) * q).astype(np.float32)
    opts = {f[:3]: f for b, G, s in budget._fitting(256, None) if (f := budget._option(W, b, G, s, None, None))}
    assert opts[(5, 32, budget.INT)][3:] == (5.5, 0.0)
    assert opts[(5, 32, 16)][4] == 0.0 and opts[(5, 32, 16)][3] == 6.0  # the rtn grid needs its offsets
