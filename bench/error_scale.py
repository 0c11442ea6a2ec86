"""How much less error a perplexity target asks of a quantizer: the perplexity of a quantized
file whose linear layers are moved back towards the dense weights the quantizer started from,
W + a·(Wq − W), run in float (engine.model's dense path). At a < 1 the error keeps its pattern
and has a² of its squared size, so the a at which the perplexity reaches a target is the error
a better format would have to reach at the same bits. Run from the repository root:

    python -m bench.error_scale FILE SRC [--text T] [--alpha 1 0.8 0.7 0.6] [--ctx 512 --windows 16]

SRC is the model FILE was quantized from (the SHA-256 or, for files outside the catalog, the
path the file records must match). Files whose block tuning changed the norm gains are refused:
moving their layers back no longer leads to the dense model. The head and the embedding stay as
the file stores them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import engine  # noqa: F401 (OpenBLAS thread setting)
import lutkernels as lk
from engine.quant import rotate
from models import qfile
from models.load import ModelError, open_source


def start_weights(qf: qfile.QFile, src) -> dict[str, np.ndarray]:
    """The dense tensors the quantizer of qf started from: src's, rotated where qf's settings rotate."""
    s = qf.meta.get("quantizer", {})
    made = qf.meta.get("source", {})
    same = made.get("sha256") == src.sha256 if made.get("sha256") or src.sha256 \
        else Path(str(made.get("path"))).resolve() == Path(src.path).resolve()
    if not same:
        raise ValueError(f"{qf.path}: quantized from {made.get('path')} (sha256 {made.get('sha256')}), "
                         f"not from {src.path} (sha256 {src.sha256})")
    if s.get("tune"):
        raise ValueError(f"{qf.path}: block tuning changed its norm gains, so moving its layers back does not "
                         "lead to the dense model")
    return rotate.rotate(src.config, src.tensors) if s.get("rotate") else dict(src.tensors)


def scaled(qf: qfile.QFile, start: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """qf's weights with every packed linear layer of the blocks replaced by W + alpha·(Wq − W) in float32."""
    out = qf.weights
    for name, p in qf.packed.items():
        if name.startswith("model.layers."):
            W = np.asarray(start[name], np.float32)
            out[name] = W + np.float32(alpha) * (lk.dense(p) - W)
    return out


def main(argv=None) -> None:
    from engine.model import Transformer
    from engine.perplexity import perplexity
    from engine.tokenizer import Tokenizer, read_text_file

    p = argparse.ArgumentParser(prog="python -m bench.error_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("source", metavar="SRC")
    p.add_argument("--text", default="../shared/data/wiki.txt")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0, 0.8, 0.7, 0.6])
    p.add_argument("--ctx", type=int, default=512, help="window length, as `lutengine ppl` (default: 512)")
    p.add_argument("--windows", type=int, default=16, help="number of windows (default: 16)")
    args = p.parse_args(argv)
    try:
        qf = qfile.load(args.file)
        src = open_source(args.source, progress=False)
        start = start_weights(qf, src)
        ids = Tokenizer(qf.tok).encode(read_text_file(args.text), add_bos=False)
    except (ModelError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.file}, {args.text} ({args.windows} windows of {args.ctx}), linear layers at W + a·(Wq − W) in float\n")
    print("| a | squared error | ppl |\n|---:|---:|---:|")
    for a in args.alpha:
        try:
            r = perplexity(Transformer(qf.config, scaled(qf, start, a), args.ctx), ids, args.ctx, args.windows)
        except ValueError as e:
            raise SystemExit(f"error: {args.text}: {e}")
        print(f"| {a:g} | {a * a:.2f} | {r.ppl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
