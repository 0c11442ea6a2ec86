"""engine/quant/sample.py: calibration sequences sampled from the model itself, checked
against the Transformer's own logits and the softmax they define."""
import numpy as np
import pytest

from engine.model import Transformer
from engine.quant import calib, calibration, sample, settings
from models.source import ModelSource, TokenizerInfo
from test_model import ODD, tiny_config
from tiny_models import random_weights, tiny_tokenizer
from tiny_models import tiny_config as tokenizer_sized_config


@pytest.fixture(scope="module")
def workers():
    w = calib.Workers(2)
    yield w
    w.close()


@pytest.mark.parametrize("name", list(ODD))
def test_batched_decoder_gives_the_transformers_logits(name, workers):
    cfg = ODD[name]
    t = random_weights(cfg)
    n, L = 3, 20
    ids = np.random.default_rng(1).integers(0, cfg.vocab, (n, L))
    run = sample.Decoder(cfg, t, n, L, workers)
    got = np.stack([run(ids[:, p], p) for p in range(L)], 1)
    m = Transformer(cfg, t)
    for s in range(n):
        m.reset()
        np.testing.assert_allclose(got[s], m.forward(ids[s], 0, all_logits=True), rtol=1e-4, atol=1e-4)


def test_draw_follows_the_softmax():
    logits = np.log(np.array([0.5, 0.05, 0.3, 0.0, 0.15], np.float32) + 1e-30)
    N = 40000
    got = sample.draw(np.tile(logits, (N, 1)), np.random.default_rng(2))
    freq = np.bincount(got, minlength=5) / N
    p = np.exp(logits) / np.exp(logits).sum()
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / N) + 1e-9)
    assert freq[3] == 0


def test_sequences_follow_the_model_and_repeat_for_a_seed(workers):
    """The first sampled token's frequencies match the Transformer's next-token distribution
    after the start token; a head scaled up makes that distribution far from uniform."""
    cfg = tiny_config("qwen2")
    t = random_weights(cfg, seed=3)
    t["lm_head.weight"] = t["lm_head.weight"] * 8
    m = Transformer(cfg, t)
    z = m.forward([7], 0).astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    N = 3000
    got = sample.sequences(cfg, t, 7, N, 1, workers, seed=4)[:, 0]
    freq = np.bincount(got, minlength=cfg.vocab) / N
    assert 0.5 * np.abs(freq - p).sum() < 0.05 < 0.5 * np.abs(np.full(cfg.vocab, 1 / cfg.vocab) - p).sum()
    a = sample.sequences(cfg, t, 7, 4, 12, workers, seed=5)
    assert a.shape == (4, 12) and a.dtype == np.int64 and a.min() >= 0 and a.max() < cfg.vocab
    np.testing.assert_array_equal(a, sample.sequences(cfg, t, 7, 4, 12, workers, seed=5))
    assert len({tuple(r) for r in a}) == 4


def test_start_token_is_where_a_training_document_starts():
    tok = tiny_tokenizer("llama")
    end = tok.token_to_id("<|endoftext|>")
    assert end is not None
    assert sample.start_token(TokenizerInfo(tok, 5, (6,), True, None)) == 5  # a model that adds BOS
    assert sample.start_token(TokenizerInfo(tok, 5, (6,), False, None)) == end
    # a vocabulary without <|endoftext|>: BOS if there is one, else an end token
    assert sample.start_token(TokenizerInfo(_without_endoftext(), 5, (6,), False, None)) == 5
    assert sample.start_token(TokenizerInfo(_without_endoftext(), None, (6,), False, None)) == 6


def _without_endoftext():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))


def test_gptq_without_a_text_calibrates_on_sampled_sequences():
    cfg = tokenizer_sized_config("llama")
    src = ModelSource(path=None, format="hf", config=cfg, tensors=random_weights(cfg),
                      tok=TokenizerInfo(tiny_tokenizer("llama"), None, (2,), False, None))
    s = settings({"method": "gptq", "n_calib": 3, "calib_len": 16})
    steps = []
    tokens = calibration(s, src, lambda: steps.append(1))
    assert tokens.shape == (3, 16) and len(steps) == 16
    assert calibration(settings({"method": "rtn"}), src) is None
    q = Transformer.from_source(src, {"method": "gptq", "n_calib": 3, "calib_len": 16, "bits": 3})
    assert q.weights["model.layers.0.mlp.up_proj.weight"].P == 3
