import gzip
import json
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from engine.tokenizer import StreamDecoder, Tokenizer, read_text_file
from models.config import ModelError
from models.gguf_tokenizer import tokenizer_from_gguf

DATA = Path(__file__).parent / "data" / "tokenizer"
VOCABS = sorted(p.name.removesuffix(".json.gz") for p in DATA.glob("*.json.gz"))
UNUSED = 5

MIXED = ("Hi 🦙! 😶‍🌫️ 👩🏽‍💻 🇯🇵 日本語のテキスト 中文 한국어 កាន់តែពិសេស "
         "e\u0301 a\u0308\u0323 Z\u0351\u0300\u0362 ½ \t\r\n  end")


@cache
def compact(name: str) -> tuple[dict, list]:
    """The GGUF metadata of a compact llama.cpp test vocabulary (see data/tokenizer/extract.py)
    and its cases; ids left out of the extraction hold tokens no text can produce."""
    with gzip.open(DATA / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        data = json.load(f)
    n = data["n_tokens"]
    tokens, types = [f"\x00unused{i}" for i in range(n)], [UNUSED] * n
    for i, t in data["tokens"].items():
        tokens[int(i)], types[int(i)] = t, 1
    for i, t in data["token_type"].items():
        types[int(i)] = t
    metadata = {**data["metadata"], "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": data["merges"]}
    return metadata, [(s, ids) for s, ids in data["cases"]]


def info(name: str, **changes):
    """A vocabulary's TokenizerInfo, after changing (None: deleting) metadata keys."""
    metadata = {**compact(name)[0], **changes}
    return tokenizer_from_gguf({k: v for k, v in metadata.items() if v is not None}, name)


@cache
def build(name: str, **changes) -> Tokenizer:
    return Tokenizer(info(name, **changes))


def qwen2() -> Tokenizer:
    """Holds all 256 byte tokens, so it encodes any text (mostly byte by byte)."""
    return build("qwen2")


# --- llama.cpp's test vectors (tests/test-tokenizer-0: no BOS, specials not parsed)

@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(name):
    tok = build(name)
    for text, expected in compact(name)[1]:
        assert tok.encode(text, add_bos=False) == expected, (name, text)
        assert tok.decode(expected) == text


def test_vectors_cover_the_main_pre_tokenizers():
    assert {"gpt-2", "llama-bpe", "qwen2", "starcoder"} <= set(VOCABS)


# --- metadata

def test_no_tokenizer_metadata():
    with pytest.raises(ModelError) as e:
        tokenizer_from_gguf({"general.architecture": "llama"}, "m.gguf")
    assert str(e.value) == "m.gguf: no tokenizer in GGUF metadata"


@pytest.mark.parametrize("key, value, named", [
    ("tokenizer.ggml.model", "t5", "'t5'"),  # SentencePiece unigram (llama.cpp's UGM)
    ("tokenizer.ggml.pre", "no-such-pre", "'no-such-pre'"),
])
def test_unsupported_tokenizer(key, value, named):
    with pytest.raises(ModelError) as e:
        info("gpt-2", **{key: value})
    message = str(e.value)
    assert message.startswith("gpt-2: ") and named in message and "\n" not in message


@pytest.mark.parametrize("merge", ["Ġ zzz", "nospace"])
def test_bad_merges(merge):
    with pytest.raises(ModelError) as e:
        info("gpt-2", **{"tokenizer.ggml.merges": [merge]})
    assert str(e.value).startswith("gpt-2: bad tokenizer.ggml.merges") and "\n" not in str(e.value)


def test_missing_pre_is_default():
    def pieces(tokenizer_info):
        return [p for p, _ in tokenizer_info.tokenizer.pre_tokenizer.pre_tokenize_str("x 12345")]
    assert pieces(info("gpt-2", **{"tokenizer.ggml.pre": None})) == ["x", "Ġ", "123", "45"]
    assert pieces(info("gpt-2")) == ["x", "Ġ12345"]


def test_special_ids_and_add_bos():
    llama3 = build("llama-bpe").info
    assert llama3.bos_id == 128000 and llama3.add_bos  # llama.cpp's default for llama3 vocabularies
    assert llama3.eos_ids == (128001, 128009)  # <|end_of_text|>, then <|eot_id|>
    assert not info("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}).add_bos
    qwen = info("qwen2", **{"tokenizer.ggml.eos_token_id": 151645, "tokenizer.ggml.eot_token_id": 151644})
    assert not qwen.add_bos and qwen.bos_id == 151643
    assert qwen.eos_ids == (151645, 151644, 151643)
    assert info("gpt-2").eos_ids == (50256,)


def test_add_bos():
    tok = build("llama-bpe")
    assert tok.encode("Hello")[0] == 128000
    assert tok.encode("Hello", add_bos=False)[0] != 128000
    assert build("qwen2").encode("Hello", add_bos=True)[0] == 151643


def test_control_tokens_parsed_only_when_asked():
    tok = qwen2()
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(text, special=True)
    assert ids[0] == 151644 and ids[-1] == 151645 and ids.count(151644) == 1
    plain = tok.encode(text)
    assert not {151643, 151644, 151645} & set(plain)
    assert tok.decode(ids) == tok.decode(plain) == text


def test_user_defined_tokens_always_parsed():
    tok = qwen2()  # [PAD151646] is a user-defined token in this vocabulary
    for special in (False, True):
        assert tok.encode("x[PAD151646]x", special=special) == [87, 151646, 87]


def test_token_bytes():
    tok = qwen2()
    assert tok.token_bytes(151644) == b"<|im_start|>"
    assert tok.token_bytes(220) == b" "  # Ġ
    assert tok.token_bytes(198) == b"\n"  # Ċ
    assert tok.token_bytes(-1) == tok.token_bytes(tok.vocab_size) == b""
    assert tok.vocab_size == 151936
    assert b"".join(map(tok.token_bytes, tok.encode(MIXED))) == MIXED.encode()


def _gpt2_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: written out here as the reference for the byte-level tokens."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = sorted(set(range(256)) - set(shown))
    return {**{chr(b): b for b in shown}, **{chr(256 + n): b for n, b in enumerate(hidden)}}


GPT2_BYTE = _gpt2_alphabet()


def gpt2_bytes(text: str) -> bytes:
    return b"".join(bytes([GPT2_BYTE[c]]) if c in GPT2_BYTE else c.encode() for c in text)


# deepseek-coder has added tokens such as "õ", whose bytes are their UTF-8, not the byte 0xf5 of that vocabulary entry
@pytest.mark.parametrize("name", ["deepseek-coder", "llama-bpe", "qwen2"])
def test_token_bytes_of_every_id(name):
    """Made one token at a time, as decoding asks for them: equal to the whole table (added tokens
    their text, even where the vocabulary has the same id; unknown ids nothing)."""
    tok = Tokenizer(info(name))
    t = tok._tok
    table = {i: gpt2_bytes(text) for text, i in t.get_vocab(with_added_tokens=False).items()}
    table.update({i: a.content.encode() for i, a in t.get_added_tokens_decoder().items()})
    assert tok.vocab_size == max(table) + 1
    for i in [*range(tok.vocab_size + 2), -1, 1 << 32, 1 << 40]:
        assert tok.token_bytes(i) == table.get(i, b""), (name, i)
    assert tok.decode(range(tok.vocab_size)) == b"".join(table.get(i, b"") for i in range(tok.vocab_size)).decode(
        "utf-8", "replace")


def test_non_byte_level_tokenizer_rejected():
    from tokenizers import decoders

    spm = info("gpt-2")
    spm.tokenizer.decoder = decoders.Metaspace()
    with pytest.raises(ValueError, match="byte-level"):
        Tokenizer(spm)


# --- streaming

def stream(tok: Tokenizer, ids) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def check_stream(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # strict: fails on a lone surrogate


def test_stream_mixed_scripts():
    tok = qwen2()
    ids = tok.encode(MIXED)
    split = [i for i in ids if tok.token_bytes(i)[:1] >= b"\x80" and len(tok.token_bytes(i)) == 1]
    assert split  # characters really are cut across tokens here
    check_stream(tok, MIXED)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=60))
def test_stream_random_text(text):
    check_stream(qwen2(), text)


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(ValueError, match="lone surrogate at index 2"):
        qwen2().encode("ab\ud800c")


@cache
def byte_tokens() -> dict[int, int]:
    tok = qwen2()
    return {tok.token_bytes(i)[0]: i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=40))
def test_stream_matches_decode_on_invalid_utf8(byte_values):
    tok, ids = qwen2(), [byte_tokens()[b] for b in byte_values]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == bytes(byte_values).decode("utf-8", "replace")


def test_flush_replaces_an_incomplete_character():
    decoder = StreamDecoder(qwen2())
    assert decoder.push(byte_tokens()[0xF0]) == decoder.push(byte_tokens()[0x9F]) == ""
    assert decoder.flush() == "\ufffd"


# --- text files

def test_read_text_file(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_bytes("a\r\nb é\n".encode())
    assert read_text_file(path) == "a\r\nb é\n"


def test_read_text_file_invalid(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\xc3\x28 more\nlines\n")
    with pytest.raises(ValueError) as e:
        read_text_file(path)
    assert str(e.value) == f"{path}: not valid UTF-8 (byte offset 3)"


# --- the catalog models

@cache
def catalog_tokenizer(name: str) -> Tokenizer:
    import gguf
    from models.catalog import pull

    path = pull(name, progress=False)
    fields = gguf.GGUFReader(path).fields
    return Tokenizer(tokenizer_from_gguf(
        {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}, path))


ROUND_TRIP = ["Hello, world!", "  leading spaces and trailing  ", "def f(x):\n\treturn x ** 2\n",
              "1234567890 3.14159", "I've been 'told' he's there", MIXED]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_catalog_round_trip_and_stream(name):
    tok = catalog_tokenizer(name)
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
        check_stream(tok, text)
    assert "<|im_start|>" in tok.info.chat_template


@pytest.mark.slow
def test_smollm2():
    tok = catalog_tokenizer("smollm2-135m-instruct")
    t = tok.info
    assert (t.bos_id, t.eos_ids, t.add_bos, tok.vocab_size) == (1, (2, 0), False, 49152)
    assert tok.encode("<|im_start|>user\nHello, world!", special=True) == [1, 4093, 198, 19556, 28, 905, 17]
    assert tok.encode("<|im_start|>")[0] != 1
    assert tok.encode(" 12345") == [216, 33, 34, 35, 36, 37]  # digits one by one (smollm pre-tokenizer)


@pytest.mark.slow
def test_qwen25_coder():
    tok = catalog_tokenizer("qwen2.5-coder-0.5b-instruct")
    t = tok.info
    assert (t.bos_id, t.eos_ids, t.add_bos, tok.vocab_size) == (151643, (151645, 151643), False, 151936)
    assert tok.encode("<|im_start|>user\nHello, world!", special=True) == [151644, 872, 198, 9707, 11, 1879, 0]
    # Qwen2.5 keeps Qwen2's byte-level vocabulary: llama.cpp's qwen2 vectors hold for it too.
    for text, expected in compact("qwen2")[1]:
        assert tok.encode(text) == expected, text
