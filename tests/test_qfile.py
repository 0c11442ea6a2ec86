"""The quantized model file (models/qfile.py): round trip, memory mapping, validation, atomic save."""
import json
import mmap
import os

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

import lutkernels as lk
from engine.model import Transformer
from engine.quant import DEFAULT, quantize_model, rtn
from models import qfile
from models.config import MLP_MIX, MLP_SIGNS, ModelError
from models.source import ModelSource, TokenizerInfo
from test_model import CONFIGS, IDS
from tiny_models import random_weights, rewrite_safetensors_header

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def tiny_tok() -> TokenizerInfo:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return TokenizerInfo(tk, 1, (2,), True, "{{ messages }}")


@pytest.fixture(params=list(CONFIGS))
def src(request, tmp_path) -> ModelSource:
    c = CONFIGS[request.param]
    return ModelSource(path=tmp_path / "model.gguf", format="gguf", config=c, tensors=random_weights(c, 5),
                       tok=tiny_tok(), sha256="ab" * 32)


@pytest.fixture
def saved(src, tmp_path):
    return qfile.save(tmp_path / "m.lut.safetensors", src, {"bits": 3})


def edit_meta(edit):
    def apply(header):
        meta = json.loads(header["__metadata__"]["lutengine"])
        edit(meta)
        header["__metadata__"]["lutengine"] = json.dumps(meta)
    return apply


def test_round_trip_gives_the_same_logits(src, saved):
    weights, _ = quantize_model(src.config, src.tensors, {"bits": 3})
    expect = Transformer(src.config, weights).forward(IDS, 0, all_logits=True)
    q = qfile.load(saved)
    assert q.config == src.config
    m = Transformer.from_qfile(q)
    np.testing.assert_array_equal(m.forward(IDS, 0, all_logits=True), expect)
    m.reset()
    steps = np.stack([m.forward([t], i).copy() for i, t in enumerate(IDS)])
    assert np.linalg.norm(steps - expect) / np.linalg.norm(expect) < 5e-3
    np.testing.assert_array_equal(Transformer.from_qfile(saved).forward(IDS, 0), expect[-1])  # from a path


def test_packed_arrays_are_views_of_the_mapping(saved):
    q = qfile.load(saved)
    for w in q.packed.values():
        for a in (w.planes, w.scales, w.offsets):
            assert not a.flags.owndata and not a.flags.writeable and a.flags.aligned and a.flags.c_contiguous
            assert isinstance(_root(a), mmap.mmap)
    emb = q.tensors["model.embed_tokens.weight"]
    assert emb.dtype == np.float16 and isinstance(_root(emb), mmap.mmap)
    assert np.shares_memory(q.packed[Q_PROJ].planes, np.frombuffer(_root(q.packed[Q_PROJ].planes), np.uint8))


def _root(a):
    """What an array's memory ultimately belongs to."""
    while isinstance(a, (np.ndarray, memoryview)):
        a = a.base if isinstance(a, np.ndarray) else a.obj
    return a


def test_metadata(src, saved):
    q = qfile.load(saved)
    m = q.meta
    assert m["format_version"] == qfile.FORMAT_VERSION == 6
    assert m["source"] == {"path": str(src.path), "sha256": "ab" * 32}
    assert m["quantizer"] == {**DEFAULT, "bits": 3, "scale_bits": 8, "grid": "rtn", "act_order": False, "rotate": False,
                              "dense_target": 0.0}  # rtn at <= 4 bits: 8-bit scales
    t = m["tensors"][Q_PROJ]
    w = q.packed[Q_PROJ]
    G = rtn.group_size(64, DEFAULT["group"])
    assert t == {"method": "rtn", "bits": 3, "planes": 3, "group": G, "M": 64, "K": 64, "offsets": True,
                 "uniform": True, "scale_bits": 8, "int_grid": False, "bpw": w.bits_per_weight()}
    # RTN layers are uniform: one 8-bit scale per group, the honest 3 + 8/G + 8/G bits
    assert w.uniform and w.scales.shape == (4, 64 // G, 1, 16) and t["bpw"] == 3 + 16 / G
    assert m["tensors"]["lm_head.weight"]["bits"] == 8
    tok = q.tok
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == (1, (2,), True, "{{ messages }}")
    assert tok.tokenizer.encode("hello world").ids == [3, 4]
    assert q.tok is tok  # built once


def test_readable_by_safetensors(saved):
    q = qfile.load(saved)
    with safe_open(str(saved), "numpy") as f:
        names = set(f.keys())
        assert "lutengine" in f.metadata()
        np.testing.assert_array_equal(f.get_tensor(Q_PROJ + ".planes"), q.packed[Q_PROJ].planes)
        np.testing.assert_array_equal(f.get_tensor("model.norm.weight"), q.tensors["model.norm.weight"])
    expect = set(q.tensors) | {f"{n}.{p}" for n in q.packed for p in ("planes", "scales", "offsets")}
    assert names == expect


def test_data_section_is_aligned(saved):
    raw = saved.read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 64 == 0


def test_rotated_file_round_trips_and_a_bad_rotation_is_refused(src, tmp_path):
    """A rotated model's file keeps its MLP rotation (same logits after reload); one whose rotation
    does not fit the model is refused by name, not run as a different function."""
    weights, info = quantize_model(src.config, src.tensors, {"bits": 8, "rotate": True})
    path = qfile.write(tmp_path / "rot.lut.safetensors", src.config, weights, src.tok, info=info)
    q = qfile.load(path)
    assert np.array_equal(q.tensors[MLP_SIGNS], weights[MLP_SIGNS])
    np.testing.assert_array_equal(Transformer.from_qfile(q).forward(IDS, 0), Transformer(src.config, weights).forward(IDS, 0))
    bad = qfile.write(tmp_path / "bad.lut.safetensors", src.config, {**weights, MLP_MIX: np.eye(2, dtype=np.float32)},
                      src.tok, info=info)
    with pytest.raises(ModelError, match=rf"{bad}: MLP rotation must be signs \[128\] and mix \[1, 1\]"):
        qfile.load(bad)


def test_newer_format_version_is_refused(saved):
    rewrite_safetensors_header(saved, edit_meta(lambda m: m.update(format_version=qfile.FORMAT_VERSION + 1)))
    v = qfile.FORMAT_VERSION
    with pytest.raises(ModelError, match=rf"format version {v + 1} is newer than this lutengine supports \({v}\)"):
        qfile.load(saved)


def test_version_2_files_read_as_16_bit_scales(src, tmp_path):
    """Version 3 only added scale_bits: a version 2 file (no such field) runs as it did."""
    saved = qfile.save(tmp_path / "v2.lut.safetensors", src, {"bits": 3, "scale_bits": 16})
    expect = lk.dense(qfile.load(saved).packed[Q_PROJ])

    def to_v2(m):
        m.update(format_version=2)
        for t in m["tensors"].values():
            t.pop("scale_bits")
    rewrite_safetensors_header(saved, edit_meta(to_v2))
    w = qfile.load(saved).packed[Q_PROJ]
    assert not w.scale8 and lk.dense(w).tobytes() == expect.tobytes()


def test_8_bit_scales_round_trip(src, tmp_path):
    """rtn with 8-bit scales: U8 scales and I8 offsets on disk, the same logits after reload, 4.5 bpw at 4 bits."""
    quant = {"bits": 4, "scale_bits": 8}
    weights, _ = quantize_model(src.config, src.tensors, quant)
    expect = Transformer(src.config, weights).forward(IDS, 0, all_logits=True)
    path = qfile.save(tmp_path / "s8.lut.safetensors", src, quant)
    q = qfile.load(path)
    w, t = q.packed[Q_PROJ], q.meta["tensors"][Q_PROJ]
    assert w.scale8 and w.scales.dtype == np.uint8 and w.offsets.dtype == np.int8
    assert t["scale_bits"] == 8 and t["bpw"] == 4 + 16 / w.G
    assert not q.packed["lm_head.weight"].scale8  # the head keeps float16 scales
    with safe_open(str(path), "numpy") as f:
        assert f.get_tensor(Q_PROJ + ".offsets").dtype == np.int8
    np.testing.assert_array_equal(Transformer.from_qfile(q).forward(IDS, 0, all_logits=True), expect)


def test_scale_bits_disagreeing_with_arrays(src, tmp_path):
    path = qfile.save(tmp_path / "s8.lut.safetensors", src, {"bits": 4, "scale_bits": 8})
    rewrite_safetensors_header(path, edit_meta(lambda m: m["tensors"][Q_PROJ].update(scale_bits=16)))
    with pytest.raises(ModelError, match=f"{Q_PROJ}.scales is uint8 .*scale_bits=16\\) needs F16"):
        qfile.load(path)


def test_older_format_version_is_refused(saved):
    """Version 1 stored a scale per plane for every layer; its files are not read as version 2."""
    rewrite_safetensors_header(saved, edit_meta(lambda m: m.update(format_version=1)))
    with pytest.raises(ModelError, match=f"{saved}: format version 1 was written by an older lutengine; "
                                         "quantize the model again"):
        qfile.load(saved)


def test_per_plane_layers_round_trip(src, tmp_path):
    """Layers with a scale per plane (HLQ, multi-scale binary) are stored as they are."""
    weights, info = quantize_model(src.config, src.tensors, {"bits": 2})
    planes, scales, offsets = lk.unpack(weights[Q_PROJ])
    weights[Q_PROJ] = lk.pack(planes, scales * np.float32(0.75), offsets)  # plane scales no longer 2^p apart
    q = qfile.load(qfile.write(tmp_path / "p.safetensors", src.config, weights, src.tok, info=info))
    w = q.packed[Q_PROJ]
    assert not w.uniform and w.scales.shape[2] == 2 and q.meta["tensors"][Q_PROJ]["uniform"] is False
    assert lk.dense(w).tobytes() == lk.dense(weights[Q_PROJ]).tobytes()
    assert q.meta["tensors"][Q_PROJ]["bpw"] > q.meta["tensors"]["model.layers.0.mlp.up_proj.weight"]["bpw"]


@pytest.mark.parametrize("value, message", [
    (False, r"scales is uint8 \[4, 2, 1, 16\]; metadata \(M=64, K=64, P=3, G=32, uniform=False, "
            r"scale_bits=8\) needs U8 \[4, 2, 3, 16\]"),
    ("yes", "bad packed-layer metadata \\(uniform must be true or false, got 'yes'\\)"),
    (None, "bad packed-layer metadata \\('uniform'\\)"),
])
def test_uniform_flag_disagreeing_with_scales(saved, value, message):
    def edit(m):
        t = m["tensors"][Q_PROJ]
        t.pop("uniform") if value is None else t.update(uniform=value)
    rewrite_safetensors_header(saved, edit_meta(edit))
    with pytest.raises(ModelError, match=message):
        qfile.load(saved)


def test_metadata_disagreeing_with_arrays(saved):
    rewrite_safetensors_header(saved, edit_meta(lambda m: m["tensors"][Q_PROJ].update(K=128)))
    with pytest.raises(ModelError, match=f"{saved}: tensor {Q_PROJ}.planes is uint8 \\[4, 2, 3, 64\\]; metadata"):
        qfile.load(saved)


def test_missing_offsets_array(saved):
    rewrite_safetensors_header(saved, lambda h: h.pop(Q_PROJ + ".offsets"))
    with pytest.raises(ModelError, match=f"tensor {Q_PROJ}: {Q_PROJ}.offsets is missing"):
        qfile.load(saved)


def test_offsets_beyond_the_data(saved):
    def grow(h):
        a, b = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [a, b + 4]
    rewrite_safetensors_header(saved, grow)
    with pytest.raises(ModelError, match="model.norm.weight: data_offsets .* disagree with F32"):
        qfile.load(saved)


def test_shape_disagreeing_with_config(saved):
    rewrite_safetensors_header(saved, edit_meta(lambda m: m["config"].update(hidden=96)))
    with pytest.raises(ModelError, match="config says"):
        qfile.load(saved)


def test_truncated_file(saved):
    size = saved.stat().st_size
    with open(saved, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ModelError, match="truncated"):
        qfile.load(saved)
    with open(saved, "r+b") as f:
        f.truncate(20)
    with pytest.raises(ModelError, match="header length"):
        qfile.load(saved)


@pytest.mark.parametrize("content, message", [
    (b"", "too short"),
    (b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", "not valid JSON"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "not a lutengine quantized file"),
])
def test_not_a_qfile(tmp_path, content, message):
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        qfile.load(p)
    with pytest.raises(ModelError, match="cannot read"):
        qfile.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_failed_save_leaves_nothing(src, tmp_path, monkeypatch, exc):
    path = tmp_path / "m.lut.safetensors"

    def fail(fd):
        raise exc("disk gone")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(ModelError if exc is OSError else exc, match="disk gone"):  # ModelError names the file
        qfile.save(path, src)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(src, saved, monkeypatch):
    before = saved.read_bytes()
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        qfile.save(saved, src, {"bits": 2})
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_write_dense_tensors_and_symmetric_layers(src, tmp_path):
    weights, info = quantize_model(src.config, src.tensors, {"symmetric": True, "bits": 2})
    path = qfile.write(tmp_path / "s.safetensors", src.config, weights, src.tok, info=info)
    q = qfile.load(path)
    assert q.packed[Q_PROJ].offsets is None and q.meta["tensors"][Q_PROJ]["offsets"] is False
    assert lk.dense(q.packed[Q_PROJ]).tobytes() == lk.dense(weights[Q_PROJ]).tobytes()
    with pytest.raises(ValueError, match="float16 or float32 only"):
        qfile.write(tmp_path / "bad.safetensors", src.config, {**weights, "x": np.zeros(3, np.int64)}, src.tok)


def test_cached_default_file_is_named_by_format_version(tmp_path, monkeypatch):
    """A lutengine with a new format version makes a new cached file instead of reading a stale one."""
    from engine.load import cached_qfile

    monkeypatch.setenv("LUTENGINE_HOME", str(tmp_path))
    path = cached_qfile("smollm2-135m-instruct")
    assert path == tmp_path / "models" / f"smollm2-135m-instruct.rtn4g32s8.v{qfile.FORMAT_VERSION}.lut.safetensors"


def _mapped_bytes(path) -> int:
    """Resident bytes of this process's mappings of path (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's first line: address range, perms, ..., path
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_page_in_maps_the_packed_layers(tmp_path):
    from tiny_models import tiny_config

    release = tuple(int(v) for v in os.uname().release.split(".")[:2] if v.isdigit())
    if release < (5, 14):
        pytest.skip("MADV_POPULATE_READ needs Linux 5.14")
    c = tiny_config(hidden=256, ffn=1024)  # packed layers of about 1 MB: beyond the kernel's fault-around
    src = ModelSource(path=tmp_path / "m.gguf", format="gguf", config=c, tensors=random_weights(c, 1),
                      tok=tiny_tok(), sha256="ab" * 32)
    path = qfile.save(tmp_path / "m.lut.safetensors", src)
    q = qfile.load(path)
    packed = sum(a.nbytes for w in q.packed.values() for a in (w.planes, w.scales, w.offsets) if a is not None)
    before = _mapped_bytes(path)
    q.page_in()
    after = _mapped_bytes(path)
    assert before < packed / 2 <= packed <= after, (before, packed, after)
    expect = Transformer(c, qfile.load(path).weights).forward(IDS, 0, all_logits=True)
    np.testing.assert_array_equal(Transformer.from_qfile(q).forward(IDS, 0, all_logits=True), expect)
