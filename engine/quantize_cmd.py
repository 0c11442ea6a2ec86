"""`lutengine quantize SRC -o OUT`: a model source to a lutengine quantized file.

Everything that can be checked is checked before the long work starts (settings,
output folder, calibration text, shapes), so a mistake costs seconds and leaves
no file. Progress is a bar over layers on stderr; each layer's summary (relative
error per linear layer: on its output over the calibration tokens when there are
some, else on its weights; stored bits per weight) goes to stdout. The file is
written to a temporary name and renamed (models/qfile.write).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SHORT = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def add_arguments(p) -> None:
    from .quant import DEFAULT

    p.add_argument("source", metavar="SRC", help="catalog name, GGUF file or HF folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write (*.safetensors)")
    p.add_argument("--bpw", type=float, metavar="B",
                   help="the best recipe for a budget of B bits per weight on the linear layers: each layer's bits "
                        "and group where its output error is largest (gptq; --method rtn: no calibration)")
    p.add_argument("--method", help=f"rtn, hlq, gptq, msb, binary or ternary (default: {DEFAULT['method']})")
    p.add_argument("--grid", help="grid rtn and gptq round to: rtn, int (integer levels, no stored offsets: llama.cpp's "
                   "Q4_0/Q5_0/Q8_0 grid, kept exactly), and for gptq hlq, msb, or trellis (each column's bits chosen "
                   "by the Viterbi algorithm, 1..6 bits) (default: trellis with --bpw below 4, else rtn)")
    p.add_argument("--bits", type=int, default=DEFAULT["bits"], help="planes per weight, 1..8 (msb: a sign plane + bits-1 magnitude planes; binary 1 or 2; "
                        "ternary 2) (default: %(default)s)")
    p.add_argument("--group", type=int, default=DEFAULT["group"],
                   help="columns per group: 32, 64, 128, 256 or a matrix's row length; lowered per matrix "
                        "to the largest size dividing it (default: %(default)s)")
    p.add_argument("--symmetric", action="store_true", help="no offsets, grid symmetric around 0")
    p.add_argument("--scale-bits", type=int, choices=(16, 8),
                   help="8 stores each group's scale and offset in 8 bits instead of 16 (rtn only; 4 bits at "
                        "group 32: 4.5 instead of 5.0 bits per weight) (default: 8 for rtn at up to 4 bits, else 16)")
    p.add_argument("--head-bits", type=int, default=DEFAULT["head_bits"],
                   help="bits of the output head, round to nearest (default: %(default)s)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: columns by decreasing Hessian diagonal (default: on with --bpw or --grid trellis, else off)")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize in a randomly rotated hidden space, fused into the weights (no run-time cost; "
                        "default: on for gptq, except with --bpw 4 or more; else off)")
    p.add_argument("--dense-target", type=float, metavar="A",
                   help="gptq: aim each layer this fraction (0..1) of the way at the dense model's output "
                        "rather than at its own weights, undoing upstream error (default: 0.15 for gptq at up to 3 "
                        "bits or with --bpw below 4; else 0)")
    p.add_argument("--tune", type=int, default=DEFAULT["tune"], metavar="EPOCHS",
                   help="gptq: after each block, fit its scales, offsets and norm gains to the dense model's output "
                        "for this many passes over the calibration tokens (bits unchanged; 0: off) (default: %(default)s)")
    p.add_argument("--calib", metavar="FILE", help="calibration text, never an evaluation text "
                   "(e.g. ../shared/data/c4-calib.txt); without one gptq samples its calibration text from the model")
    p.add_argument("--n-calib", type=int, default=DEFAULT["n_calib"], metavar="N",
                   help="calibration sequences (default: %(default)s)")
    p.add_argument("--calib-len", type=int, default=DEFAULT["calib_len"], metavar="L",
                   help="tokens per calibration sequence (default: %(default)s)")
    p.add_argument("--layer", action="append", default=[], metavar="GLOB=BITS[/GROUP][:GRID]",
                   help="per-layer override on full tensor names, e.g. '*.mlp.down_proj.weight=4' or "
                        "'*.v_proj.weight=8/32:int' (GRID swaps the rtn and int grids; repeatable; later ones win)")


def quant_settings(args) -> dict:
    from .quant import DEFAULT

    method = args.method or ("gptq" if args.bpw is not None else DEFAULT["method"])
    return {"method": method, "bpw": args.bpw, "bits": args.bits, "group": args.group, "symmetric": args.symmetric,
            "scale_bits": args.scale_bits, "head_bits": args.head_bits, "grid": args.grid, "act_order": args.act_order,
            "rotate": args.rotate, "dense_target": args.dense_target, "calib": args.calib,
            "n_calib": args.n_calib, "calib_len": args.calib_len, "layers": parse_layers(args.layer), "tune": args.tune}


def parse_layers(specs: list[str]) -> dict:
    out = {}
    for spec in specs:
        glob, _, value = spec.rpartition("=")
        value, _, grid = value.partition(":")
        bits, _, group = value.partition("/")
        try:
            out[glob] = {"bits": int(bits), **({"group": int(group)} if group else {}),
                         **({"grid": grid} if grid else {})}
        except ValueError:
            raise ValueError(f"--layer {spec!r}: expected GLOB=BITS, GLOB=BITS/GROUP or either with :GRID") from None
        if not glob:
            raise ValueError(f"--layer {spec!r}: expected GLOB=BITS, GLOB=BITS/GROUP or either with :GRID")
    return out


def check_output(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the output name must end in .safetensors (lutengine runs files by that suffix)")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: cannot write: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write into {folder} (permission denied)")


def run(args) -> int:
    from models import qfile
    from models.load import open_source

    from .quant import calib, check_model, method_label, reads_once, sampled, settings

    start = time.perf_counter()
    s = settings(quant_settings(args))
    out = Path(args.output).expanduser()
    check_output(out)
    if s["calib"] is not None:
        calib.read_text(s["calib"])  # an unreadable text fails before the model loads
    calibrated = sampled(s) or s["calib"] is not None
    src = open_source(args.source, progress=True, lazy=reads_once(s, calibrated))
    check_model(s, src.config, s["calib_len"] if calibrated else None)
    label = (f"{method_label(s)} {s['bpw']} bpw" if s["bpw"] is not None
             else f"{method_label(s)} {s['bits']}-bit g{s['group']}")
    where = (f"of {s['calib']}" if s["calib"] is not None else
             "sampled from the model itself (no --calib; a text like the model will read does better)")
    print(f"{args.source}: {label}" + (f", calibration {s['n_calib']} x {s['calib_len']} tokens {where}"
                                        if calibrated else ""), flush=True)
    tokens = _calibration(s, src)
    if s["bpw"] is not None:
        print("planning the budget first: every layer at every format" +
              (", then each layer's end-to-end sensitivity" if tokens is not None else "") +
              " (minutes, before the first layer shows)", flush=True)
    weights, info = _quantize(src.config, src.tensors, s, tokens, label)
    qfile.write(out, src.config, weights, src.tok, info=info, source={"path": str(src.path), "sha256": src.sha256},
                quantizer=s)
    print(summary(out, weights, time.perf_counter() - start))
    return 0


def _calibration(s, src):
    from tqdm import tqdm

    from .quant import calibration, sampled

    if not sampled(s):
        return calibration(s, src)
    n = s["n_calib"]
    with tqdm(total=n * s["calib_len"], desc="sampling calibration text", unit="token", file=sys.stderr,
              dynamic_ncols=True) as bar:
        return calibration(s, src, lambda: bar.update(n))


def _quantize(config, tensors, s, tokens, label):
    from tqdm import tqdm

    from .quant import quantize_model

    kind = "output" if tokens is not None else "weight"
    with tqdm(total=config.n_layers, desc=label, unit="layer", file=sys.stderr, dynamic_ncols=True) as bar:
        def on_layer(i, stats, tuned):
            bar.write(layer_line(i, stats, kind, tuned), file=sys.stdout)
            bar.update(1)
        return quantize_model(config, tensors, s, tokens, on_layer)


def layer_line(i: int, stats: dict, kind: str, tuned: tuple[float, float] | None = None) -> str:
    """One block: relative error per linear layer, the block's stored bits per weight, and
    with tuning the block's relative output error before and after it."""
    errs = " ".join(f"{SHORT.get(_suffix(n), _suffix(n))} {e:.4f}" for n, (e, _, _) in stats.items())
    bits = sum(b * w for _, b, w in stats.values()) / sum(w for _, _, w in stats.values())
    line = f"layer {i:3d}  {kind} err  {errs}  | {bits:.3f} bpw"
    return line if tuned is None else f"{line}  | tuned block err {tuned[0]:.4f} -> {tuned[1]:.4f}"


def summary(path: Path, weights: dict, seconds: float) -> str:
    import lutkernels as lk

    from .quant import EMBED, HEAD

    linear = [w for n, w in weights.items() if isinstance(w, lk.QUANTIZED) and n != HEAD]
    bits = sum(w.bits_per_weight() * w.M * w.K for w in linear) / sum(w.M * w.K for w in linear)
    size = path.stat().st_size
    return (f"wrote {path}: {size:,} bytes ({size / 2**20:.1f} MiB); linear layers {bits:.3f} bpw, "
            f"head {weights[HEAD].bits_per_weight():.3f} bpw, embedding {8 * weights[EMBED].itemsize} bits; "
            f"{seconds:.0f} s")


def _suffix(name: str) -> str:
    return name.split(".", 3)[-1].rsplit(".", 1)[0]

