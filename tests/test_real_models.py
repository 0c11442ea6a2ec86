"""The catalog models, end to end, against figures llama.cpp produced on the same GGUF files.

tests/data/llamacpp/*.json were recorded by bench/llamacpp_ref.py with
llama-cpp-python 0.3.36 (each file holds its command); these tests do not need llama.cpp.
"""
import json
import os
from pathlib import Path

import pytest

from engine import load
from engine.load import load_tokenizer
from engine.perplexity import perplexity
from engine.tokenizer import read_text_file

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "llamacpp"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOL, QWEN = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"


def reference(model: str, text: str) -> dict:
    return json.loads((DATA / f"{model}-{text}.json").read_text())


def protocol_ids(model: str, text: str) -> list[int]:
    """PROTOCOL.md: the text from its start, no BOS, special tokens not parsed, first 8192 tokens
    (a prefix of the text is enough for that many)."""
    path = SHARED / f"{text}.txt"
    if not path.exists():  # the evaluation texts sit in ../shared beside the checkout, not in the repository
        msg = f"{path} not found (the project's ../shared/data)"
        if os.environ.get("LUTENGINE_REQUIRE_SHARED") == "1":
            pytest.fail(f"LUTENGINE_REQUIRE_SHARED=1 but {msg}")
        pytest.skip(msg)
    return load_tokenizer(model).encode(read_text_file(path)[:200_000], add_bos=False)[:8192]


@pytest.mark.parametrize("model", [SMOL, QWEN])
@pytest.mark.parametrize("text", ["wiki", "c4-eval"])
def test_token_ids_equal_llama_cpp(model, text):
    assert protocol_ids(model, text) == reference(model, text)["token_ids"]


def test_dense_perplexity_reproduces_llama_cpp():
    ref = reference(SMOL, "wiki")
    m = load(SMOL, dense=True, max_context=512)
    got = perplexity(m.transformer, ref["token_ids"])
    assert got.n_scored == ref["n_scored"] == 8176
    assert abs(got.ppl / ref["ppl"] - 1) < 0.005, (got.ppl, ref["ppl"])


def test_default_format_is_within_10_percent_of_dense_at_4_5_bits():
    """README's claim for the default format (rtn4g32s8): wiki perplexity per PROTOCOL within 10% of the
    dense model's (llama.cpp on the same GGUF, 14.628), at no more than 4.5 honest bits per linear weight."""
    from engine.info import describe_qfile
    from engine.load import default_qfile

    ref = reference(SMOL, "wiki")
    assert describe_qfile(default_qfile(SMOL))["bpw_linear"] <= 4.5
    got = perplexity(load(SMOL, max_context=512).transformer, ref["token_ids"])
    assert got.n_scored == 8176 and got.ppl <= 1.10 * ref["ppl"], (got.ppl, ref["ppl"])


@pytest.mark.parametrize("model, question, expect", [
    # Not France: there the 135M model's greedy answer hinges on activation rounding; llama.cpp on the
    # same GGUF answers "L'Etoile, la Marseillaise, ..." as our quantized path does, the dense path "Paris".
    (SMOL, "What is the capital of Japan?", "Tokyo"),
    (QWEN, "Write a Python function that returns the square of a number.", "def "),
])
def test_default_format_answers_in_chat(model, question, expect):
    m = load(model)
    reply = m.chat([{"role": "user", "content": question}], max_tokens=96, temperature=0)
    assert expect in reply, reply
    assert m.last_stats.stop_reason in ("eos", "length")
