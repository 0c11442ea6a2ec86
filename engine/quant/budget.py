"""Mixed precision under a bits budget: which (bits, group) each linear layer gets for `--bpw B`.

Every layer is tried at each CANDIDATES format on the uniform (rtn) grid, whose stored bits per
weight are exact and known before quantizing (bits + 32/G, or bits + 16/G with 8-bit scales, the
format's uniform mode, padding included). The hlq grid (a scale per plane) is no candidate: under
gptq it did worse at more bits (SmolLM2, 3 bits, act-order, one group per row: wiki 20.725 / c4
78.345 at 3.15 bpw against the rtn grid's 20.617 / 75.169 at 3.04). A layer's error at a format is
the relative output error e = ||X ΔWᵀ||² / ||X Wᵀ||² on the calibration inputs X of the dense model
(from H = XᵀX/N: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)); without calibration (method rtn), on the weights (H = I).
Relative errors of one layer's formats compare directly; across layers they are worth different
amounts to the model, so with calibration each layer's errors are weighted by its sensitivity:
the KL divergence of the model's next-token distributions when that layer alone is rounded to a
3-bit probe format, per unit of its e under the probe (sensitivity(); KL grows with the noise power
the error stands for).
The plan minimises the summed weighted error under

    sum_l bpw_l * n_l <= B * sum_l n_l         (n_l: the layer's weights)

by a Lagrange multiplier: each layer takes the format minimising w*e + lam * bpw * n_l / N,
and bisection finds the smallest lam whose plan fits. No layer gets fewer bits than the best
uniform format that fits (floor): the proxy is trusted to trade group sizes and scale widths
and to place extra bits, not to take bits away. The plan is never above
the budget; GPTQ then lowers every layer's error further on the same formats.
"""
from __future__ import annotations

import numpy as np

import lutkernels as lk
from models.config import ModelConfig

from ..model import EMBED, HEAD, NORM, rmsnorm
from . import calib, rtn

# (bits, group, scale bits); 8-bit scales up to 4 bits (as rtn's default). Before the plan had a floor
# and gptq rotated, 8-bit scales below 4 bits were left out: the free 3.3-bpw plan took 3-bit ones nearly
# everywhere and gave wiki 142.9 against 59.2 with 16-bit scales; since, gptq with act-order on the rotated
# model gives 3 bits G 64 with 8-bit scales (3.25 bpw) 27.2, and 22.3 since rtn grids search clipping steps.
# ROW: one group per row, G = K. Rotated rows are near-Gaussian with one variance along the row, so
# wide groups lose less than their saved bits buy elsewhere: rotated SmolLM2, relative squared weight
# error with 8-bit scales, 2 bits 0.110 in groups of 64 (2.25 bpw) and 0.125 per row of 576 (2.03).
ROW = 0
TRELLIS = -1  # the group of a trellis format in a plan: it has none (on_trellis)
# The third field is how scales and offsets are stored: 16 or 8 bits, or INT, the integer grid (rtn.py:
# float16 scales, no offsets). It keeps a GGUF source's Q5_0 / Q8_0 layers exactly at 5.5 / 8.5 bits.
INT = "int"
CANDIDATES = [(b, G, s) for b, G in [(1, ROW), (1, 256), (1, 128), (1, 64), (2, ROW), (2, 256), (2, 128), (2, 64),
                                     (2, 32), (3, ROW), (3, 256), (3, 128), (3, 64), (3, 32), (4, ROW), (4, 256),
                                     (4, 128), (4, 64), (4, 32), (5, 32), (6, 32), (8, 32)]
              for s in (16, 8) if s == 16 or b <= 4] + \
    [(b, G, INT) for b in (4, 5, 6, 8) for G in (256, 128, 64, 32)]
BISECT = 60

# layer name -> [(bits, group, scale bits or INT, bits per weight as stored, relative output error)]
Options = dict[str, list[tuple[int, int, int, float, float]]]


def options(config: ModelConfig, tensors: dict[str, np.ndarray], tokens: np.ndarray | None,
            workers: calib.Workers, scale_bits: int | None = None) -> tuple[Options, dict[str, int]]:
    """Each layer's formats with their cost and error, and its weight count; scale_bits
    keeps only the candidates of that scale width (None: both)."""
    opts: Options = {}
    sizes: dict[str, int] = {}

    def measure(names: list[str], H: np.ndarray | None) -> list[np.ndarray]:
        out = []
        for name in names:
            W = np.asarray(tensors[name], np.float32)
            sizes[name] = W.size
            opts[name] = [o for b, G, sb in _fitting(W.shape[1], scale_bits)
                          if (o := _option(W, b, G, sb, H, workers)) is not None]
            out.append(W)
        return out

    if tokens is not None:
        def fit(names: list[str], X: np.ndarray) -> list[np.ndarray]:
            return measure(names, calib.hessian(X, workers).astype(np.float32))
        for _ in calib.layers(config, tensors, tokens, fit, workers):
            pass
    else:
        names = [f"model.layers.{i}.{n}" for i in range(config.n_layers) for n in config.linear_shapes()]
        workers.map(lambda n: measure([n], None), names)
    return opts, sizes


COST, ERROR = 3, 4  # an option's bits per weight and relative error
PROBE_BITS, PROBE_GROUP = 3, 128  # the format whose end-to-end damage is measured: 3 bits, float16 scales, the
# largest group up to 128 (as before row groups were candidates)
SENS_SEQS, SENS_LEN = 4, 128  # calibration tokens the damage is measured on: ~2.5 minutes for SmolLM2;
# 16 x 128 did not plan better (SmolLM2 --bpw 3.3 wiki / c4 18.479 / 63.839 against 18.407 / 63.210)


def sensitivity(config: ModelConfig, tensors: dict[str, np.ndarray], tokens: np.ndarray, opts: Options,
                workers: calib.Workers) -> dict[str, float]:
    """Each layer's end-to-end damage per unit of its relative output error: the KL divergence
    of the model's next-token distributions from the dense ones when that layer alone is
    rounded to the probe format, over its error under the probe. Output errors of different
    layers are not worth the same: on rotated SmolLM2 a v_proj's costs ~40 times a gate_proj's."""
    sel = tokens[np.linspace(0, len(tokens) - 1, min(SENS_SEQS, len(tokens))).astype(int), :SENS_LEN]
    start = {}  # block -> the dense residual stream before it
    x = None
    for i, x in calib.layers(config, tensors, sel, lambda names, X: [tensors[n] for n in names], workers):
        start[i + 1] = x.copy()
    start[0] = np.asarray(tensors[EMBED])[sel.ravel()].astype(np.float32)
    ref = _log_probs(config, tensors, x)
    p = np.exp(ref)

    def damage(name: str) -> float:
        i = int(name.split(".")[2])
        probe = max((o for o in opts[name] if o[0] == PROBE_BITS and o[2] == 16 and o[1] <= PROBE_GROUP),
                    key=lambda o: o[1])
        Wq = lk.dense(rtn.quantize(np.asarray(tensors[name], np.float32), PROBE_BITS, probe[1]))
        one = calib.Workers(1)
        try:
            *_, (_, y) = calib.layers(config, tensors, sel, lambda names, X: [Wq if n == name else tensors[n] for n in names],
                                      one, (i, start[i]))
        finally:
            one.close()
        kl = float(np.einsum("tv,tv->", p, ref - _log_probs(config, tensors, y)) / len(ref))
        return kl / probe[ERROR] if probe[ERROR] > 0 else 0.0

    return dict(zip(opts, workers.map(damage, list(opts))))


def weigh(opts: Options, weights: dict[str, float]) -> Options:
    """Options whose errors count each layer's end-to-end weight (sensitivity())."""
    return {n: [(*o[:ERROR], o[ERROR] * weights[n]) for o in v] for n, v in opts.items()}


def _log_probs(config: ModelConfig, tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    head = tensors[HEAD] if HEAD in tensors else tensors[EMBED]
    z = rmsnorm(x, tensors[NORM], config.norm_eps) @ np.asarray(head, np.float32).T
    z -= z.max(1, keepdims=True)
    z -= np.log(np.exp(z).sum(1, keepdims=True))
    return z


def on_trellis(opts: Options, config: ModelConfig) -> Options:
    """The options of a plan for the trellis grid (engine/quant/trellis.py): at up to its 6 bits a
    layer's format is its bits alone, priced at what the trellis layer stores and weighed by the
    rtn grid's error at those bits in one group per row (the nearest rounding grid to a scale per
    row; at bits with no such candidate, the best group measured); the trellis layer's own error is
    lower, about in proportion at every bits. Above 6 bits the rtn formats as measured. Trellis
    formats have group TRELLIS, the same for every layer, so the floor (floor()) can hold every
    layer to the same bits."""
    out: Options = {}
    for name, v in opts.items():
        M, K = config.linear_shapes()[name.split(".", 3)[3]]
        trellis = []
        for b in sorted({o[0] for o in v if o[0] <= lk.trellis.MAX_BITS}):
            at = [o for o in v if o[0] == b]
            proxy = min((o for o in at if o[1] == K), default=None, key=lambda o: o[ERROR]) or \
                min(at, key=lambda o: o[ERROR])
            trellis.append((b, TRELLIS, 16, lk.trellis.bits_per_weight(M, K, b), proxy[ERROR]))
        out[name] = trellis + [o for o in v if o[0] > lk.trellis.MAX_BITS]
    return out


def plan(opts: Options, sizes: dict[str, int], bpw: float) -> dict[str, dict[str, int]]:
    """{layer name: {"bits", "group", "scale_bits"[, "grid": "int"]}} with the least total error whose
    bits fit `bpw`, no layer with fewer bits than the uniform floor (floor()) unless it loses nothing
    by them: a format below the floor's bits stays open to a layer where its error is no larger
    than the floor format's (a source's own grid: Qwen2.5-Coder's Q4_K down_proj layers keep their
    4 bits, on the lattice rtn finds, where the 5-bit integer grid would round them again)."""
    total = sum(sizes.values())
    cheapest = sum(min(o[COST] for o in opts[n]) * sizes[n] for n in opts) / total
    if cheapest > bpw:
        raise ValueError(f"--bpw {bpw}: the smallest format of every layer already takes {cheapest:.3f} bits per weight")
    base = floor(opts, sizes, bpw)
    if base is not None:
        at_floor = {n: next(o for o in v if o[:3] == base)[ERROR] for n, v in opts.items()}
        opts = {n: [o for o in v if o[0] >= base[0] or o[ERROR] <= at_floor[n]] for n, v in opts.items()}

    def choose(lam: float) -> dict[str, tuple]:
        return {n: min(o, key=lambda c: c[ERROR] + lam * c[COST] * sizes[n] / total) for n, o in opts.items()}

    def bits(choice) -> float:
        return sum(c[COST] * sizes[n] for n, c in choice.items()) / total

    lo, hi = 0.0, 1.0
    while bits(choose(hi)) > bpw:
        hi *= 4
    if bits(choose(lo)) <= bpw:
        hi = lo
    for _ in range(BISECT):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if bits(choose(mid)) <= bpw else (mid, hi)
    choice = choose(hi)
    return {n: {"bits": c[0], "group": c[1], "scale_bits": 16, "grid": "int"} if c[2] == INT else
            {"bits": c[0], "group": c[1], "scale_bits": c[2]} for n, c in choice.items()}


def floor(opts: Options, sizes: dict[str, int], bpw: float) -> tuple[int, int, int] | None:
    """The one format (bits, group, scale bits) that every layer could take within the budget: the
    most bits, then the least total error; None if no format fits. No layer gets fewer bits than
    it. Left free, the plan followed its output-error proxy down to 2 bits in layers whose
    damage to the model the proxy misjudges: SmolLM2 --bpw 3.3 (gptq, act-order) gave wiki 48.0
    unrotated and 78.3 rotated, where uniform 3 bits (gptq, act-order, rotated, G 64 with 8-bit
    scales: 3.25 bpw) alone gave 27.2 (all before the sensitivity weights and rtn's clip search).
    Held to the floor's format itself, as the plan was before, --bpw 2.5 left no room (the floor,
    2 bits in groups of 32 with 8-bit scales, costs 2.5 bpw) and gave wiki 50.097 / c4 202.090; with
    layers free to take larger groups at the floor's bits, 33.644 / 122.395; --bpw 3.3 went from
    20.225 / 68.552 to 19.410 / 69.140 and --bpw 1.6 from 1,915 / 6,052 to 1,058 / 3,449 (bench/quality)."""
    total = sum(sizes.values())
    common = set.intersection(*({o[:3] for o in v} for v in opts.values()))
    fits = []
    for f in common:
        chosen = {n: next(o for o in v if o[:3] == f) for n, v in opts.items()}
        if sum(c[COST] * sizes[n] for n, c in chosen.items()) / total <= bpw:
            fits.append((-f[0], sum(c[ERROR] for c in chosen.values()), f))
    return min(fits, key=lambda t: t[:2])[2] if fits else None


def _fitting(K: int, scale_bits: int | None) -> list[tuple[int, int, int]]:
    """The candidates whose group divides K (ROW: K itself) and of the scale width asked for, each format once."""
    formats = [(b, K if G == ROW else G, s) for b, G, s in CANDIDATES
               if scale_bits in (None, s) or (scale_bits == 16 and s == INT)]
    return list(dict.fromkeys(f for f in formats if K % f[1] == 0))


def _option(W: np.ndarray, bits: int, G: int, scale_bits: int, H: np.ndarray | None,
            workers: calib.Workers) -> tuple | None:
    """(bits, G, scale_bits, cost, error), or None where 8-bit scales cannot hold the layer."""
    try:
        return (bits, G, scale_bits, *_cost_error(W, bits, G, scale_bits, H, workers))
    except ValueError:
        if scale_bits != 8:
            raise
        return None


def _cost_error(W: np.ndarray, bits: int, G: int, storage, H: np.ndarray | None,
                workers: calib.Workers) -> tuple[float, float]:
    p = rtn.quantize(W, bits, G, scale8=storage == 8, int_grid=storage == INT)
    Wq = lk.dense(p)
    if H is None:
        return p.bits_per_weight(), float(np.vdot(Wq - W, Wq - W) / np.vdot(W, W))
    return p.bits_per_weight(), calib.output_error(W, Wq, H, workers) ** 2
