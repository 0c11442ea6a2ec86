"""Quantizers: float32 weights to PackedLinear layers, and the settings that choose them.

Settings are a plain dict (stored verbatim in the quantized model file):
    method     "rtn" (round to nearest, rtn.py), "hlq" (a scale per plane, hlq.py),
               "gptq" (error compensation from calibration activations, gptq.py),
               "msb" (the seed paper's magnitude bands as sign + magnitude planes, msb.py),
               "binary" (sign planes with a scale and mean per group, binary.py)
               or "ternary" ({-s, 0, +s} per group, ternary.py)
    bits       planes per linear layer weight (1..8): for msb a sign plane and bits - 1
               magnitude planes; binary takes 1 or 2, ternary is always 2
    group      preferred group size; lowered per matrix to the largest kernel group size
               dividing K; must be a kernel group size (32, 64, 128, 256) or some matrix's K
    symmetric  no offsets, grid symmetric around 0
    scale_bits 16 (float16 scales and offsets) or 8 (8-bit float scales, int8 offsets:
               lutkernels/layout.py; on the rtn grid only, rtn or gptq: 4 bits at G = 32
               cost 4.5 instead of 5.0 bits per weight); None picks 8 for the rtn grid
               at up to 4 bits (its offsets reach 16 scales: enough for 4-bit grids, not
               for wider ones), else 16; under a bpw budget the plan picks per layer
               among both widths (None) or the one given.
               The head keeps float16 scales
    head_bits  bits of the output head (lm_head, or a packed copy of a tied embedding),
               always round to nearest
    grid       the grid rtn and gptq round to: "rtn", "int" (rtn.py: the integer grid, levels s times
               -2^(b-1) .. 2^(b-1) - 1 and no stored offset, as llama.cpp's Q4_0 / Q5_0 / Q8_0, which
               it keeps exactly; 2..8 bits, float16 scales), and for gptq "hlq", "msb", or "trellis"
               (trellis.py: each column's stream chosen by the Viterbi algorithm, k <= 6 bits per
               weight, a float32 scale per row; layers planned above 6 bits go to the rtn grid); None: "trellis" for gptq under a budget
               below 4 bits, else "rtn" (SmolLM2 --bpw 3.3 wiki: 18.407 on the rtn grid, 16.399 on trellis)
    act_order  gptq takes columns by decreasing Hessian diagonal; None: on for gptq under a bpw budget
               (SmolLM2 --bpw 3.3: wiki 48.0 against 60.8 without) or on the trellis grid, off otherwise
    rotate     quantize in a rotated hidden space (rotate.py: exact, fused into the weights);
               None: on for gptq, except under a budget of 4 bits or more or on the integer grid,
               off otherwise (SmolLM2,
               wiki, measured before rtn's clip search: gptq 3 bits G 64 40.1 -> 26.8, gptq-rtn4g64 18.579 -> 16.569, rtn3g64
               117.5 -> 557; --bpw 4.5 14.714 -> 15.887, where 4 bits in groups of 32 can
               keep the Q4_1 source's own grid, which rotation dissolves)
    dense_target  gptq aims each layer this fraction (0..1) of the way at the output the dense
               model gives on its own inputs, rather than at its own weights (gptq.aim);
               None: 0.15 for gptq at up to 3 bits or under a budget below 4 bits, else 0
               (Qwen2.5-Coder gptq-rtn4g128s8-ao, wiki: 20.938 without, 21.261 with it; and
               4 bits in groups of 32 keep a Q4_1 source's own grid, which a moved target leaves)
    tune       epochs of block tuning after gptq (tune.py: scales, offsets and norm gains fitted to
               the dense model's stream after each block, codes and bits unchanged); 0: none
    calib      calibration text; None: gptq calibrates on sequences sampled from the model
               itself (sample.py); with rtn/hlq a text only measures output errors
    n_calib    calibration sequences ...
    calib_len  ... of this many tokens (calib.py, sample.py)
    layers     per-layer overrides {glob: {"bits": b, "group": g, "scale_bits": s, "grid": "rtn" or "int"}}
               on full tensor names (fnmatch, e.g. "*.mlp.down_proj.weight"); later globs win; a grid
               override swaps the rtn grid and the integer grid
    bpw        a budget of bits per weight over the linear layers: layers gets the plan
               (budget.py) that spends it where the error costs the model most; method rtn
               (weight errors, no calibration) or gptq on the rtn grid
"""
from __future__ import annotations

import os
from collections import ChainMap
from fnmatch import fnmatchcase
from typing import Callable

import numpy as np

import lutkernels as lk
from models.config import ModelConfig, ModelError

from . import binary, budget, calib, gptq, hlq, msb, rotate, rtn, sample, ternary, trellis, tune

DEFAULT = {"method": "rtn", "bits": 4, "group": 32, "symmetric": False, "scale_bits": None, "head_bits": 8,
           "grid": None, "act_order": None, "rotate": None, "calib": None, "n_calib": 64, "calib_len": 512, "layers": {}, "bpw": None,
           "dense_target": None, "tune": 0}
# raise when what the same settings make changes: local models converted to the default format
# and cached (engine/load.py) are then converted again
QUANTIZER_VERSION = 1

# calibration-free methods: (W, bits, group, symmetric) -> PackedLinear; gptq needs the Hessian of W's inputs
METHODS: dict[str, Callable | None] = {
    "rtn": rtn.quantize, "hlq": hlq.quantize, "gptq": None,
    "msb": lambda W, bits, group, symmetric: msb.quantize(W, bits - 1, group),
    "binary": lambda W, bits, group, symmetric: binary.quantize(W, bits, group),
    "ternary": lambda W, bits, group, symmetric: ternary.quantize(W, group)}
PLANES = {"binary": (1, 2), "ternary": (2,)}  # methods that take only some plane counts
# a group's weights [R, G] -> its grid, for gptq
GRIDS = {"rtn": hlq.rtn_grid, "int": lambda Wg, bits, symmetric: hlq.rtn_grid(Wg, bits, int_grid=True),
         "hlq": lambda Wg, bits, symmetric: hlq.fit_groups(Wg, bits, symmetric)[0],
         "msb": lambda Wg, bits, symmetric: msb.grid(Wg, bits - 1)}
GRID_NAMES = (*GRIDS, "trellis")
ROUNDING = ("rtn", "int")  # the grids rtn rounds to; a layer override may swap them
OVERRIDES = ("bits", "group", "scale_bits", "grid")
DENSE_TARGET = 0.15  # gptq's default mix (gptq.aim)

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"

# block index, {tensor name: (relative error, bits per weight as stored, weights)}, and with tuning the
# block's relative output error before and after it (tune.py), else None; the layer errors are on
# the layer's output over the calibration tokens (as gptq left it) when there are some, else on its weights
LayerReport = Callable[[int, dict[str, tuple[float, float, int]], tuple[float, float] | None], None]


def settings(quant: dict | None = None) -> dict:
    """DEFAULT updated by `quant`, checked."""
    s = {**DEFAULT, **(quant or {})}
    unknown = set(s) - set(DEFAULT)
    if unknown:
        raise ValueError(f"unknown quantizer settings: {', '.join(sorted(unknown))}")
    if s["method"] not in METHODS:
        raise ValueError(f"unknown quantization method {s['method']!r} (known: {', '.join(METHODS)})")
    if s["grid"] is None:
        s["grid"] = "trellis" if s["method"] == "gptq" and s["bpw"] is not None and s["bpw"] < 4 else "rtn"
    if s["grid"] not in GRID_NAMES:
        raise ValueError(f"unknown gptq grid {s['grid']!r} (known: {', '.join(GRID_NAMES)})")
    if s["method"] == "rtn" and s["grid"] not in ROUNDING:
        raise ValueError(f"rtn rounds to the {' or '.join(ROUNDING)} grid, not {s['grid']!r}")
    _check_layer(s, "", s["method"])
    _check_int(s["head_bits"], "head_bits", 1, 8)
    if s["act_order"] is None:
        s["act_order"] = s["method"] == "gptq" and (s["bpw"] is not None or s["grid"] == "trellis")
    if s["rotate"] is None:  # the integer grid is there to keep a source's grid, which rotation dissolves
        s["rotate"] = s["method"] == "gptq" and s["grid"] != "int" and (s["bpw"] is None or s["bpw"] < 4)
    if s["dense_target"] is None:
        low = s["bits"] <= 3 if s["bpw"] is None else s["bpw"] < 4
        s["dense_target"] = DENSE_TARGET if s["method"] == "gptq" and low else 0.0
    _check_number(s["dense_target"], "dense_target", 0, 1)
    if s["dense_target"] and s["method"] != "gptq":
        raise ValueError(f"dense_target is a gptq setting, not one of {s['method']}")
    for key in ("symmetric", "act_order", "rotate"):
        if not isinstance(s[key], bool):
            raise ValueError(f"{key} must be true or false, got {s[key]!r}")
    for key in ("n_calib", "calib_len"):
        _check_int(s[key], key, 1)
    _check_int(s["tune"], "tune", 0)
    if s["tune"] and s["method"] != "gptq":
        raise ValueError(f"tune is a gptq setting (it tunes the scales of gptq's codes), not one of {s['method']}")
    if s["calib"] is not None and not isinstance(s["calib"], str):
        raise ValueError(f"calib must be a file path, got {s['calib']!r}")
    if s["bpw"] is not None:
        _check_number(s["bpw"], "bpw", 1, 9, " of bits per weight")
        if s["method"] not in ("rtn", "gptq") or s["grid"] not in ("rtn", "trellis"):
            raise ValueError(f"a bpw budget plans formats on the rtn grid (method rtn or gptq, quantized on the "
                             f"rtn or trellis grid), not {method_label(s)}")
        if s["layers"]:
            raise ValueError("a bpw budget plans every layer's format itself: drop the layer overrides")
    if not isinstance(s["layers"], dict):
        raise ValueError(f"layers must map name patterns to settings, got {s['layers']!r}")
    for pattern, over in s["layers"].items():
        if not isinstance(over, dict) or set(over) - set(OVERRIDES):
            raise ValueError(f"layer override {pattern!r}: {over!r} may only set {', '.join(OVERRIDES)}")
        _check_layer(over, f" (layer override {pattern!r})", s["method"])
        if "grid" in over and (over["grid"] not in ROUNDING or s["grid"] not in (*ROUNDING, "trellis")):
            raise ValueError(f"layer override {pattern!r}: a grid override swaps the {' and '.join(ROUNDING)} "
                             f"grids (settings grid {s['grid']!r}), got {over['grid']!r}")
    for where, o in [("", s), *((f" (layer override {p!r})", o) for p, o in s["layers"].items())]:
        if o.get("grid", s["grid"]) == "int" and (s["symmetric"] or o.get("bits", s["bits"]) < 2 or
                                                  8 in (s["scale_bits"], o.get("scale_bits"))):
            raise ValueError(f"the integer grid{where} takes 2..8 bits on 16-bit scales and is symmetric by "
                             f"itself: drop --symmetric and 8-bit scales")
    if s["method"] == "gptq" and s["grid"] == "trellis":
        _check_trellis(s)
    # a budget's plan puts layers above the trellis grid's bits on the rtn grid
    rtn_grid = s["method"] == "rtn" or (s["method"] == "gptq" and (s["grid"] in ROUNDING or
                                                                  (s["grid"] == "trellis" and s["bpw"] is not None)))
    trellis_only = s["method"] == "gptq" and s["grid"] == "trellis" and s["bpw"] is None  # no rtn layers
    if s["scale_bits"] is None and s["bpw"] is None and not trellis_only:
        widest = max([s["bits"]] + [o.get("bits", 0) for o in s["layers"].values()])
        s["scale_bits"] = 8 if rtn_grid and widest <= 4 and s["grid"] != "int" else 16
    if any(o.get("scale_bits") == 8 for o in [s, *s["layers"].values()]) and not rtn_grid:
        raise ValueError(f"8-bit scales are made on the rtn grid (method rtn or gptq), not {method_label(s)}")
    return s


def layer_settings(s: dict, name: str) -> tuple[int, int, bool, bool]:
    """(bits, preferred group, 8-bit scales, integer grid) of one linear layer, overrides applied."""
    out = {k: s[k] for k in OVERRIDES}
    for pattern, over in s["layers"].items():
        if fnmatchcase(name, pattern):
            out.update(over)
    return out["bits"], out["group"], out["scale_bits"] == 8, out["grid"] == "int"


def check_model(s: dict, config: ModelConfig, calib_len: int | None = None) -> None:
    """What settings() cannot see without the model: every group and override fits some
    matrix, calibration sequences (of calib_len tokens, None: none) fit the context, gptq has some."""
    shapes = {f"model.layers.{i}.{n}": shape for i in range(config.n_layers)
              for n, shape in config.linear_shapes().items()}
    widths = sorted({K for _, K in shapes.values()})
    for pattern in s["layers"]:
        if not any(fnmatchcase(name, pattern) for name in shapes):
            raise ValueError(f"layer override {pattern!r} matches no linear layer "
                             f"(names look like model.layers.0.mlp.down_proj.weight)")
    for name, (_, K) in [*shapes.items(), (HEAD, (config.vocab, config.hidden))]:
        group = layer_settings(s, name)[1] if name != HEAD else s["group"]
        if group not in lk.GROUP_SIZES and group not in widths:
            raise ValueError(f"group size {group} fits no matrix of this model: use one of "
                             f"{', '.join(map(str, lk.GROUP_SIZES))} or a row length ({', '.join(map(str, widths))})")
        rtn.group_size(K, group)
    check_forward(s, config, calib_len is not None)
    if s["method"] == "gptq" and calib_len is None:
        raise ValueError("gptq needs calibration tokens (engine.quant.calibration)")
    if calib_len is not None and calib_len > config.max_context:
        raise ValueError(f"calibration sequences of {calib_len} tokens exceed the model's "
                         f"context of {config.max_context}")


def check_forward(s: dict, config: ModelConfig, calibrated: bool) -> None:
    """Calibration, rotation, block tuning and budget plans run the llama forward (calib.py,
    sample.py, rotate.py, tune.py, budget.py): refused for models that compute something else."""
    if config.llama_forward:
        return
    used = [name for name, on in (("gptq", s["method"] == "gptq"), ("calibration text", calibrated),
                                  ("rotate", s["rotate"]), ("tune", s["tune"]), ("bpw", s["bpw"] is not None)) if on]
    if used:
        raise ModelError(f"unsupported: {', '.join(used)} for {config.arch} models "
                         f"(sliding windows, gemma3's norms or soft-capping); use rtn, hlq, msb, binary or ternary")


def sampled(s: dict) -> bool:
    """Whether settings s calibrate on sequences the model samples itself: gptq given no text."""
    return s["calib"] is None and s["method"] == "gptq"


def calibration(s: dict, src, on_step: Callable[[], None] | None = None) -> np.ndarray | None:
    """The calibration tokens [n_calib, calib_len] settings s (checked) ask of a model source
    (models.source.ModelSource): windows of the calib text; when sampled(s), sequences the
    model samples itself (sample.py; on_step after each of its calib_len steps); else None."""
    n, length = s["n_calib"], s["calib_len"]
    check_forward(s, src.config, s["calib"] is not None)
    if s["calib"] is not None:
        return calib.tokens(calib.read_text(s["calib"]), src.tok, n, length, s["calib"])
    if not sampled(s):
        return None
    workers = calib.Workers(_cores())
    try:
        return sample.sequences(src.config, src.tensors, sample.start_token(src.tok), n, length, workers,
                                on_step=on_step)
    finally:
        workers.close()


def method_label(s: dict) -> str:
    return f"gptq+{s['grid']}" if s["method"] == "gptq" else s["method"]


def quantize_model(config: ModelConfig, tensors: dict[str, np.ndarray], quant: dict | None = None,
                   tokens: np.ndarray | None = None, on_layer: LayerReport | None = None):
    """HF-named float32 tensors -> (weights, info).

    weights: every linear layer and the head as PackedLinear, the embedding as
    float16 (only rows are looked up), norms and biases float32. A tied head
    becomes a packed copy under lm_head.weight. info: {name: {"method", "bits"}}
    for every packed layer. tokens: calibration sequences [n, L] (calibration()), which
    gptq needs; with them every layer is quantized on the outputs of the layers
    quantized before it. on_layer hears about each block when it is done."""
    s = settings(quant)
    check_model(s, config, None if tokens is None else tokens.shape[1])
    # block tuning replaces norm gains, in a copy; where each tensor is read once, a lazy source
    # (models/source.py) stays lazy: each is made, quantized and let go in turn (bounded memory)
    tensors = ChainMap({}, tensors) if reads_once(s, tokens is not None) else dict(tensors)
    workers = calib.Workers(_cores())
    try:
        if s["rotate"]:
            tensors = rotate.rotate(config, tensors, workers=workers)
        if s["bpw"] is not None:
            opts, sizes = budget.options(config, tensors, tokens, workers, s["scale_bits"])
            if tokens is not None:
                opts = budget.weigh(opts, budget.sensitivity(config, tensors, tokens, opts, workers))
            if s["grid"] == "trellis":
                opts = budget.on_trellis(opts, config)
            s = {**s, "layers": budget.plan(opts, sizes, s["bpw"])}
        packed = _linear_layers(config, tensors, s, tokens, workers, on_layer)
    finally:
        workers.close()
    weights: dict[str, np.ndarray | lk.PackedLinear] = {}
    for name in tensors:  # by name: reading a lazy source's linear layers again would dequantize them
        if name not in packed and name not in (HEAD, EMBED):
            weights[name] = np.asarray(tensors[name], np.float32)
    weights.update(packed)
    info = {name: {"method": method_label(s), "bits": w.P} for name, w in packed.items()}
    head = tensors[HEAD] if HEAD in tensors else tensors[EMBED]  # rotation gives a tied model its own head
    weights[HEAD] = rtn.quantize(np.asarray(head, np.float32), s["head_bits"], s["group"], s["symmetric"],
                                 int_grid=s["grid"] == "int" and s["head_bits"] >= 2)
    del head  # before the embedding is read: one float copy of the largest tensor at a time
    info[HEAD] = {"method": "rtn", "bits": s["head_bits"]}
    weights[EMBED] = _to_f16(tensors[EMBED])
    return weights, info


def reads_once(s: dict, calibrated: bool) -> bool:
    """Whether quantize_model with settings s (checked) reads each source tensor once: no calibration,
    rotation or budget plan, which read them again and again."""
    return not calibrated and not s["rotate"] and s["bpw"] is None


def _linear_layers(config, tensors, s, tokens, workers, on_layer) -> dict[str, lk.PackedLinear]:
    packed: dict[str, lk.PackedLinear] = {}
    stats: dict[str, tuple[float, float, int]] = {}
    block_errors: dict[int, tuple[float, float]] = {}

    def quantize(name: str, f: gptq.Factor | None = None, D: np.ndarray | None = None, split: bool = True) -> None:
        """split: the call may use the worker threads, as it does not run on one of them (a pool
        thread waiting on its own pool can deadlock it): aim splits its products, rounding grids
        quantize row blocks."""
        W = np.asarray(tensors[name], np.float32)
        if D is not None:
            W = gptq.aim(W, f, D, s["dense_target"], workers if split else None)
        bits, group, scale8, int_grid = layer_settings(s, name)
        if f is not None and trellis_layer(s, bits):
            packed[name] = trellis.quantize(W, f, bits)
            return
        if f is None and (scale8 or int_grid):
            packed[name] = rtn.quantize(W, bits, group, s["symmetric"], scale8, int_grid)
            return
        if f is None:
            packed[name] = METHODS[s["method"]](W, bits, group, s["symmetric"])
            return
        G = rtn.group_size(W.shape[1], group)
        if scale8:
            fit_grid = lambda Wg: hlq.rtn_grid(Wg, bits, s["symmetric"], scale8=True)  # noqa: E731
        else:
            grid = "int" if int_grid else "rtn" if s["grid"] in (*ROUNDING, "trellis") else s["grid"]
            fit_grid = lambda Wg: GRIDS[grid](Wg, bits, s["symmetric"])  # noqa: E731
        one = lambda Wr: gptq.quantize(Wr, f, G, fit_grid)  # noqa: E731
        rows = workers.blocks(one, W) if split else [one(W)]
        packed[name] = hlq.stack_rows(rows).packed(scale8, int_grid)

    def fit(names: list[str], X: np.ndarray, Xd: np.ndarray | None = None) -> list[np.ndarray]:
        H = calib.hessian(X, workers)
        if s["method"] == "gptq":
            factor = workers.aside(gptq.factor, H, s["act_order"])
            aims = [None] * len(names) if Xd is None else \
                calib.dense_products(Xd, X[:len(Xd)], [np.asarray(tensors[n], np.float32) for n in names], workers)
            f = factor.result()
            if s["grid"] == "trellis":  # a trellis layer's rows are one sequence: layers run side by side
                workers.map(lambda nD: quantize(*nD, split=False), [(n, f, D) for n, D in zip(names, aims)])
            else:
                for n, D in zip(names, aims):
                    quantize(n, f, D)
        else:
            workers.map(quantize, names)
        out = [lk.dense(packed[n]) for n in names]
        H32 = H.astype(np.float32)
        for n, Wq in zip(names, out):
            stats[n] = (calib.output_error(np.asarray(tensors[n], np.float32), Wq, H32, workers),
                        packed[n].bits_per_weight(), Wq.size)
        return out

    def report(i: int) -> None:
        if on_layer is not None:
            prefix = f"model.layers.{i}."
            on_layer(i, {n: v for n, v in stats.items() if n.startswith(prefix)}, block_errors.get(i))

    dense_stream = None  # the dense model's stream beside the quantized one, for tuning

    def tuned(i: int, x_in: np.ndarray, x: np.ndarray) -> None:
        nonlocal dense_stream
        if dense_stream is None:  # block 0's input: the embedded tokens, the same in both
            dense_stream = x_in.copy()
        block_errors[i] = tune.tune_block(config, tensors, packed, i, x_in, x, dense_stream, tokens.shape[1],
                                          s["tune"], workers)

    if tokens is not None:
        for i, _ in calib.layers(config, tensors, tokens, fit, workers,
                                 dense_inputs=_dense_sequences(s, len(tokens)), after=tuned if s["tune"] else None):
            report(i)
        return packed
    for i in range(config.n_layers):
        names = [f"model.layers.{i}.{n}" for n in config.linear_shapes()]
        workers.map(quantize, names)
        for n in names if on_layer is not None else ():
            W = np.asarray(tensors[n], np.float32)
            err = np.linalg.norm(lk.dense(packed[n]) - W) / np.linalg.norm(W)
            stats[n] = (float(err), packed[n].bits_per_weight(), W.size)
        report(i)
    return packed


def _dense_sequences(s: dict, n: int) -> int:
    """Calibration sequences the dense stream runs on, for gptq with a dense target: half of them.
    It costs a forward pass of the dense model, the quantizer's largest cost (README: quantizing
    Qwen2.5-Coder in under 10 minutes); SmolLM2 gptq-rtn3g64s8-ao gave wiki 19.270 / c4 69.201
    with half and 19.379 / 67.338 with all of them."""
    return (n + 1) // 2 if s["method"] == "gptq" and s["dense_target"] > 0 else 0


def trellis_layer(s: dict, bits: int) -> bool:
    """Whether settings s (checked) quantize a gptq layer of these bits on the trellis grid."""
    return s["method"] == "gptq" and s["grid"] == "trellis" and bits <= lk.trellis.MAX_BITS


def _check_trellis(s: dict) -> None:
    if s["symmetric"]:
        raise ValueError("the trellis grid has no offsets to drop: --symmetric does not apply")
    if s["tune"]:
        raise ValueError("tune fits the scales of rounding grids (rtn, hlq, msb), not the trellis grid")
    if s["bpw"] is None:
        if s["scale_bits"] is not None:
            raise ValueError("trellis layers store a float32 scale per row: scale_bits does not apply")
        for where, o in [("", s), *((f" (layer override {p!r})", o) for p, o in s["layers"].items())]:
            if o.get("bits", 0) > lk.trellis.MAX_BITS:
                raise ValueError(f"the trellis grid takes 1..{lk.trellis.MAX_BITS} bits, got {o['bits']}{where}")


def _check_int(v, key: str, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        span = f"{lo}..{hi}" if hi is not None else f"of at least {lo}"
        raise ValueError(f"{key} must be an integer {span}, got {v!r}")


def _check_number(v, key: str, lo: float, hi: float, unit: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f"{key} must be a number{unit} from {lo} to {hi}, got {v!r}")


def _check_layer(s: dict, where: str, method: str) -> None:
    if "bits" in s:
        _check_int(s["bits"], "bits" + where, 1, 8)
        allowed = PLANES.get(method)
        if allowed and s["bits"] not in allowed:
            raise ValueError(f"{method} takes bits {' or '.join(map(str, allowed))}, got {s['bits']}{where}")
    if "group" in s:
        _check_int(s["group"], "group" + where, 32)
    if s.get("scale_bits") is not None and (s["scale_bits"] not in (8, 16) or isinstance(s["scale_bits"], bool)):
        raise ValueError(f"scale_bits{where} must be 16 or 8, got {s['scale_bits']!r}")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def _to_f16(a: np.ndarray) -> np.ndarray:
    h = np.asarray(a).astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("embedding out of float16 range")
    return h
