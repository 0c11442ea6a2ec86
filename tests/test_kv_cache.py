"""KV cache types (f32, f16, q8): the C decode step's stores and attention against numpy
references, the model's logits and perplexity against the float32 cache, the cache's size,
the --kv-type flag, and the memory check that refuses a model before loading it."""
import importlib
import math
from pathlib import Path

import numpy as np
import pytest

import lutkernels as lk
from engine import cli, memory
from engine.model import KVCache, Transformer, dequantize_rows, quantize_rows, rope_tables
from engine.perplexity import perplexity
from lutkernels import ops
from tiny_models import random_weights, tiny_config, write_gguf

f32 = np.float32
KV_TYPES = memory.KV_TYPES


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def one_position_step(kv_type: str, v: np.ndarray):
    """The C step at position 0 of a 1-position cache of one head of len(v) values with q = k = 0:
    its only score is exp(0) = 1, so out is the stored v read back. Returns (cache, scale, out)."""
    d = v.size
    q, k, out = np.zeros(d, f32), np.zeros(d, f32), np.zeros(d, f32)
    kv = KVCache(kv_type, 1, 1, 1, d)
    kc, vc, ks, vs = kv.layer(0)
    cos = np.zeros((1, d // 2), f32)
    ops.bind_attention(q, k, v.copy(), None, cos, cos.copy(), kc, vc, 1, np.zeros(1, f32), out, ks, vs)(0)
    return vc[0, 0], (None if vs is None else vs[0, 0]), out


def test_f16_store_rounds_like_numpy_and_reads_every_half_exactly():
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(f32)
    rng = np.random.default_rng(0)
    any_float = rng.integers(0, 1 << 32, 1 << 15, dtype=np.uint64).astype(np.uint32).view(f32)
    top, tiny = 65504.0, 2.0 ** -24  # the largest half; the smallest subnormal step
    edges = np.array([top, np.nextafter(f32(65520), f32(0)), 65520, -65520, 1e9, -np.inf, -0.0, tiny / 2,
                      tiny * 1.5, tiny * 2.5, 2 ** -14, np.nextafter(f32(2 ** -14), f32(0)), 1 + 2 ** -11,
                      1 + 3 * 2 ** -11, 1e-45], f32)
    v = np.concatenate([every_half, any_float, edges, np.zeros(1, f32)])  # even length for RoPE's halves
    cache, _, out = one_position_step("f16", v)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(cache.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(cache[nan]).all()
    np.testing.assert_array_equal(out, cache.astype(f32))  # the read: half to float, exactly
    # NaNs are stored as one quiet NaN, without their payloads; -0 reads as -0, which out's sum from 0 makes +0
    np.testing.assert_array_equal(out[:1 << 16], every_half)


def test_f16_reads_of_every_half_agree_on_every_isa(restore_kernel_state):
    """Row 0 holds every half bit pattern (signalling NaNs too, which no store makes) and row 1
    zeros; with q = 0 both rows weigh 1/2. F16C (x86 ISAs) and the bit conversion (scalar) must
    give the same bits, and the floats numpy reads."""
    d = 1 << 16
    halves = np.arange(d, dtype=np.uint16)
    outs = {}
    for isa in lk.supported_isas():
        lk.set_isa(isa)
        kv = KVCache("f16", 1, 2, 1, d)
        kv.k[0, 0, 0].view(np.uint16)[:] = 0
        kv.v[0, 0, 0].view(np.uint16)[:] = halves
        q, k, out = np.zeros(d, f32), np.zeros(d, f32), np.zeros(d, f32)
        cos = np.zeros((2, d // 2), f32)
        kv.bind(0, q, k, np.zeros(d, f32), None, cos, cos.copy(), 1, np.zeros(2, f32), out)(1)
        outs[isa] = out
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        np.testing.assert_array_equal(out.view(np.uint32), first.view(np.uint32), err_msg=isa)
    want = halves.view(np.float16).astype(f32)
    np.testing.assert_array_equal(first * 2, want)  # NaN where numpy has NaN, every other value exact


def test_q8_store_is_the_numpy_quantizer():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((6, 64)).astype(f32) * np.array([1e-30, 1e-3, 1, 7, 1e4, 0], f32)[:, None]
    rows[2, :5] = [0.5, -0.5, 1.5, -127, 127]  # ties and the extremes
    for row in rows:
        cache, scale, out = one_position_step("q8", row)
        q, s = quantize_rows(row)
        np.testing.assert_array_equal(cache, q)
        assert scale.view(np.uint32) == s.view(np.uint32)
        np.testing.assert_array_equal(out, dequantize_rows(q, s))
        assert np.abs(q).max() <= 127
        if s > 0:
            assert np.abs(out - row).max() <= s / 2 * (1 + 1e-6)


# heads, kv heads, head size: grouped (a tail in the dot products: 20 = 8+8+4), plain multi-head
SHAPES = [(4, 2, 16), (6, 3, 20), (2, 2, 64)]


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("heads, kv_heads, d", SHAPES)
@pytest.mark.parametrize("pos", [0, 6, 13])
def test_attention_step_against_float64_reference(kv_type, heads, kv_heads, d, pos):
    rng = np.random.default_rng(pos + d)
    positions = 16
    kv = KVCache(kv_type, 2, positions, kv_heads, d)
    kv.write(1, 0, *rng.standard_normal((2, positions, kv_heads, d)).astype(f32))  # earlier positions
    kc, vc, ks, vs = kv.layer(1)
    cfg = tiny_config(hidden=heads * d, n_heads=heads, n_kv_heads=kv_heads, head_dim=d)
    cos, sin = rope_tables(cfg, positions)
    q, k, v = (rng.standard_normal(n * d).astype(f32) for n in (heads, kv_heads, kv_heads))
    biases = tuple(rng.standard_normal(n * d).astype(f32) for n in (heads, kv_heads, kv_heads))
    out = np.zeros(heads * d, f32)
    q0, k0, v0 = q.copy(), k.copy(), v.copy()
    ops.bind_attention(q, k, v, biases, cos, sin, kc, vc, heads, np.zeros(heads * positions, f32), out, ks, vs)(pos)

    def rope64(x, n):
        x = x.reshape(n, d).astype(np.float64)
        c, s = cos[pos].astype(np.float64), sin[pos].astype(np.float64)
        a, b = x[:, :d // 2], x[:, d // 2:]
        return np.concatenate([a * c - b * s, b * c + a * s], 1)

    k_want = rope64(k0 + biases[1], kv_heads)
    np.testing.assert_allclose(k.reshape(kv_heads, d), k_want, rtol=1e-5, atol=1e-6)
    stored = KVCache(kv_type, 1, 1, kv_heads, d)  # numpy's store of what C roped: the same bits
    stored.write(0, 0, k.reshape(1, kv_heads, d), (v0 + biases[2]).reshape(1, kv_heads, d))
    np.testing.assert_array_equal(kc[pos], stored.k[0, 0])
    np.testing.assert_array_equal(vc[pos], stored.v[0, 0])
    keys, values = (a.astype(np.float64) for a in kv.read(1, pos + 1))  # the cache as the prompt path reads it
    qr, want = rope64(q0 + biases[0], heads), np.empty((heads, d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = keys[:, g] @ qr[h] / math.sqrt(d)
        p = np.exp(s - s.max())
        want[h] = p @ values[:, g] / p.sum()
    assert rel(out.reshape(heads, d), want) < 2e-6


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("heads, kv_heads, d", SHAPES)
@pytest.mark.parametrize("pos, n, window", [(0, 13, None), (5, 9, None), (2, 14, 5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prompt_attention_is_the_decode_step(restore_kernel_state, kv_type, heads, kv_heads, d, pos, n, window,
                                             threads):
    """The prompt path's attention (C, queries over the pool) gives each query the decode step's
    output bit for bit, over the cache as the prompt path reads it, and the float64 softmax's to
    rounding: causal, windowed, after earlier positions, at 1 and 2 threads."""
    rng = np.random.default_rng(pos * 100 + n + d)
    lk.set_threads(threads)
    positions, end = 16, pos + n
    kv = KVCache(kv_type, 1, positions, kv_heads, d)
    kv.write(0, 0, *rng.standard_normal((2, pos, kv_heads, d)).astype(f32))
    kc, vc, ks, vs = kv.layer(0)
    cos, sin = np.ones((positions, d // 2), f32), np.zeros((positions, d // 2), f32)  # RoPE of angle 0
    q = rng.standard_normal((n, heads, d)).astype(f32)
    qs, k1, v1, o = (np.zeros(m * d, f32) for m in (heads, kv_heads, kv_heads, heads))
    step = ops.bind_attention(qs, k1, v1, None, cos, sin, kc, vc, heads, np.zeros(heads * positions, f32), o, ks, vs,
                              window=window)
    steps = np.empty((n, heads * d), f32)
    for i in range(n):  # each step stores its row, then attends over rows 0..pos+i
        qs[:], k1[:], v1[:] = q[i].ravel(), *rng.standard_normal((2, kv_heads * d)).astype(f32)
        step(pos + i)
        steps[i] = o
    keys, values = kv.read(0, end)
    out = ops.attention_prompt(q, keys, values, pos, window=window)
    np.testing.assert_array_equal(out.view(np.int32), steps.view(np.int32))
    for i in range(n):
        T = pos + i + 1
        lo = 0 if window is None else max(0, T - window)
        k64, v64 = keys[lo:T].astype(np.float64), values[lo:T].astype(np.float64)
        for h in range(heads):
            g = h // (heads // kv_heads)
            sc = k64[:, g] @ q[i, h].astype(np.float64) / math.sqrt(d)
            p = np.exp(sc - sc.max())
            assert rel(out[i, h * d:(h + 1) * d], p @ v64[:, g] / p.sum()) < 2e-6


def test_prompt_attention_checks_its_arguments():
    q, k = np.zeros((3, 4, 16), f32), np.zeros((5, 2, 16), f32)
    with pytest.raises(ValueError, match=r"keys and values must be \[5, kv_heads, 16\]"):
        ops.attention_prompt(q, k[:4], k[:4], 2)
    with pytest.raises(ValueError, match="do not group"):
        ops.attention_prompt(np.zeros((3, 3, 16), f32), k, k, 2)
    with pytest.raises(ValueError, match="window must be a positive"):
        ops.attention_prompt(q, k, k, 2, window=0)
    with pytest.raises(TypeError, match="must be float32"):
        ops.attention_prompt(q.astype(np.float16), k, k, 2)


def test_bind_attention_checks_the_cache_types():
    d, q, k = 16, np.zeros(32, f32), np.zeros(16, f32)
    cos, scores, out = np.zeros((4, 8), f32), np.zeros(8, f32), np.zeros(32, f32)
    i8, h = np.zeros((4, 1, d), np.int8), np.zeros((4, 1, d), np.float16)
    with pytest.raises(ValueError, match="scales go with an int8 cache"):
        ops.bind_attention(q, k, k, None, cos, cos, i8, i8.copy(), 2, scores, out)
    with pytest.raises(ValueError, match="scales go with an int8 cache"):
        s = np.zeros((4, 1), f32)
        ops.bind_attention(q, k, k, None, cos, cos, h, h.copy(), 2, scores, out, s, s)
    with pytest.raises(TypeError, match="float32, float16 or int8"):
        ops.bind_attention(q, k, k, None, cos, cos, h, i8, 2, scores, out)
    with pytest.raises(ValueError, match="unknown KV cache type 'f8'"):
        KVCache("f8", 1, 1, 1, d)


# relative bounds against the float32 cache: logits (prompt and decode paths), perplexity (the issue's)
LOGITS = {"f16": 2e-3, "q8": 3e-2}
PPL = {"f16": 1e-3, "q8": 1e-2}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_type", ["f16", "q8"])
def test_logits_and_perplexity_against_the_f32_cache(arch, kv_type):
    c = tiny_config(arch, max_context=512)
    t = random_weights(c, 5)
    ref, m = Transformer(c, t, kv_type="f32"), Transformer(c, t, kv_type=kv_type)
    ids = np.random.default_rng(1).integers(0, c.vocab, 2 * 512)
    want = ref.forward(ids[:48], 0, all_logits=True).copy()
    prompt = m.forward(ids[:48], 0, all_logits=True).copy()
    m.reset()
    steps = np.stack([m.forward([x], i).copy() for i, x in enumerate(ids[:48])])
    assert rel(prompt, want) < LOGITS[kv_type]
    assert rel(steps, want) < LOGITS[kv_type]
    assert rel(steps, prompt) < 5e-4  # both paths read the same stored cache
    assert rel(prompt, want) > 1e-6  # the cache really is stored in the type
    p_ref, p = perplexity(ref, ids, 512, 2), perplexity(m, ids, 512, 2)
    assert abs(p.ppl / p_ref.ppl - 1) < PPL[kv_type], (p.ppl, p_ref.ppl)


def test_prompt_then_decode_continues_from_the_stored_cache():
    c = tiny_config("llama", max_context=64)
    m = Transformer(c, random_weights(c, 2), kv_type="q8")
    ids = list(range(3, 23))
    full = m.forward(ids, 0, all_logits=True).copy()
    m.forward(ids[:12], 0)
    steps = np.stack([m.forward([x], 12 + i).copy() for i, x in enumerate(ids[12:])])
    assert rel(steps, full[12:]) < 5e-4


@pytest.mark.parametrize("kv_type", KV_TYPES)
def test_cache_bytes(kv_type):
    c = tiny_config("qwen2", head_dim=16, n_kv_heads=2, n_layers=3)
    m = Transformer(c, random_weights(c), max_context=40, kv_type=kv_type)
    assert m.kv.nbytes == memory.kv_cache_bytes(c, 40, kv_type)
    assert memory.kv_cache_bytes(c, 40, kv_type) == 2 * 3 * 40 * 2 * {"f32": 64, "f16": 32, "q8": 20}[kv_type]
    assert f"{m.kv.nbytes:,} bytes" in m.kv.describe()


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LUTENGINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    return str(write_gguf(tmp_path / "m.gguf", "llama"))


def test_generate_refuses_before_loading(gguf, monkeypatch, capsys):
    load_module = importlib.import_module("engine.load")  # engine.load may also name the function
    need = memory.for_model(gguf, None, "f16").need
    monkeypatch.setenv(memory.LIMIT_ENV, str((need >> 20) - 1))
    monkeypatch.setattr(load_module, "load", lambda *a, **k: pytest.fail("loaded a model that will not fit"))
    assert cli.main(["generate", "-m", gguf, "-p", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"lutengine: error: {gguf}: will not fit: needs about")
    assert memory.LIMIT_ENV in err
    assert cli.main(["info", gguf]) == 0
    assert "will not fit" in capsys.readouterr().out
    # q8 and a short context need less: a limit between the two needs lets that one through
    small = memory.for_model(gguf, 16, "q8").need
    assert small < need
    monkeypatch.setenv(memory.LIMIT_ENV, str(small / 2**20 + 0.01))
    assert memory.check(gguf, 16, "q8") is not None
    with pytest.raises(memory.MemoryLimitError):
        memory.check(gguf, None, "f16")
    monkeypatch.setenv(memory.LIMIT_ENV, "lots")
    with pytest.raises(memory.ModelError, match="LUTENGINE_MEMORY_LIMIT_MB='lots' is not a number"):
        memory.available()


def test_estimate_counts_weights_cache_and_overhead(gguf, monkeypatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "100000")
    est = memory.for_model(gguf, 100, "f32")
    cfg = memory.source_config(Path(gguf))
    assert est.need == est.weights + memory.kv_cache_bytes(cfg, 100, "f32") + memory.OVERHEAD
    assert est.fits and est.available == 100000 << 20
    dense = memory.for_model(gguf, 100, "f32", dense=True)
    assert dense.weights == 4 * sum(math.prod(s) for s in cfg.expected_shapes().values())


def test_kv_type_flag(gguf, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "-m", gguf, "-p", "hi", "--kv-type", "f64"])
    assert e.value.code == 2
    assert "argument --kv-type: invalid choice: 'f64'" in capsys.readouterr().err
    assert cli.main(["generate", "-m", gguf, "-p", "the", "-n", "3", "--temp", "0", "--kv-type", "q8", "-v"]) == 0
    err = capsys.readouterr().err
    assert "KV cache q8, 256 positions x 2 layers: " in err
    assert cli.main(["info", gguf, "--kv-type", "q8", "-c", "100", "--json"]) == 0
    assert '"kv_cache": "q8, 100 positions: 16,000 bytes"' in capsys.readouterr().out


def test_load_defaults_to_f16(gguf):
    from engine import load

    assert memory.DEFAULT_KV_TYPE == "f16"
    assert load(gguf).transformer.kv.kv_type == "f16"
    assert load(gguf, kv_type="q8").transformer.kv.kv_type == "q8"
    with pytest.raises(ValueError, match="unknown KV cache type 'int4'"):
        load(gguf, kv_type="int4")
