"""The sampler chain and stop-string scanning, against distributions computed here."""
import numpy as np
import pytest

from engine.generate import StopScanner
from engine.sampling import Sampler, SamplingParams

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)


def draws(logits, n=4000, **kw):
    s = Sampler(SamplingParams(**{"seed": 1, **kw}), logits.size)
    return np.bincount([s(logits) for _ in range(n)], minlength=logits.size) / n


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    assert Sampler(SamplingParams(temperature=0), 1000)(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_and_other_seed_differs():
    logits = np.zeros(500, np.float32)

    def run(seed):
        s = Sampler(SamplingParams(seed=seed, **OFF), 500)
        return [s(logits) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_matches_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    for T in (0.5, 1.0, 2.0):
        want = np.exp(logits / T) / np.exp(logits / T).sum()
        got = draws(logits, temperature=T, **OFF)
        assert np.abs(got - want).max() < 0.03, (T, got, want)


def test_top_k_top_p_min_p_cut_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert draws(logits, temperature=1.0, **{**OFF, "top_k": 2})[2:].sum() == 0
    got = draws(logits, temperature=1.0, **{**OFF, "top_p": 0.7})  # 0.5 < 0.7 <= 0.8: two kept
    assert got[2:].sum() == 0 and got[1] > 0.3
    got = draws(logits, temperature=1.0, **{**OFF, "min_p": 0.4})  # keeps p >= 0.2
    assert got[2:].sum() == 0 and abs(got[0] - 0.5 / 0.8) < 0.03


def test_repetition_penalty_demotes_recent_tokens():
    logits = np.array([1.0, 0.9, -1.0], np.float32)
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0), 3)
    assert s(logits) == 0
    s.accept(0)
    assert s(logits) == 1
    assert logits[0] == 1.0  # the model's buffer is left alone


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=0.0), dict(min_p=1.0), dict(repeat_penalty=0.0)])
def test_bad_params_are_errors(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_string_split_across_pieces_is_never_emitted():
    sc = StopScanner(["STOP", "\n\n"])
    out = []
    for piece in ["Hello Wor", "ld! ST", "O", "P and more"]:
        text, stopped = sc.push(piece)
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "Hello World! "


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    sc = StopScanner(["STOP"])
    assert sc.push("a ST") == ("a ", False)
    assert sc.push("ART") == ("START", False)
    assert sc.flush() == ""
