"""Rebuild the compact vocabularies here from llama.cpp's test vocabularies.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d DIR
    tar xzf DIR/llama_cpp_python-0.3.36.tar.gz -C DIR
    python tests/data/tokenizer/extract.py DIR/llama_cpp_python-0.3.36/vendor/llama.cpp/models

A full vocabulary is megabytes; the tests need only the tokens the expected
outputs use and the merges that can build them. Keeping every merge whose
result is such a token (recursively, down to the 256 byte tokens) keeps every
merge the full vocabulary applies to these inputs, and BPE picks the same
lowest-ranked merge at each step from any subset that holds the applied ones,
so the compact vocabulary reproduces the full one's output on these inputs.
Control and user-defined tokens are kept whole.

That alone would let a wrong pre-tokenizer pass: pieces too coarse find no
merges across their wrong boundaries. So the tokens that the full vocabulary
makes of the inputs under every other pre-tokenizer of models/gguf_tokenizer.py
(and under whitespace splitting, and none) are kept too, with their merges:
a pre-tokenizer swapped for another then fails here as it would on the full
vocabulary.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import gguf
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from models.gguf_tokenizer import PRE_TOKENIZERS

VOCABS = ("gpt-2", "llama-bpe", "qwen2", "qwen35", "starcoder", "refact", "mpt", "falcon",
          "deepseek-coder", "deepseek-llm", "command-r")
SCALARS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
           "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.add_bos_token")
SEPARATOR = "\n__ggml_vocab_test__\n"  # as tests/test-tokenizer-0.cpp splits the .inp file


def read_cases(gguf_path: Path) -> list[tuple[str, list[int]]]:
    inputs = gguf_path.with_name(gguf_path.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    if inputs[-1] == "":
        inputs.pop()
    outputs = gguf_path.with_name(gguf_path.name + ".out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs), gguf_path
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs)]


ALTERNATIVES = sorted({p.regexes for p in PRE_TOKENIZERS.values()} | {(r"\S+|\s+",), ()})


def alternative_tokens(tokens: list[str], merges: list[str], texts: list[str]) -> set[str]:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    found = set()
    for regexes in ALTERNATIVES:
        for ignore_merges in (False, True):
            tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            found.update(t for e in tok.encode_batch(texts) for t in e.tokens)
    return found


def compact(gguf_path: Path) -> dict:
    fields = gguf.GGUFReader(gguf_path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    cases = read_cases(gguf_path)

    producers: dict[str, list[int]] = {}
    for rank, m in enumerate(merges):
        a, b = m.split(" ", 1)
        producers.setdefault(a + b, []).append(rank)
    keep_ranks: set[int] = set()
    seen: set[str] = set()
    todo = [tokens[i] for _, ids in cases for i in ids] + [t for t in tokens if len(t) == 1]
    todo += alternative_tokens(tokens, merges, [s for s, _ in cases])
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for rank in producers.get(t, ()):
            keep_ranks.add(rank)
            todo.extend(merges[rank].split(" ", 1))
    keep_ids = sorted(i for i, t in enumerate(tokens) if t in seen or types[i] != 1)
    return {
        "source": f"llama-cpp-python 0.3.36 sdist: vendor/llama.cpp/models/{gguf_path.name}(.inp/.out)",
        "metadata": {k: fields[k].contents() for k in SCALARS if k in fields},
        "n_tokens": len(tokens),
        "tokens": {i: tokens[i] for i in keep_ids},
        "token_type": {i: types[i] for i in keep_ids if types[i] != 1},
        "merges": [merges[r] for r in sorted(keep_ranks)],
        "cases": cases,
    }


def main(models_dir: str) -> None:
    out = Path(__file__).parent
    for name in VOCABS:
        data = compact(Path(models_dir) / f"ggml-vocab-{name}.gguf")
        with gzip.open(out / f"{name}.json.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
        print(f"{name}: {len(data['tokens'])} tokens, {len(data['merges'])} merges, {len(data['cases'])} cases")


if __name__ == "__main__":
    main(sys.argv[1])
