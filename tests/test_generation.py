"""Generation over real forward passes of tiny models: loaders agree on logits, the cache is reused, chat trims."""
import numpy as np
import pytest

from engine import load
from engine.chat import ChatTemplate, TemplateError
from engine.generate import ContextError, Stats
from engine.sampling import GREEDY
from tiny_models import write_gguf, write_hf


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dense", [True, False])
def test_gguf_and_hf_give_identical_logits(tmp_path, arch, dense):
    a = load(str(write_hf(tmp_path / "hf", arch)), dense=dense)
    b = load(str(write_gguf(tmp_path / "m.gguf", arch)), dense=dense)
    ids = a.tokenize("the theme of the north")
    assert ids == b.tokenize("the theme of the north")
    np.testing.assert_array_equal(a.transformer.forward(ids, 0, all_logits=True),
                                  b.transformer.forward(ids, 0, all_logits=True))


@pytest.fixture
def model(tmp_path):
    return load(str(write_gguf(tmp_path / "m.gguf", "llama", max_context=96)))


def test_follow_up_prompt_evaluates_only_new_tokens(model):
    ids = model.tokenize("the weather in the north")
    s = model._session
    list(s.stream(ids, GREEDY, 4, stats=Stats()))
    stats = Stats()
    list(s.stream(ids + model.tokenize(" and the south"), GREEDY, 4, stats=stats))
    assert stats.prompt_tokens == len(model.tokenize(" and the south"))
    fresh = load(model.info["path"])
    want = fresh.generate("the weather in the north and the south", 4, temperature=0)
    assert model.generate("the weather in the north and the south", 4, temperature=0) == want


def test_chat_drops_oldest_turns_but_keeps_system_and_newest(model):
    conv = model.conversation([{"role": "system", "content": "be brief"}])
    conv.reserve = 16
    for turn in range(6):
        stats = Stats()
        list(conv.reply(f"question number {turn} about the weather", GREEDY, 8, stats))
        assert stats.stop_reason == "length"  # the trimmed prompt left room for the whole reply
    assert conv.messages[0]["role"] == "system"
    assert conv.dropped > 0
    assert any("number 5" in m["content"] for m in conv.messages)
    assert not any("number 0" in m["content"] for m in conv.messages)


def test_chat_message_longer_than_the_context_is_an_error(model):
    conv = model.conversation()
    with pytest.raises(ContextError, match="context"):
        list(conv.reply("the " * 200, GREEDY, 8, Stats()))
    assert conv.messages == []


def test_broken_template_is_a_template_error():
    with pytest.raises(TemplateError, match="chat template"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages[5]['content'].upper() }}").render([])
