"""The quality sweep: perplexity against honest bits per weight, ours and llama.cpp's.

Run from the repository root (models from the catalog, cached under $LUTENGINE_HOME):

    python -m bench.quality run                                  # the whole grid (GRID), SmolLM2, three texts
    python -m bench.quality run --model qwen2.5-coder-0.5b-instruct --recipes rtn4g128 gptq-hlq2g128
    python -m bench.quality run --texts wiki c4
    python -m bench.quality report                               # bench/RESULTS.md section + bench/quality.png

The report puts the records of the present code (plain recipe names) in one
table per model with llama.cpp's types, and records of earlier code or of
non-default options (labels with a suffix, below) in a second.

Each recipe is one `lutengine quantize` command (so every figure can be redone
from the command stored next to it), then `lutengine ppl FILE --text T --json`
per text (PROTOCOL.md: 16 windows of 512, 8,176 scored tokens) and `lutengine
info FILE --json` for the honest bits per weight of the linear layers, the
head and the embedding, and the file size. Results go to bench/quality.json
one record per (model, recipe, text) as they come, so an interrupted sweep
resumes where it stopped. llama.cpp's own types come from
bench/llamacpp_quality.py (bench/llamacpp_quality.json), on the same token ids.

Recipe names: METHOD BITS g GROUP, e.g. rtn4g64, hlq3g64, gptq-hlq2g64
(gptq on the hlq grid), gptq-rtn4g64, msb3g64 (sign + 2 magnitude planes),
binary1g64, ternary2g64, with s8 appended for 8-bit scales on the rtn grid
(rtn4g32s8, gptq-rtn3g64s8; without it the rtn grid keeps 16-bit scales), -ao
for gptq with act-order (gptq-rtn3g64s8-ao); gptq rotates by default, and
records made before that carry -norot and --no-rotate (the bpw ones among them
also predate the plan's uniform floor, so their commands now plan differently); and
bpw2.5 for `quantize --bpw 2.5` (the plan picks the scale width per layer;
bpw4.5-f16 and the like are records of the planner before 8-bit scales, bpw3.3-noao
of gptq without act-order, the budget's default since; -span marks every record on
the rtn or hlq grid made before those grids searched finer, clipping steps
(engine/quant/rtn.py): their commands now give other files; bpw3.3-unweighted
is the plan with the clip search but before its sensitivity weights; -clip4 records
clipped 4-bit grids too, which the search no longer tries; bpw3.3 and bpw2.5 were made
then as well, their 4-bit upgrades clipped; -dtA sets gptq's dense target to A, and
-dt0 marks the gptq and bpw records made before gptq aimed at the dense model's output
(`--dense-target 0` redoes them); -fmtfloor marks bpw records made while the plan held every
layer to at least its floor's format (now: its floor's bits, in any group), as are all the
bpw records above whose label does not say otherwise; -nomlprot marks rotated (gptq, bpw below 4)
records made before rotation also turned down_proj's inputs (engine/quant/rotate.py), as are all
rotated records above whose label does not say otherwise; -cdt marks gptq and bpw records with a
dense target made while it was W·C·H⁻¹ with the dense stream on every calibration sequence (now
W + (H⁻¹·Xᵀ(Xd − X)·Wᵀ)ᵀ on half of them: engine/quant/gptq.py aim), as are all such records
above whose label does not say otherwise; -narrow marks bpw records made while the plan's groups
were at most 128 columns (now 256 and one group per row too: engine/quant/budget.py ROW), as are
all bpw records above whose label does not say otherwise; -attnv marks gptq and bpw records made
with v_proj's Hessian taken through the attention probabilities over the first 16 calibration
sequences, -attnv64 over all 64 (a change not kept: bench/RESULTS.md, "v_proj through the
attention probabilities"); -rtngrid marks bpw records below 4 bits made while gptq quantized
their plans on the rtn grid (now the trellis grid, engine/quant/trellis.py; `--grid rtn` redoes
them). Calibration
(gptq, --bpw) reads ../shared/data/c4-calib.txt only, never an evaluation text; -sampled recipes
(gptq-rtn3g64s8-ao-sampled, bpw3.3-sampled) give no --calib, so gptq calibrates on text the model
samples itself (engine/quant/sample.py); -tN recipes tune each block's scales, offsets and norm
gains for N epochs after gptq (`--tune N`, engine/quant/tune.py). int5g32 is rtn on the integer
grid (`--method rtn --grid int --bits 5 --group 32`; gptq-int5g32 gptq on it), and rtn-bpw5.52
`quantize --method rtn --bpw 5.52` (a plan on weight errors, no calibration). srcgrid
(gptq-srcgrid) puts each linear layer of a GGUF source on the format that holds its tensor type
(SOURCE_GRIDS: one --layer per layer), at the source's own bits.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
TEXTS = {"wiki": "wiki.txt", "c4": "c4-eval.txt", "wikitext2": "wikitext2-test.txt"}
CALIB = DATA / "c4-calib.txt"
OURS = ROOT / "bench" / "quality.json"
PEER = ROOT / "bench" / "llamacpp_quality.json"
RESULTS = ROOT / "bench" / "RESULTS.md"
PLOT = ROOT / "bench" / "quality.png"
SECTION = "## Quality (bench/quality)"
# The grid the sweep covers (issue 4): each method at each bit width, in groups of 64 or 128 (by the
# model's row sizes) and in one larger group, a row of the hidden size (lowered on down_proj to the
# largest group dividing its rows); then the default format and the --bpw recipes.
GRID = [("rtn", (1, 2, 3, 4)), ("hlq", (2, 3, 4)), ("gptq-hlq", (2, 3, 4)), ("msb", (2, 3, 4)), ("binary", (1, 2)),
        ("ternary", (2,))]
GROUPS = {"smollm2-135m-instruct": (64, 576), "qwen2.5-coder-0.5b-instruct": (128, 896)}
FEATURED = ["rtn4g32s8", "bpw4.5", "bpw3.3", "bpw2.5", "bpw1.6"]
# A GGUF tensor type -> the --layer format that holds it: Q4_0 / Q5_0 / Q8_0 exactly on the integer
# grid at their own bits, k-quants' 4-bit sub-blocks on the rtn grid (its lattice candidate finds
# them; 5.0 bits for Q4_K's 4.5: a float16 scale and offset per 32); Q6_K (sub-blocks of 16, each
# its own 8-bit scale) has no exact form here, and 6 bits in groups of 256 (6.06 for its 6.56) keep
# a Q4_K_M file (Q4_K and Q6_K down projections in equal numbers) at its bits.
SOURCE_GRIDS = {"Q4_0": "4/32:int", "Q5_0": "5/32:int", "Q8_0": "8/32:int", "Q4_1": "4/32:rtn",
                "Q4_K": "4/32:rtn", "Q6_K": "6/256:int"}


def source_grid_layers(model: str) -> list[str]:
    """--layer arguments putting each linear layer of the catalog model's GGUF on SOURCE_GRIDS."""
    import gguf

    from models.catalog import model_path
    from models.gguf_loader import hf_tensor_name

    out = []
    for t in gguf.GGUFReader(model_path(model)).tensors:
        name = hf_tensor_name(t.name)
        if name and name.endswith("_proj.weight") and t.tensor_type.name in SOURCE_GRIDS:
            out += ["--layer", f"{name}={SOURCE_GRIDS[t.tensor_type.name]}"]
    return out


def recipes(model: str) -> list[str]:
    return FEATURED + [f"{m}{b}g{G}" for G in GROUPS.get(model, (64, 128)) for m, bits in GRID for b in bits]


RECIPE = re.compile(r"(?:(?:(gptq)-)?(rtn|int|hlq|msb|binary|ternary)(\d)g(\d+)(s8)?(-ao)?|(rtn-)?bpw(\d+(?:\.\d+)?)"
                    r"|(?P<src>(?:gptq-)?srcgrid))"
                    r"(?:-dt(?P<dt>\d+(?:\.\d+)?))?(?:-t(?P<tune>\d+))?(?P<sampled>-sampled)?$")


def quantize_args(recipe: str, model: str | None = None) -> list[str]:
    """The quantize options of a recipe; model: the catalog model (srcgrid reads its GGUF)."""
    m = RECIPE.match(recipe)
    if not m:
        raise SystemExit(f"unknown recipe {recipe!r}: expected e.g. rtn4g64, gptq-hlq2g64, msb3g64 or bpw2.5")
    gptq, method, bits, group, s8, ao, rtn_plan, bpw, src, dt, tune, sampled = m.groups()
    calib = ([] if sampled else ["--calib", str(CALIB)]) + (["--dense-target", dt] if dt is not None else []) \
        + (["--tune", tune] if tune is not None else [])
    if src:
        base = ["--method", "gptq", *calib] if src.startswith("gptq") else ["--method", "rtn"]
        return [*base, "--grid", "int", "--bits", "5", "--group", "32", *source_grid_layers(model)]
    if tune is not None and not (gptq or bpw):
        raise SystemExit(f"recipe {recipe!r}: block tuning (-t) is a gptq option")
    if dt is not None and not (gptq or bpw):
        raise SystemExit(f"recipe {recipe!r}: the dense target (-dt) is a gptq option")
    if sampled and not (gptq or bpw):
        raise SystemExit(f"recipe {recipe!r}: calibrating on sampled text (-sampled) is a gptq option")
    if rtn_plan and (dt is not None or tune is not None or sampled):
        raise SystemExit(f"recipe {recipe!r}: an rtn plan takes no gptq options")
    if bpw:
        return ["--method", "rtn", "--bpw", bpw] if rtn_plan else ["--bpw", bpw, *calib]
    if s8 and method != "rtn":
        raise SystemExit(f"recipe {recipe!r}: 8-bit scales are made on the rtn grid only")
    scales = ["--scale-bits", "8" if s8 else "16"] if method == "rtn" else []
    if ao and not gptq:
        raise SystemExit(f"recipe {recipe!r}: act-order (-ao) is a gptq option")
    if gptq:
        return ["--method", "gptq", "--grid", method, "--bits", bits, "--group", group, *scales, *calib,
                *(["--act-order"] if ao else [])]
    if method == "int":
        return ["--method", "rtn", "--grid", "int", "--bits", bits, "--group", group]
    return ["--method", method, "--bits", bits, "--group", group, *scales]


def lutengine(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def add_record(rec: dict, path: Path = OURS) -> None:
    """Append under a lock, re-reading the file: sweeps of different models may run at once."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = load_records(path)
        records.append(rec)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        os.replace(tmp, path)


def made_by(quantize_cmd: list[str]) -> str | None:
    """The command and the last commit touching the code that makes a file (None with uncommitted
    changes there): a file in the sweep folder is reused, to resume a sweep, only when both match,
    so a stale file is never measured again under a new record."""
    commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", "engine", "lutkernels", "c", "models"],
                            cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "lutkernels", "c", "models"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return None if dirty or not commit else json.dumps({"command": quantize_cmd, "commit": commit})


def run(args) -> None:
    done = {(r["model"], r["recipe"], r["text"]) for r in load_records(OURS)}
    folder = Path(os.environ.get("LUTENGINE_HOME", Path.home() / ".cache" / "lutengine")) / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    for model in args.model:
        for recipe in args.recipes or recipes(model):
            todo = [t for t in args.texts if (model, recipe, t) not in done]
            if not todo:
                continue
            out = folder / f"{model}.{recipe}.safetensors"
            qargs = quantize_args(recipe, model)
            quantize_cmd = ["quantize", model, "-o", str(out), *qargs]
            seconds, stamp = None, made_by(quantize_cmd)
            sidecar = out.with_name(out.name + ".made-by")
            if not (stamp and out.exists() and sidecar.exists() and sidecar.read_text() == stamp):
                t0 = time.perf_counter()
                lutengine(*quantize_cmd)
                seconds = round(time.perf_counter() - t0, 1)
                if stamp:
                    sidecar.write_text(stamp)
            info = json.loads(lutengine("info", str(out), "--json").stdout)
            for text in todo:
                t0 = time.perf_counter()
                ppl = json.loads(lutengine("ppl", str(out), "--text", str(DATA / TEXTS[text]), "--json").stdout)
                rec = {"model": model, "recipe": recipe, "text": text, "ppl": ppl["ppl"], "n_scored": ppl["n_scored"],
                       "bpw_linear": info["bpw_linear"], "bpw_head": info["bpw_head"],
                       "bpw_embedding": info["bpw_embedding"], "file_bytes": info["file_bytes"],
                       "quantize_seconds": seconds, "ppl_seconds": round(time.perf_counter() - t0, 1),
                       "command": "lutengine " + " ".join(quantize_cmd).replace(str(ROOT.parent), "..")}
                add_record(rec)
                print(f"{model} {recipe:14s} {text:9s} bpw {info['bpw_linear']:.3f} ppl {ppl['ppl']:.3f}", flush=True)
    for model in args.model:
        dense_todo = [t for t in args.texts if (model, "dense", t) not in done]
        for text in dense_todo if args.dense else ():
            ppl = json.loads(lutengine("ppl", model, "--dense", "--text", str(DATA / TEXTS[text]), "--json").stdout)
            add_record({"model": model, "recipe": "dense", "text": text, "ppl": ppl["ppl"],
                        "n_scored": ppl["n_scored"], "bpw_linear": 32.0,
                        "command": f"lutengine ppl {model} --dense --text ../shared/data/{TEXTS[text]}"})


def current(recipe: str) -> bool:
    """A record of the present code at a recipe's defaults: a plain recipe name. Labels with a
    suffix (module docstring), -dt, -t and -sampled variants go to the table of earlier records."""
    m = RECIPE.fullmatch(recipe)
    return recipe == "dense" or (m is not None and m["dt"] is None and m["tune"] is None and m["sampled"] is None)


def table(model: str, ours: list[dict], peer: list[dict], earlier: bool = False) -> list[str]:
    """Our records (the current ones, or the earlier ones and variants) and, beside the current
    ones, llama.cpp's, by falling bits per weight."""
    rows: dict[tuple[str, str], dict] = {}
    for r in ours:
        if r["model"] == model and current(r["recipe"]) != earlier:
            row = rows.setdefault(("lutengine", r["recipe"]), {"bpw": r["bpw_linear"], "head": r.get("bpw_head"),
                                                               "bytes": r.get("file_bytes")})
            row[r["text"]] = r["ppl"]
    for r in peer if not earlier else ():
        if r.get("model") == model and r.get("ok", True) and r.get("bpw_linear"):
            row = rows.setdefault(("llama.cpp", r["type"]), {"bpw": r["bpw_linear"], "head": r.get("bpw_output"),
                                                            "bytes": r.get("file_bytes")})
            row.update(peer_ppl(r))
    if not rows:
        return []
    texts = [t for t in TEXTS if any(t in row for row in rows.values())]
    head = "| engine | format | bpw linear | bpw head | file MB | " + " | ".join(f"ppl {t}" for t in texts) + " |"
    title = f"#### {model}: earlier records and variants" if earlier else f"### {model}"
    out = [title, "", head, "|---|---|---:|---:|---:|" + "---:|" * len(texts)]
    for (engine, fmt), row in sorted(rows.items(), key=lambda kv: -kv[1]["bpw"]):
        head_bits = (f"{row['head']:.2f}" if isinstance(row["head"], (int, float))
                     else "" if fmt == "dense" else "tied")
        size = f"{row['bytes'] / 1e6:.0f}" if row.get("bytes") else ""
        ppls = " | ".join(f"{row[t]:,.3f}" if t in row else "" for t in texts)
        out.append(f"| {engine} | {fmt} | {row['bpw']:.2f} | {head_bits} | {size} | {ppls} |")
    return out + [""]


def peer_ppl(r: dict) -> dict[str, float]:
    """A llama.cpp record's perplexities by our text keys (its keys are file names)."""
    short = {f: k for k, f in TEXTS.items()}
    return {short.get(t, t): v["ppl"] if isinstance(v, dict) else v for t, v in (r.get("ppl") or {}).items()}


def plot(models: list[str], ours: list[dict], peer: list[dict]) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no plot: matplotlib is not installed; `pip install matplotlib`, then rerun the report)"
    # top row: every record on a log scale; bottom row: the same, zoomed on the usable ones
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 10), squeeze=False)
    for col, model in enumerate(models):
        series = {
            "lutengine": [(r["bpw_linear"], r["ppl"], r["recipe"]) for r in ours
                          if r["model"] == model and r["text"] == "wiki" and r["recipe"] != "dense"
                          and current(r["recipe"])],
            "llama.cpp": [(r["bpw_linear"], peer_ppl(r)["wiki"], r["type"]) for r in peer
                          if r.get("model") == model and r.get("bpw_linear") and "wiki" in peer_ppl(r)]}
        dense = [r["ppl"] for r in ours if r["model"] == model and r["recipe"] == "dense" and r["text"] == "wiki"]
        for ax, zoom in zip(axes[:, col], (False, True)):
            for (name, pts), marker in zip(series.items(), "os"):
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=name)
                    for x, y, label in pts:
                        ax.annotate(label, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            if dense:
                ax.axhline(dense[0], color="gray", linestyle=":", label=f"dense {dense[0]:.2f}")
                if zoom:
                    ax.set_ylim(dense[0] * 0.95, dense[0] * 4)
            ax.set_yscale("log")
            ax.set_xlabel("honest bits per weight, linear layers")
            ax.set_ylabel("perplexity, wiki.txt (log scale)" + (", up to 4x dense" if zoom else ""))
            ax.set_title(model)
            ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    return f"![perplexity against bits per weight]({PLOT.name})"


def report(args) -> None:
    ours, peer = load_records(OURS), load_records(PEER)
    models = list(dict.fromkeys(r["model"] for r in ours))
    lines = [SECTION, "", "Commands: `python -m bench.quality run [--model M] [--texts wiki c4 wikitext2]`, then "
             "`python -m bench.quality report`; llama.cpp's types: `bench/llamacpp_quality.py`. Each of our "
             "rows is the `lutengine quantize` command in bench/quality.json, then `lutengine ppl FILE --text T` "
             "(PROTOCOL.md: 8,176 scored tokens). bpw linear counts every stored bit of the linear layers "
             "(planes, scales, offsets, padding); the head and the float16 embedding are reported apart.", ""]
    for model in models:
        lines += table(model, ours, peer)
    lines += [plot(models, ours, peer), "", "### Earlier records and variants", "",
              "Made by earlier code or with a non-default option; the suffixes of their labels are explained "
              "in bench/quality.py's docstring, and each record keeps its command.", ""]
    for model in models:
        lines += table(model, ours, peer, earlier=True)
    text = RESULTS.read_text() if RESULTS.exists() else "# lutengine benchmark results\n"
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + text[nxt + 1 if nxt >= 0 else len(text):]
    RESULTS.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", nargs="+", default=["smollm2-135m-instruct"])
    r.add_argument("--recipes", nargs="+", help="default: the grid, the default format and the --bpw recipes")
    r.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    r.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense reference rows")
    sub.add_parser("report")
    args = p.parse_args(argv)
    (run if args.cmd == "run" else report)(args)


if __name__ == "__main__":
    main()
