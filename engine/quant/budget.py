"""Mixed precision under a bits budget: which (bits, group) each linear layer gets for `--bpw B`.

Every layer is tried at each CANDIDATES format on the uniform (rtn) grid, whose
stored bits per weight are exact and known before quantizing (bits + 32/G, the
format's uniform mode, padding included). Its damage is the relative output
error e = ||X ΔWᵀ||² / ||X Wᵀ||² on the calibration inputs X of the dense model
(from H = XᵀX/N: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)); without calibration text, on the
weights (H = I). Relative errors of different layers add as noise-to-signal
ratios, so the plan minimises their sum under

    sum_l bpw_l * n_l <= B * sum_l n_l         (n_l: the layer's weights)

by a Lagrange multiplier: each layer takes the format minimising e + lam * bpw * n_l / N,
and bisection finds the smallest lam whose plan fits. The plan is never above
the budget; GPTQ then lowers every layer's error further on the same formats.
"""
from __future__ import annotations

import numpy as np

import lutkernels as lk
from models.config import ModelConfig

from . import calib, rtn

CANDIDATES = [(1, 128), (1, 64), (2, 128), (2, 64), (2, 32), (3, 128), (3, 64), (3, 32), (4, 128), (4, 64),
              (4, 32), (5, 32), (6, 32), (8, 32)]
BISECT = 60

# layer name -> [(bits, group, bits per weight as stored, relative output error)]
Options = dict[str, list[tuple[int, int, float, float]]]


def options(config: ModelConfig, tensors: dict[str, np.ndarray], tokens: np.ndarray | None,
            workers: calib.Workers) -> tuple[Options, dict[str, int]]:
    """Each layer's formats with their cost and error, and its weight count."""
    opts: Options = {}
    sizes: dict[str, int] = {}

    def measure(names: list[str], H: np.ndarray | None) -> list[np.ndarray]:
        out = []
        for name in names:
            W = np.asarray(tensors[name], np.float32)
            sizes[name] = W.size
            opts[name] = [(b, G, *_cost_error(W, b, G, H, workers)) for b, G in _fitting(W.shape[1])]
            out.append(W)
        return out

    if tokens is not None:
        for _ in calib.layers(config, tensors, tokens, lambda names, H: measure(names, H.astype(np.float32)),
                              workers):
            pass
    else:
        names = [f"model.layers.{i}.{n}" for i in range(config.n_layers) for n in config.linear_shapes()]
        workers.map(lambda n: measure([n], None), names)
    return opts, sizes


def plan(opts: Options, sizes: dict[str, int], bpw: float) -> dict[str, dict[str, int]]:
    """{layer name: {"bits", "group"}} with the least total error whose bits fit `bpw`."""
    total = sum(sizes.values())
    cheapest = sum(min(o[2] for o in opts[n]) * sizes[n] for n in opts) / total
    if cheapest > bpw:
        raise ValueError(f"--bpw {bpw}: the smallest format of every layer already takes {cheapest:.3f} bits per weight")

    def choose(lam: float) -> dict[str, tuple]:
        return {n: min(o, key=lambda c: c[3] + lam * c[2] * sizes[n] / total) for n, o in opts.items()}

    def bits(choice) -> float:
        return sum(c[2] * sizes[n] for n, c in choice.items()) / total

    lo, hi = 0.0, 1.0
    while bits(choose(hi)) > bpw:
        hi *= 4
    if bits(choose(lo)) <= bpw:
        hi = lo
    for _ in range(BISECT):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if bits(choose(mid)) <= bpw else (mid, hi)
    choice = choose(hi)
    return {n: {"bits": c[0], "group": c[1]} for n, c in choice.items()}


def _fitting(K: int) -> list[tuple[int, int]]:
    """The candidates whose group divides K, each format once."""
    out = {}
    for b, G in CANDIDATES:
        if K % G == 0:
            out[(b, G)] = None
    return list(out)


def _cost_error(W: np.ndarray, bits: int, G: int, H: np.ndarray | None, workers: calib.Workers) -> tuple[float, float]:
    p = rtn.quantize(W, bits, G)
    Wq = lk.dense(p)
    if H is None:
        return p.bits_per_weight(), float(np.vdot(Wq - W, Wq - W) / np.vdot(W, W))
    return p.bits_per_weight(), calib.output_error(W, Wq, H, workers) ** 2
