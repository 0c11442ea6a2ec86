"""The fused decode step: q/k/v and gate/up as one lut_gemm_multi call each (engine/model.py
bind_linears). The same tile kernel computes the same rows from tables of the same x, so every
output must equal the unfused path's bit for bit; layouts that cannot fuse fall back to one call
per layer with the same result."""
import numpy as np
import pytest

import lutkernels as lk
from engine import model as em
from engine.model import Transformer
from engine.quant import quantize_model, rtn
from lutkernels import ops
from lutkernels._lut import ffi, lib
from models.config import ModelConfig
from tiny_models import random_weights

IDS = [3, 17, 99, 0, 42, 42, 7, 63, 12, 5]
EINVAL = -1  # lut.h LUT_EINVAL (an enum, not in the cffi definitions)


def config(arch="llama", **kw) -> ModelConfig:
    # q 96 rows, k/v 24 (not a whole number of 16-row tiles: the tiles of one layer end padded)
    base = dict(arch=arch, n_layers=2, hidden=64, n_heads=8, n_kv_heads=2, head_dim=12, ffn=96, vocab=100,
                norm_eps=1e-5, rope_theta=10000.0, tied_embeddings=arch == "llama", max_context=32)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = lk.get_threads()
    lk.set_threads(request.param)
    yield request.param
    lk.set_threads(before)


def decode(m: Transformer, fuse: bool) -> np.ndarray:
    """Logits of every step decoding IDS one token at a time through a decoder built with `fuse`."""
    m._decoder = em._Decoder(m, fuse=fuse)
    m.reset()
    return np.stack([m.forward([t], i).copy() for i, t in enumerate(IDS)])


def linear_calls(m: Transformer) -> int:
    return sum(any(n in getattr(f, "__qualname__", "") for n in ("bind_gemv", "bind_gemm_multi", "Dense.bind"))
               for pre, _, post in m._decoder.blocks for f in (*pre, *post))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", [{}, {"scale_bits": 16}, {"bits": 8}], ids=["rtn4g32s8", "rtn4g32", "rtn8 exact"])
def test_fused_decode_equals_unfused_bit_for_bit(arch, quant, threads):
    c = config(arch)
    t = random_weights(c, 1)
    w = quantize_model(c, t, quant)[0]
    m = Transformer(c, w)
    unfused = decode(m, False)
    assert linear_calls(m) == 7 * c.n_layers
    fused = decode(m, True)
    assert linear_calls(m) == 4 * c.n_layers  # qkv, o, gate+up, down
    np.testing.assert_array_equal(fused, unfused)
    # and the decode step still computes the model: the dequantized weights in numpy, within the
    # int8 tables' error (test_model's bound; exact tables are far closer)
    dense = Transformer(c, {k: lk.dense(v) if isinstance(v, lk.PackedLinear) else v for k, v in w.items()})
    ref = dense.forward(IDS, 0, all_logits=True)
    assert np.linalg.norm(fused - ref) / np.linalg.norm(ref) < (3e-3 if quant.get("bits") == 8 else 3e-2)


def fallback_weights(c, t, case):
    w = quantize_model(c, t, {})[0]
    name = "model.layers.0.self_attn.k_proj.weight"
    if case == "group":  # k at another group size than q and v: tables of another block size
        w[name] = rtn.quantize(t[name], 4, 64)
    elif case == "dense":  # a float32 layer among packed ones
        w[name] = t[name]
    return w


@pytest.mark.parametrize("case", ["group", "dense"])
def test_layouts_that_cannot_fuse_fall_back(case, threads):
    c = config()
    t = random_weights(c, 2)
    m = Transformer(c, fallback_weights(c, t, case))
    unfused = decode(m, False)
    fused = decode(m, True)
    # layer 0's q/k/v stay three calls, everything else fuses
    assert linear_calls(m) == 4 * c.n_layers + 2
    np.testing.assert_array_equal(fused, unfused)


def packed(rng, M, K, P, G, uniform, scale8, offsets):
    S = 1 if uniform else P
    planes = rng.random((P, M, K)) < 0.5
    scales = rng.uniform(0.01, 0.1, (S, M, K // G)).astype(np.float32)
    off = rng.uniform(-0.05, 0.05, (M, K // G)).astype(np.float32) if offsets else None
    return lk.pack(planes, scales, off, uniform=uniform, scale8=scale8)


def gemm_multi(layers, x, exact):
    Ls = [lk.layer(w) for w in layers]
    ys = [np.full((len(x), L.w.M), np.nan, np.float32) for L in Ls]
    descs = ffi.new("lut_layer *[]", [L.c for L in Ls])
    outs = ffi.new("float *[]", [ffi.cast("float *", ffi.from_buffer(y)) for y in ys])
    rc = lib.lut_gemm_multi(descs, len(Ls), ffi.cast("const float *", ffi.from_buffer(x)), len(x), outs, exact)
    return rc, ys


@pytest.mark.parametrize("n", [1, 3, 8, 12])  # from 4 (fast) or 10 (exact) tokens the integer GEMM
@pytest.mark.parametrize("exact", [0, 1])
def test_gemm_multi_equals_gemm_per_layer(n, exact, threads):
    """Layers of one K and G in every other respect different: M (padded tiles), planes, scale mode and width."""
    rng = np.random.default_rng(n + 10 * exact)
    K, G = 128, 32
    layers = [packed(rng, 17, K, 4, G, True, True, True), packed(rng, 64, K, 2, G, False, False, True),
              packed(rng, 40, K, 3, G, True, False, False), packed(rng, 1, K, 8, G, False, True, False)]
    x = rng.standard_normal((n, K)).astype(np.float32)
    rc, ys = gemm_multi(layers, x, exact)
    assert rc == 0
    for w, y in zip(layers, ys):
        np.testing.assert_array_equal(y, lk.gemm(w, x, exact=bool(exact)))
    yb = [np.zeros((n, w.M), np.float32) for w in layers]
    call = ops.bind_gemm_multi(layers, x, yb, bool(exact))
    call()
    for a, b in zip(yb, ys):
        np.testing.assert_array_equal(a, b)
    if n > 1:  # the first rows alone, as a batched step of fewer rows calls it
        call(n - 1)
        for w, a in zip(layers, yb):
            np.testing.assert_array_equal(a[:n - 1], lk.gemm(w, x[:n - 1].copy(), exact=bool(exact)))


def test_gemm_multi_refuses_what_it_cannot_share():
    rng = np.random.default_rng(0)
    a, b = packed(rng, 16, 128, 2, 32, True, True, True), packed(rng, 16, 128, 2, 64, True, True, True)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    assert gemm_multi([a, b], x, 0)[0] == EINVAL  # another group size
    assert gemm_multi([a, packed(rng, 16, 64, 2, 32, True, True, True)], x, 0)[0] == EINVAL  # another K
    assert gemm_multi([a] * (lib.LUT_FUSE_MAX + 1), x, 0)[0] == EINVAL
    assert not ops.fusable([a, b]) and ops.fusable([a, a])
    with pytest.raises(ValueError, match="cannot fuse"):
        ops.bind_gemm_multi([a, b], x, [np.zeros(16, np.float32)] * 2)
    with pytest.raises(ValueError, match="2 layers need 2 outputs"):
        ops.bind_gemm_multi([a, a], x, [np.zeros(16, np.float32)])
    with pytest.raises(ValueError, match="ys\\[1\\] must have 16 elements"):
        ops.bind_gemm_multi([a, a], x, [np.zeros(16, np.float32), np.zeros(8, np.float32)])
