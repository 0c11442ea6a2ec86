"""Mixed precision under a bits budget (engine/quant/budget.py)."""
import numpy as np
import pytest

from engine.quant import budget, quantize_model
from models.load import open_source
from tiny_models import write_gguf


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


@pytest.mark.parametrize("bpw", [2.3, 3.3, 4.5])
def test_plan_never_exceeds_the_budget_and_uses_most_of_it(bpw):
    rng = np.random.default_rng(int(bpw * 10))
    opts, sizes = {}, {}
    for i in range(40):
        sizes[f"l{i}"] = int(rng.integers(1, 50)) * 1024
        errs = np.sort(rng.random(len(budget.CANDIDATES)))[::-1]
        formats = sorted((b + 2 * s / g, b, g, s) for b, g, s in budget.CANDIDATES)
        opts[f"l{i}"] = [(b, g, s, cost, e) for (cost, b, g, s), e in zip(formats, errs)]
    choice = budget.plan(opts, sizes, bpw)
    cost = {n: next(o[3] for o in opts[n] if o[:3] == (c["bits"], c["group"], c["scale_bits"]))
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
