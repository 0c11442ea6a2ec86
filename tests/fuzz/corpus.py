"""Regenerate the seed corpus: python -m tests.fuzz.corpus [--catalog] (writes tests/fuzz/corpus/<target>/seed-*).

Seeds are small real files: tiny random-weight models written by tests/tiny_models.py
(GGUF in three tensor types, an HF folder in three dtypes and as two shards), tiny
quantized files written by models/qfile in four layer formats, and, with --catalog,
the two catalog GGUFs' headers (their key/value lists and full tensor tables, the
vocabulary cut to its first entries, a few KB of tensor data). Failing inputs the
fuzzers found are kept beside them as regress-* files, which this does not touch.
"""
from __future__ import annotations

import argparse
import json
import mmap
import shutil
import sys
import tempfile
from pathlib import Path

from .mutate import STRING, decode_gguf, encode_gguf, pack_folder

CORPUS = Path(__file__).resolve().parent / "corpus"
DIMS = dict(hidden=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn=32, max_context=64)
VOCAB_CUT = 400  # tokens kept from a catalog vocabulary
DATA_CUT = 4096  # bytes of tensor data kept after a catalog header
CONTROL = 3


def _tiny_models():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, where tiny_models lives
    import tiny_models

    return tiny_models


def cut_vocab(doc, n: int) -> None:
    """Keep the first n tokens and the control tokens, renumbered, and the merges among them."""
    kv = {e[0]: e for e in doc.kv}
    tokens, types = kv["tokenizer.ggml.tokens"][2][1], kv["tokenizer.ggml.token_type"][2][1]
    keep = sorted(set(range(min(n, len(tokens)))) | {i for i, t in enumerate(types) if t == CONTROL})
    new_id = {old: new for new, old in enumerate(keep)}
    kept = {tokens[i] for i in keep}
    kv["tokenizer.ggml.tokens"][2] = (STRING, [tokens[i] for i in keep])
    kv["tokenizer.ggml.token_type"][2] = (kv["tokenizer.ggml.token_type"][2][0], [types[i] for i in keep])
    if "tokenizer.ggml.merges" in kv:
        merges = [m for m in kv["tokenizer.ggml.merges"][2][1]
                  if " " in m[1:] and {m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:], m.replace(" ", "", 1)} <= kept]
        kv["tokenizer.ggml.merges"][2] = (STRING, merges)
    for key, entry in kv.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if entry[2] in new_id:
                entry[2] = new_id[entry[2]]
            else:
                doc.kv.remove(entry)


def catalog_header(path: Path):
    """A catalog GGUF's header with its vocabulary cut, and the first DATA_CUT bytes of its tensor data."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        doc = decode_gguf(m)
        doc.data = bytes(doc.data[:DATA_CUT])
    cut_vocab(doc, VOCAB_CUT)
    return doc


def tokenizer_only(doc):
    """The same GGUF without tensors: what the tokenizer builder reads, and nothing it does not."""
    doc.kv = [e for e in doc.kv if e[0].startswith("tokenizer.") or e[0] == "general.architecture"]
    doc.tensors, doc.data = [], b""
    return doc


def gguf_seeds(tm, tmp: Path) -> dict[str, bytes]:
    out = {}
    for arch, qtype in (("llama", "Q8_0"), ("qwen2", "Q4_0"), ("mistral", "F16")):
        path = tmp / "m.gguf"
        tm.write_gguf(path, arch, qtype=qtype, **DIMS)
        out[f"seed-tiny-{arch}-{qtype.lower()}.gguf"] = path.read_bytes()
        path.unlink()
    return out


def qfile_seeds(tm, tmp: Path) -> dict[str, bytes]:
    from engine.quant import quantize_model
    from models import qfile
    from models.source import TokenizerInfo

    out = {}
    recipes = {"llama-rtn3": ("llama", {"bits": 3}), "llama-rtn4s8": ("llama", {"bits": 4, "scale_bits": 8}),
               "qwen2-hlq2-rotated": ("qwen2", {"method": "hlq", "bits": 2, "rotate": True}),
               "llama-int4": ("llama", {"bits": 4, "grid": "int", "scale_bits": 16})}
    for label, (arch, quant) in recipes.items():
        config = tm.tiny_config(arch, **DIMS)
        t = tm.tiny_tokenizer(arch)
        tok = TokenizerInfo(t, t.token_to_id(tm.BOS), (t.token_to_id(tm.EOS),), arch != "qwen2", tm.CHAT_TEMPLATE)
        weights, info = quantize_model(config, tm.random_weights(config), quant)
        path = qfile.write(tmp / "m.lut.safetensors", config, weights, tok, info=info, quantizer=quant)
        out[f"seed-{label}.lut.safetensors"] = path.read_bytes()
        path.unlink()
    return out


def hf_seeds(tm, tmp: Path) -> dict[str, bytes]:
    out = {}
    folder = tmp / "hf"
    for arch, dtype in (("llama", "float16"), ("qwen2", "bfloat16"), ("mistral", "float32")):
        tm.write_hf(folder, arch, dtype=dtype, **DIMS)
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        if arch == "mistral":
            # <|im_end|> and <|endoftext|>
            files["generation_config.json"] = json.dumps({"eos_token_id": [266, 264]}).encode()
        out[f"seed-tiny-{arch}-{dtype}.hf"] = pack_folder(files)
        for p in folder.iterdir():
            p.unlink()
    config = tm.tiny_config("qwen2", **DIMS)  # two shards and their index
    weights = tm.random_weights(config)
    tm.write_hf(folder, "qwen2", **DIMS)
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in shards.items():
        tm.write_safetensors(folder / shard, {n: weights[n] for n in part}, "float16")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: shard for shard, part in shards.items() for n in part}}))
    out["seed-tiny-qwen2-sharded.hf"] = pack_folder({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--catalog", action="store_true", help="also cut the catalog models' headers (pulls them)")
    a = p.parse_args(argv)
    tm = _tiny_models()
    tmp = Path(tempfile.mkdtemp(prefix="lutfuzz-corpus-"))
    gguf = gguf_seeds(tm, tmp)
    tok = {name.replace(".gguf", "-tokenizer.gguf"): encode_gguf(tokenizer_only(decode_gguf(data)))
           for name, data in gguf.items() if "mistral" not in name}
    if a.catalog:
        from models import catalog

        for name in catalog.CATALOG:
            doc = catalog_header(catalog.pull(name))
            gguf[f"seed-catalog-{name}-header.gguf"] = encode_gguf(doc)
            tok[f"seed-catalog-{name}-tokenizer.gguf"] = encode_gguf(tokenizer_only(doc))
    for target, files in (("gguf", gguf), ("gguf_tokenizer", tok), ("qfile", qfile_seeds(tm, tmp)),
                          ("hf", hf_seeds(tm, tmp))):
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
            print(f"{folder / name}: {len(data)} bytes")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
