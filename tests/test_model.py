"""The transformer runtime (engine/model.py) and the RTN quantizer (engine/quant) on tiny random models."""
import math
import tracemalloc

import numpy as np
import pytest

import lutkernels as lk
from engine import model as em
from engine.model import Transformer, rope_inv_freq
from engine.quant import DEFAULT, quantize_model, rotate, rtn, settings
from models.config import MLP_MIX, ModelConfig, ModelError
from tiny_models import random_weights

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tiny_config(arch="llama", **kw) -> ModelConfig:
    base = dict(arch=arch, n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128, vocab=100,
                norm_eps=1e-5, rope_theta=10000.0 if arch == "llama" else 1e6, tied_embeddings=arch == "llama",
                max_context=64)
    return ModelConfig(**{**base, **kw})


CONFIGS = {"llama-tied": tiny_config("llama"), "qwen2-untied-bias": tiny_config("qwen2")}


@pytest.fixture(params=list(CONFIGS))
def cfg(request) -> ModelConfig:
    return CONFIGS[request.param]


# Plain multi-head attention, a head size that leaves tails in the C dot products (20 = 8+8+4), and
# an MLP width whose rotation mixes 3 Hadamard blocks (96 = 3 x 32)
ODD = {**CONFIGS, "llama-mha-head20": tiny_config("llama", n_heads=8, n_kv_heads=8, head_dim=20, ffn=96)}


@pytest.fixture(params=list(ODD))
def any_cfg(request) -> ModelConfig:
    return ODD[request.param]


def quantized(config, tensors, **quant):
    return quantize_model(config, tensors, quant)[0]


def dequantized(weights: dict) -> dict:
    """The same weights with every PackedLinear as its float32 matrix."""
    return {k: lk.dense(w) if isinstance(w, lk.PackedLinear) else w for k, w in weights.items()}


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- an independent reference: float64, no cache, explicit loops over heads ----------------------

def reference_logits(c: ModelConfig, t: dict, ids) -> np.ndarray:
    f = {k: np.asarray(lk.dense(v) if isinstance(v, lk.PackedLinear) else v, np.float64) for k, v in t.items()}
    n, d = len(ids), c.head_dim
    x = f[EMBED][ids]
    inv = 1.0 / c.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + c.norm_eps) * w

    def rotate_half(v):
        return np.concatenate([-v[..., d // 2:], v[..., :d // 2]], -1)

    def proj(h, p, name):
        y = h @ f[p + name + ".weight"].T
        return y + f[p + name + ".bias"] if p + name + ".bias" in f else y

    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        h = norm(x, f[p + "input_layernorm.weight"])
        q = proj(h, p, "self_attn.q_proj").reshape(n, c.n_heads, d)
        k = proj(h, p, "self_attn.k_proj").reshape(n, c.n_kv_heads, d)
        v = proj(h, p, "self_attn.v_proj").reshape(n, c.n_kv_heads, d)
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        out = np.zeros((n, c.n_heads, d))
        for head in range(c.n_heads):
            g = head // (c.n_heads // c.n_kv_heads)
            s = np.einsum("id,jd->ij", q[:, head], k[:, g]) / math.sqrt(d)
            s[np.triu(np.ones((n, n), bool), 1)] = -np.inf
            pr = np.exp(s - s.max(1, keepdims=True))
            out[:, head] = (pr / pr.sum(1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(n, -1) @ f[p + "self_attn.o_proj.weight"].T
        h = norm(x, f[p + "post_attention_layernorm.weight"])
        gate, up = proj(h, p, "mlp.gate_proj"), proj(h, p, "mlp.up_proj")
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f[p + "mlp.down_proj.weight"].T
    head = f[HEAD] if HEAD in f else f[EMBED]
    return norm(x, f["model.norm.weight"]) @ head.T


IDS = [3, 17, 99, 0, 42, 42, 7, 63, 12, 5, 88, 31]


def test_dense_matches_independent_reference(any_cfg):
    cfg = any_cfg
    t = random_weights(cfg)
    m = Transformer(cfg, t)
    got = m.forward(IDS, 0, all_logits=True)
    ref = reference_logits(cfg, t, IDS)
    assert got.shape == (len(IDS), cfg.vocab) and got.dtype == np.float32
    assert rel(got, ref) < 2e-6
    m.reset()
    steps = np.stack([m.forward([tok], i).copy() for i, tok in enumerate(IDS)])  # the C decode path
    assert rel(steps, ref) < 2e-6


def test_last_token_logits_are_the_last_row(cfg):
    m = Transformer(cfg, random_weights(cfg))
    full = m.forward(IDS, 0, all_logits=True)
    last = m.forward(IDS, 0)
    assert last.shape == (cfg.vocab,)
    np.testing.assert_allclose(last, full[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("quant", [False, True])
def test_decode_token_by_token_equals_one_pass(any_cfg, quant):
    cfg = any_cfg
    t = random_weights(cfg, 1)
    m = Transformer(cfg, quantized(cfg, t) if quant else t)
    full = m.forward(IDS, 0, all_logits=True).copy()
    m.reset()
    steps = np.stack([m.forward([tok], i).copy() for i, tok in enumerate(IDS)])
    # quantized: decode and batch feed the LUT tables slightly different activations (C vs numpy
    # norms), and table rounding amplifies that up to the table error itself (see the next test)
    assert rel(steps, full) < (3e-2 if quant else 2e-6)


def test_prompt_in_pieces_and_attention_blocks(cfg, monkeypatch):
    t = random_weights(cfg, 2)
    m = Transformer(cfg, t)
    full = m.forward(IDS, 0, all_logits=True).copy()
    monkeypatch.setattr(em, "ATTN_BLOCK", 3)
    m.reset()
    a = m.forward(IDS[:5], 0, all_logits=True)
    b = m.forward(IDS[5:], 5, all_logits=True)
    np.testing.assert_allclose(np.concatenate([a, b]), full, rtol=1e-5, atol=1e-5)


def test_rewind_recomputes_from_the_cache(cfg):
    m = Transformer(cfg, random_weights(cfg, 3))
    m.forward(IDS, 0)
    again = m.forward(IDS[4:], 4, all_logits=True).copy()
    m.reset()
    np.testing.assert_allclose(again, m.forward(IDS, 0, all_logits=True)[4:], rtol=1e-5, atol=1e-5)


def test_quantized_path_matches_dense_of_the_same_weights(cfg):
    """Packed layers through the LUT kernels vs their dequantized float32 matrices through numpy:
    the only difference left is the kernel's int8 activation tables. Those cost about 0.75% relative
    error per 4-bit matmul on Gaussian activations (lutkernels.reference reproduces it), compounded
    here over 2 blocks and the head: a few hundredths of a logit, so the predicted token may only
    differ where the dense model's top two are closer than that."""
    w = quantized(cfg, random_weights(cfg, 4))
    q = Transformer(cfg, w).forward(IDS, 0, all_logits=True)
    d = Transformer(cfg, dequantized(w)).forward(IDS, 0, all_logits=True)
    assert rel(q, d) < 3e-2
    top2 = np.sort(d, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.mean() >= 0.5 and (q.argmax(-1) == d.argmax(-1))[clear].all()
    x = np.random.default_rng(0).standard_normal((8, cfg.hidden)).astype(np.float32)
    layer = w["model.layers.0.mlp.gate_proj.weight"]
    assert rel(lk.gemm(layer, x), x @ lk.dense(layer).T) < 1.2e-2


def test_quantized_model_layout(cfg):
    w = quantized(cfg, random_weights(cfg), group=128)
    assert w[EMBED].dtype == np.float16
    assert isinstance(w[HEAD], lk.PackedLinear) and w[HEAD].P == 8  # tied: a packed copy of the embedding
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, lk.PackedLinear) and (q.P, q.G) == (4, 64) and q.offsets is not None
    assert w["model.layers.1.mlp.down_proj.weight"].G == 128
    assert w["model.norm.weight"].dtype == np.float32


def test_from_source_dense_and_quantized(cfg):
    from models.source import ModelSource, TokenizerInfo

    t = random_weights(cfg)
    src = ModelSource(path=None, format="hf", config=cfg, tensors=t, tok=TokenizerInfo(None, 1, (2,), True, None))
    dense = Transformer.from_source(src, None, max_context=32)
    assert dense.max_context == 32 and dense.tok is src.tok
    np.testing.assert_allclose(dense.forward(IDS, 0), Transformer(cfg, t).forward(IDS, 0), rtol=1e-6, atol=1e-6)
    q = Transformer.from_source(src, {"bits": 3})
    assert q.max_context == cfg.max_context
    assert q.weights["model.layers.0.mlp.up_proj.weight"].P == 3


def test_rotation_keeps_the_function(any_cfg):
    """The rotated weights (norm gains folded, hidden space and value heads turned) differ from
    the source everywhere, yet the model computes the same logits."""
    t = random_weights(any_cfg)
    r = rotate.rotate(any_cfg, t)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight", EMBED):
        assert rel(r[name], t[name]) > 0.5
    assert np.all(r["model.layers.1.input_layernorm.weight"] == 1) and np.all(r["model.norm.weight"] == 1)
    assert r[HEAD].shape == (any_cfg.vocab, any_cfg.hidden)  # its own head, tied or not
    source = Transformer(any_cfg, t).forward(IDS, 0, all_logits=True)
    m = Transformer(any_cfg, r)
    assert m.mlp_rotation is not None
    assert rel(m.forward(IDS, 0, all_logits=True), source) < 1e-5
    m.reset()
    steps = np.stack([m.forward([tok], i).copy() for i, tok in enumerate(IDS)])  # the C decode path
    assert rel(steps, source) < 1e-5


def test_mlp_rotation_must_fit_the_model(cfg):
    r = rotate.rotate(cfg, random_weights(cfg))
    with pytest.raises(ModelError, match=r"MLP rotation must be signs \[128\] and mix \[1, 1\], got \(128,\) and \(2, 2\)"):
        Transformer(cfg, {**r, MLP_MIX: np.eye(2, dtype=np.float32)})
    with pytest.raises(ModelError, match="needs both"):
        Transformer(cfg, {n: v for n, v in r.items() if n != MLP_MIX})


@pytest.mark.parametrize("rot", [False, True])
def test_quantize_model_rotated_or_not_stays_the_model(cfg, rot):
    """8-bit layers in either basis give the source model's logits up to the kernels' int8 tables
    (as in the test above); a rotated file's head is packed from the rotated head, not from the
    rotated embedding, which would be far off."""
    t = random_weights(cfg)
    w = quantized(cfg, t, bits=8, rotate=rot)
    assert rel(Transformer(cfg, w).forward(IDS, 0, all_logits=True),
               Transformer(cfg, t).forward(IDS, 0, all_logits=True)) < 3e-2
    assert (rel(w[EMBED].astype(np.float32), t[EMBED]) > 0.5) == rot


def test_max_context_defaults_to_at_most_4096():
    c = tiny_config(max_context=100_000)
    assert Transformer(c, random_weights(c)).max_context == 4096


def test_position_and_token_checks(cfg):
    m = Transformer(cfg, random_weights(cfg), max_context=8)
    with pytest.raises(ValueError, match="exceed the context of 8"):
        m.forward(list(range(9)), 0)
    m.forward(list(range(6)), 0)
    with pytest.raises(ValueError, match="exceed the context"):
        m.forward([1, 2, 3], 6)
    m.forward([1, 2], 6)  # exactly fills the cache
    with pytest.raises(ValueError, match="exceed the context"):
        m.forward([1], 8)
    m.reset()
    with pytest.raises(ValueError, match="position 3"):
        m.forward([1], 3)  # nothing cached before it
    with pytest.raises(ValueError, match="token id"):
        m.forward([cfg.vocab], 0)
    with pytest.raises(ValueError, match="no tokens"):
        m.forward([], 0)


def test_missing_or_misshapen_weights_are_model_errors(cfg):
    t = random_weights(cfg)
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        Transformer(cfg, t)
    t = random_weights(cfg)
    t["model.norm.weight"] = t["model.norm.weight"][:10]
    with pytest.raises(ModelError, match="model.norm.weight has shape"):
        Transformer(cfg, t)


@pytest.mark.parametrize("quant", [False, True])
def test_decode_step_allocates_no_arrays(quant):
    """The smallest per-token temporary here (one hidden vector) is 2 KiB; what a step may allocate
    is view objects and numpy's call machinery (the dense path's matmul), a few hundred bytes."""
    c = tiny_config(hidden=512, n_heads=8, n_kv_heads=2, head_dim=64, ffn=1024, vocab=1000)
    t = random_weights(c)
    m = Transformer(c, quantized(c, t) if quant else t)
    logits = m.forward(IDS[:4], 0)
    grown = []
    tracemalloc.start()
    try:
        for i in range(4, 12):
            token = int(logits.argmax())
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            logits = m.forward([token], i)
            now, peak = tracemalloc.get_traced_memory()
            grown.append(max(peak, now) - start)
    finally:
        tracemalloc.stop()
    # tracemalloc counts every thread, and threads that earlier tests leave behind allocate now and
    # then (one step of a full run on a loaded machine went over); a per-token temporary shows in
    # every step, so one step of the eight may go over.
    assert sorted(grown)[-2] < 1024, grown


def test_bound_calls_check_their_arrays():
    from lutkernels import ops

    f32 = np.float32
    q, k, out, scores = np.zeros(64, f32), np.zeros(32, f32), np.zeros(64, f32), np.zeros(4 * 8, f32)
    cache = np.zeros((8, 2, 16), f32)
    cos = np.zeros((8, 8), f32)
    step = ops.bind_attention(q, k, k.copy(), None, cos, cos.copy(), cache, cache.copy(), 4, scores, out)
    with pytest.raises(ValueError, match="position 8 outside the cache of 8"):
        step(8)
    with pytest.raises(ValueError, match="same positions"):
        ops.bind_attention(q, k, k, None, cos[:4], cos[:4], cache, cache, 4, scores, out)
    with pytest.raises(ValueError, match="scores must have 32 elements"):
        ops.bind_attention(q, k, k, None, cos, cos, cache, cache, 4, scores[:8], out)
    with pytest.raises(TypeError, match="float32"):
        ops.bind_silu_mul(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.bind_add_rmsnorm(np.zeros(8, f32)[::2], None, np.zeros(4, f32), 1e-5, np.zeros(4, f32))


def test_decode_returns_a_reused_buffer(cfg):
    m = Transformer(cfg, random_weights(cfg))
    a = m.forward([5], 0)
    b = m.forward([6], 1)
    assert np.shares_memory(a, b)


# ---- RoPE scaling -----------------------------------------------------------------------------

def hf_llama3(inv, factor, lo, hi, old):
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
        elif wavelen > old / lo:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_rope_scaling():
    c = tiny_config(head_dim=128, n_heads=1, n_kv_heads=1, hidden=128, rope_theta=500000.0)
    base = rope_inv_freq(c)
    np.testing.assert_allclose(base, 1 / 500000.0 ** (np.arange(0, 128, 2) / 128))
    lin = tiny_config(head_dim=128, n_heads=1, n_kv_heads=1, hidden=128, rope_theta=500000.0,
                      rope_scaling={"type": "linear", "factor": 4.0})
    np.testing.assert_allclose(rope_inv_freq(lin), base / 4)
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    l3 = tiny_config(head_dim=128, n_heads=1, n_kv_heads=1, hidden=128, rope_theta=500000.0, rope_scaling=rs)
    got = rope_inv_freq(l3)
    np.testing.assert_allclose(got, hf_llama3(base, 8.0, 1.0, 4.0, 8192), rtol=1e-12)
    assert got[0] == base[0] and got[-1] == base[-1] / 8  # short wavelengths kept, long ones slowed
    with pytest.raises(ModelError, match="unsupported rope_scaling type 'yarn'"):
        rope_inv_freq(tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_linear_rope_scaling_is_position_division():
    c = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    cos, sin = em.rope_tables(c, 16)
    cos0, sin0 = em.rope_tables(tiny_config(), 32)
    np.testing.assert_allclose(cos[::1][:16:2], cos0[:8], atol=1e-6)
    np.testing.assert_allclose(sin[:16:2], sin0[:8], atol=1e-6)


# ---- RTN ------------------------------------------------------------------------------------

def rtn_case(seed, M=37, K=256):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((M, K)) * 0.05).astype(np.float32)
    W[2, :64] = 1e-7 * rng.standard_normal(64)  # a group so narrow its step is tiny (subnormal float16)
    W[3, :64] = 0.25  # a constant group: zero step
    W[4, 64:128] = rng.standard_normal(64) * 3 + 50  # a group far from zero: offset rounding matters
    return W


@pytest.mark.parametrize("scale8", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, 64, 256])
def test_rtn_pack_is_exactly_the_reconstruction(bits, symmetric, G, scale8):
    W = rtn_case(bits * 10 + G)
    if scale8:
        W[4] /= 10  # 8-bit scales end at 7.75: the far group's 1-bit step would not fit
    c = rtn.codes(W, bits, G, symmetric, scale8)
    w = rtn.to_packed(c)
    assert w.uniform and w.scales.shape[2] == 1  # one stored scale (s/2) per group, not one per plane
    per_row = bits + (8 if scale8 else 16) * (1 if symmetric else 2) / G  # then rows padded to whole tiles
    assert w.scale8 is scale8 and w.bits_per_weight() == pytest.approx(per_row * w.tiles * 16 / w.M, rel=1e-12)
    np.testing.assert_array_equal(lk.dense(w), rtn.reconstruct(c))
    np.testing.assert_array_equal(lk.dense(rtn.quantize(W, bits, G, symmetric, scale8)), rtn.reconstruct(c))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_8_bit_scales_cost_little_error(bits, symmetric):
    """An 8-bit scale is within 1/32 of the wanted one and the offset within h/16: on 2-4 bits
    the squared error stays within 10% of float16 scales', and no group is far worse."""
    W = rtn_case(bits, M=64, K=512)
    W[2:5] = 0.05 * np.random.default_rng(1).standard_normal((3, 512))  # rtn_case's odd groups: their own test
    sse = [((rtn.reconstruct(rtn.codes(W, bits, 32, symmetric, s8)) - W) ** 2).reshape(64, -1, 32).sum(-1)
           for s8 in (False, True)]
    assert sse[1].sum() <= 1.1 * sse[0].sum() and (sse[1] <= 1.6 * sse[0] + 1e-12).all()


def test_rtn_8_bit_scales_reach_a_constant_group():
    """A group far from zero with no spread: the scale grows until the offset is in reach."""
    W = np.full((16, 32), 0.25, np.float32)
    c = rtn.codes(W, 4, 32, scale8=True)
    assert np.abs(rtn.reconstruct(c) - W).max() <= c.scale.max()


def test_rtn_8_bit_scales_out_of_range_is_a_clear_error_but_a_grid_still_exists():
    """A whole layer out of range is refused; inside gptq (hlq.rtn_grid, codes) the group takes the
    largest scale and clips, since error feedback can push a low-bit group that far."""
    W = np.zeros((16, 32), np.float32)
    W[0, 0] = 1000.0
    with pytest.raises(ValueError, match="weights out of range for 8-bit scales"):
        rtn.quantize(W, 4, 32, scale8=True)
    c = rtn.codes(W, 4, 32, scale8=True)
    assert c.scale[0, 0] == 2 * lk.layout.F8_MAX and np.abs(rtn.reconstruct(c)[1:]).max() == 0
    np.testing.assert_array_equal(lk.dense(rtn.to_packed(c)), rtn.reconstruct(c))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_rtn_spanning_grid_error_is_at_most_half_a_step(monkeypatch, bits, symmetric):
    W = rtn_case(bits)
    G = 64
    monkeypatch.setattr(rtn, "CLIP_STEPS", 0)
    c = rtn.codes(W, bits, G, symmetric)
    err = np.abs(rtn.reconstruct(c).astype(np.float64) - W).reshape(W.shape[0], -1, G).max(-1)
    # the float16 offset can sit up to half its ulp off the group's minimum; that bounds the
    # error of weights clamped at the grid's ends (and float32 rounds the sum once)
    slack = 0 if symmetric else np.abs(c.offset) * 2.0**-11 + 2.0**-25
    assert (err <= c.scale / 2 * (1 + 1e-6) + slack + np.abs(W).reshape(err.shape + (G,)).max(-1) * 2**-23).all()
    assert c.q.max() <= 2**bits - 1
    if symmetric:
        assert c.offset is None
        assert rtn.to_packed(c).offsets is None


@pytest.mark.parametrize("scale8", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_clipped_grids_never_lose_to_the_spanning_one(monkeypatch, bits, symmetric, scale8):
    """Per group the search keeps the spanning grid unless a finer one has less squared error;
    on Gaussian weights the finer ones win overall, most at 2 bits; above CLIP_MAX_BITS none is tried."""
    W = np.random.default_rng(bits).standard_normal((64, 256)).astype(np.float32) * 0.05

    def sse():
        return ((rtn.reconstruct(rtn.codes(W, bits, 64, symmetric, scale8)) - W) ** 2).reshape(64, 4, 64).sum(-1)
    searched = sse()
    monkeypatch.setattr(rtn, "CLIP_STEPS", 0)
    spanning = sse()
    assert (searched <= spanning * (1 + 1e-6)).all()
    if bits > rtn.CLIP_MAX_BITS:
        np.testing.assert_array_equal(searched, spanning)
    else:
        assert searched.sum() < {2: 0.8, 3: 0.9}[bits] * spanning.sum()


def test_rtn_keeps_a_group_already_on_a_uniform_grid():
    """A Q4_1 source at 4 bits in its own groups of 32 keeps its codes and steps, clipped grids offered or not."""
    rng = np.random.default_rng(5)
    q = rng.integers(0, 16, (32, 128))
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans its whole grid
    d = rng.uniform(0.01, 0.02, (32, 4, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, (32, 4, 1)).astype(np.float16).astype(np.float32)
    W = (q.reshape(32, 4, 32) * d + m).reshape(32, 128).astype(np.float32)
    c = rtn.codes(W, 4, 32)
    np.testing.assert_array_equal(c.q, q)
    np.testing.assert_array_equal(c.scale, np.broadcast_to(d[..., 0], c.scale.shape))


def test_rtn_codes_are_round_to_nearest():
    W = np.array([[0.0, 1.0, 2.0, 3.0] * 8], np.float32)  # asymmetric 2-bit: the grid is exactly 0..3
    c = rtn.codes(W, 2, 32)
    np.testing.assert_array_equal(c.q[0], np.array([0, 1, 2, 3] * 8))
    np.testing.assert_array_equal(rtn.reconstruct(c), W)


@pytest.mark.parametrize("scale8", [False, True])
def test_rtn_row_chunks_stack(monkeypatch, scale8):
    W = rtn_case(7, M=100, K=128)
    whole = rtn.quantize(W, 4, 64, scale8=scale8)
    monkeypatch.setattr(rtn, "ROW_CHUNK", 32)
    chunked = rtn.quantize(W, 4, 64, scale8=scale8)
    assert chunked.M == 100 and chunked.scale8 is scale8
    for a, b in ((whole.planes, chunked.planes), (whole.scales, chunked.scales), (whole.offsets, chunked.offsets)):
        np.testing.assert_array_equal(a, b)


def test_group_size_choice():
    assert rtn.group_size(576) == 64
    assert rtn.group_size(896) == 128
    assert rtn.group_size(1536, 256) == 256
    assert rtn.group_size(96) == 32
    assert rtn.group_size(576, 576) == 576
    with pytest.raises(lk.LayoutError):
        rtn.group_size(48)


def test_quant_settings():
    assert settings(None) == {**DEFAULT, "scale_bits": 8, "grid": "rtn", "act_order": False, "rotate": False, "dense_target": 0.0}
    assert settings({"bits": 2}) == {**DEFAULT, "bits": 2, "scale_bits": 8, "grid": "rtn", "act_order": False, "rotate": False, "dense_target": 0.0}
    with pytest.raises(ValueError, match="unknown quantizer settings: colour"):
        settings({"colour": 1})
    with pytest.raises(ValueError, match="bits must be"):
        settings({"bits": 9})
    with pytest.raises(ValueError, match="unknown quantization method"):
        settings({"method": "wgm2"})
    with pytest.raises(ValueError, match="gptq needs calibration tokens"):
        quantize_model(CONFIGS["llama-tied"], random_weights(CONFIGS["llama-tied"]), {"method": "gptq"})
    with pytest.raises(ValueError, match="ternary takes bits 2, got 3"):
        settings({"method": "ternary", "bits": 3})
    with pytest.raises(ValueError, match=r"binary takes bits 1 or 2, got 4 \(layer override"):
        settings({"method": "binary", "bits": 1, "layers": {"*.down_proj.weight": {"bits": 4}}})
