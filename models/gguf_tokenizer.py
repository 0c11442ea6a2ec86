"""A Hugging Face `tokenizers.Tokenizer` rebuilt from a GGUF's byte-level BPE vocabulary, or
from its SentencePiece one (`tokenizer.ggml.model` "llama": gemma3).

The GGUF keeps tokens, merges and token types but not the pre-tokenizer: only
its name (`tokenizer.ggml.pre`), which llama.cpp maps to a list of regexes in
src/llama-vocab.cpp. Each regex splits every piece the previous one left
("isolated": unmatched text stays a piece of its own), so the list becomes a
Sequence of Split pre-tokenizers, then the GPT-2 byte-to-character mapping.
The tables below follow llama.cpp as vendored by llama-cpp-python 0.3.36.

llama.cpp's SentencePiece tokenizer keeps the text one sequence (spaces as "▁"),
starts from its characters and merges, again and again, the adjacent pair whose
concatenation is the token of highest score; characters left outside the
vocabulary become byte tokens <0xXX>. A BPE model whose merges are every split
of every token into two tokens, ranked by the token's score, with byte fallback,
does the same where two conditions hold, as they do for gemma3: every character
of a token is a token itself (a character outside the vocabulary takes part in
llama.cpp's merges but is bytes to the BPE model; gemma3's only such character is
" ", which the text never holds as "▁" stands for it), and no two tokens have
equal scores (llama.cpp merges the leftmost of equals first, the BPE model the
one listed first; gemma3's 255,474 normal tokens have distinct scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

from .config import ModelError
from .source import TokenizerInfo, check_tokenizer, tokenizers_errors

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's spelling of the GPT-2 regex: without the final `|\s+`, whose
# matches the isolated split keeps as pieces anyway.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# The tokenizer.json originals start with (?i:'s|...); llama.cpp spells the
# contractions out, which keeps Unicode case folding ('ſ) out of them.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is emitted whole
    add_bos: bool = False  # llama.cpp's default when the GGUF does not say


def _table(*entries: tuple[tuple[str, ...], PreTokenizer]) -> dict[str, PreTokenizer]:
    return {name: pre for names, pre in entries for name in names}


PRE_TOKENIZERS = _table(
    (("default",), PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"),
     PreTokenizer((GPT2,))),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"),
     PreTokenizer((LLAMA3,), ignore_merges=True, add_bos=True)),
    (("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3,))),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), PreTokenizer((QWEN2,))),
    (("qwen35",), PreTokenizer((QWEN35,))),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
     PreTokenizer((r"\p{N}", GPT2))),
    (("falcon",), PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"))),
    (("deepseek-coder",), PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"))),
    (("deepseek-llm",), PreTokenizer((
        "[\r\n]",
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
        "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
        "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
        "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
        "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
        "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
        "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
        "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
        "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
        "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
        "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        _CJK,
        r"\p{N}+",
    ))),
)

SENTENCEPIECE = PreTokenizer((), add_bos=True)
MAX_PIECE = 64  # characters; gemma3's longest token has 31  # no pre-tokenizer: the text stays one sequence

# Generation stops on any of these when they are control tokens, whatever the
# GGUF names as eos: chat models end a turn with one and a document with another.
STOP_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def tokenizer_from_gguf(metadata: dict, path: str | PathLike) -> TokenizerInfo:
    """`metadata` maps GGUF keys to `ReaderField.contents()`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers

    tokens = metadata.get("tokenizer.ggml.tokens")
    kind = metadata.get("tokenizer.ggml.model")
    if not tokens or kind is None:
        raise ModelError(f"{path}: no tokenizer in GGUF metadata")
    if kind not in ("gpt2", "llama"):
        raise ModelError(f"{path}: unsupported tokenizer model {str(kind)[:40]!r} "
                         f"(byte-level BPE 'gpt2' or SentencePiece 'llama')")
    name = metadata.get("tokenizer.ggml.pre") or "default"
    pre = SENTENCEPIECE if kind == "llama" else PRE_TOKENIZERS.get(name) if isinstance(name, str) else None
    if pre is None:
        raise ModelError(f"{path}: unsupported pre-tokenizer {str(name)[:40]!r}")
    merges = metadata.get("tokenizer.ggml.merges", [] if kind == "llama" else None)
    if merges is None:
        raise ModelError(f"{path}: BPE tokenizer without tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None and isinstance(tokens, list) else types
    for key, value, item in (("tokens", tokens, str), ("merges", merges, str), ("token_type", types, int)):
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ModelError(f"{path}: tokenizer.ggml.{key} is not a list of {item.__name__}")
    if len(types) != len(tokens):
        raise ModelError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelError(f"{path}: tokenizer.chat_template is not a string")

    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "llama":
        tok = _sentencepiece(metadata, tokens, vocab, path)
    else:
        try:
            # llama.cpp splits at the first space after the first character
            pairs = [(m[:(k := m.index(" ", 1))], m[k + 1:]) for m in merges]
        except ValueError:
            raise ModelError(f"{path}: bad tokenizer.ggml.merges: an entry without a space") from None
        tok = Tokenizer(_bpe(vocab, pairs, path, ignore_merges=pre.ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    # llama.cpp always matches user-defined tokens in the text, control tokens
    # only when asked to parse specials: the tokenizer's encode_special_tokens
    # switch (set by engine.tokenizer.Tokenizer.encode) skips only the latter.
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                    for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)])

    check_tokenizer(tok, path)

    def token_id(key: str) -> int | None:
        i = metadata.get(key)
        return i if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = token_id("tokenizer.ggml.bos_token_id")
    eos = [token_id("tokenizer.ggml.eos_token_id"), token_id("tokenizer.ggml.eot_token_id")]
    eos += [vocab[t] for t in STOP_TEXTS if t in vocab and types[vocab[t]] == CONTROL]
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", pre.add_bos)) and bos is not None
    return TokenizerInfo(tokenizer=tok, bos_id=bos,
                         eos_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
                         add_bos=add_bos, chat_template=template)


def _bpe(vocab: dict[str, int], pairs: list[tuple[str, str]], path, **options):
    from tokenizers import models

    with tokenizers_errors(f"{path}: bad tokenizer.ggml.merges"):  # a merge of or into a token the vocabulary lacks
        return models.BPE(vocab, pairs, **options)


def _sentencepiece(metadata: dict, tokens: list[str], vocab: dict[str, int], path):
    """SentencePiece as llama.cpp runs it (module docstring), for add_space_prefix false (gemma3)."""
    from tokenizers import Tokenizer, decoders, normalizers

    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        raise ModelError(f"{path}: unsupported: a SentencePiece tokenizer with add_space_prefix")
    scores = metadata.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens) or not all(
            isinstance(v, (int, float)) for v in scores):
        raise ModelError(f"{path}: tokenizer.ggml.scores is not one number per token")
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    if not isinstance(unk, int) or not 0 <= unk < len(tokens):
        raise ModelError(f"{path}: SentencePiece tokenizer without a valid tokenizer.ggml.unknown_token_id")
    longest = max(map(len, tokens))
    if longest > MAX_PIECE:  # the merges below cost the square of each token's length
        raise ModelError(f"{path}: unsupported: a SentencePiece token of {longest} characters (at most {MAX_PIECE})")
    ranked = sorted(((-scores[i], i, t[:k], t[k:]) for t, i in vocab.items() for k in range(1, len(t))
                     if t[:k] in vocab and t[k:] in vocab))
    bpe = _bpe(vocab, [(a, b) for _, _, a, b in ranked], path, unk_token=tokens[unk], fuse_unk=True,
               byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok
