"""llama.cpp's own quantization types, bits per weight against perplexity, for the quality table.

Run with the llama venv's python (not lutengine's). PyPI has llama-cpp-python 0.3.36 as source
only, and its default build for the native CPU died here with "Illegal instruction" (this
virtual machine advertises AMX and AVX512-FP16 as well); a build with the instruction sets named
runs:

    python -m venv /work/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON" /work/llama-venv/bin/pip install \
        llama-cpp-python==0.3.36 numpy gguf

    /work/llama-venv/bin/python bench/llamacpp_quality.py \
        [--gguf /work/cache/models/smollm2-135m-instruct.gguf ...] \
        [--types Q4_0 IQ2_XS ...] [--texts /work/shared/data/wiki.txt ...]

Each catalog GGUF is requantized by llama.cpp's quantizer (llama_model_quantize,
default params, allow_requantize, no importance matrix) into
/work/cache/llamacpp/<model>-<TYPE>.gguf. Requantizing dequantizes the source to
float32 first, so llama.cpp quantizes the same weights our quantizer reads and
the two tables compare format against format. The source GGUF itself is
measured too (type "source").

For each file: honest bits per weight of the linear layers (bytes of every 2-D
blk.* attn_q/k/v/output, ffn_gate/up/down tensor x 8 / their weights), of
token_embd and output separately, the file size, and the histogram of the types
llama.cpp actually stored for the linear layers: it falls back to 32-wide types
for rows whose length is not a multiple of 256, which for these small models is
most of them, so the nominal type name says little about the bits. Then perplexity
per bench PROTOCOL.md (bench/llamacpp_ref.py) on every text, on the same token
ids for all types: each text is tokenized once with the source GGUF.

Each quantization runs in a child process, so a type that aborts in C (or
needs an importance matrix) is recorded as a failure and the sweep goes on.
Results go to bench/llamacpp_quality.json, rewritten after every perplexity,
one record per (model, type); a (model, type, text) already there, or a
recorded failure, is not recomputed (delete the record to redo it).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.llamacpp_ref import WINDOW, catalog_name, command_line, load, tokenize_text, window_nlls  # noqa: E402
import importlib.util  # noqa: E402

# engine/llamacpp_peer.py by its path: this venv has llama-cpp-python, not the engine package's dependencies
_spec = importlib.util.spec_from_file_location("llamacpp_peer", os.path.join(REPO, "engine", "llamacpp_peer.py"))
_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_peer)
quantize = _peer.quantize
from models.gguf_loader import _file_type_name, read_gguf  # noqa: E402

MODELS = ["/work/cache/models/smollm2-135m-instruct.gguf",
          "/work/cache/models/qwen2.5-coder-0.5b-instruct.gguf"]
TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q3_K_S", "Q2_K", "TQ2_0", "IQ4_NL",
         "IQ3_XXS", "IQ2_XS", "IQ2_XXS", "IQ1_S"]
TEXTS = ["/work/shared/data/wiki.txt", "/work/shared/data/c4-eval.txt",
         "/work/shared/data/wikitext2-test.txt"]
OUT_DIR = "/work/cache/llamacpp"
LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
NTHREAD_QUANTIZE = 2


def bits(path):
    """Honest bits per weight (linear, embedding, output), file size, linear type histogram."""
    md, tensors = read_gguf(path)
    lin_bytes = lin_n = 0
    hist = {}
    for name, t in tensors.items():
        if LINEAR.match(name) and len(t.shape) == 2:
            lin_bytes += t.data.nbytes
            lin_n += math.prod(t.shape)
            hist[t.type.name] = hist.get(t.type.name, 0) + 1

    def bpw(name):
        t = tensors.get(name)
        return None if t is None else round(t.data.nbytes * 8 / math.prod(t.shape), 4)

    return {
        "bpw_linear": round(lin_bytes * 8 / lin_n, 4),
        "bpw_embedding": bpw("token_embd.weight"),
        "bpw_output": bpw("output.weight"),  # absent: the head is tied to token_embd
        "embedding_type": tensors["token_embd.weight"].type.name,
        "output_type": tensors["output.weight"].type.name if "output.weight" in tensors else None,
        "linear_types": dict(sorted(hist.items())),
        "linear_weights": lin_n,
        "file_bytes": os.path.getsize(path),
        "file_type": _file_type_name(md.get("general.file_type")),
    }


def quantize_in_child(src, dst, qtype):
    """Quantize in a child process; (info, None) or (None, why it failed)."""
    tmp, log = dst + ".tmp", dst + ".quantize.log"
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--quantize-one", src, tmp, log, qtype],
                       capture_output=True, text=True)
    if p.returncode == 0 and os.path.getsize(tmp) > 0:
        os.replace(tmp, dst)
        return json.loads(p.stdout.strip().splitlines()[-1]), None
    if os.path.exists(tmp):
        os.unlink(tmp)
    # The C library logs the reason; keep its error lines, else the last lines of output.
    lines = p.stderr.splitlines()
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            lines = f.read().splitlines() + lines
    lines = [x.strip() for x in lines if x.strip() and not set(x) <= set("=-* ")]
    why = [x for x in lines if re.search(r"error|fail|missing|unsupported|abort|assert|exception", x, re.I)]
    return None, "exit %d: %s" % (p.returncode, " | ".join((why or lines)[-4:]))


def save(records, path):
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", nargs="+", default=MODELS, help="catalog GGUFs (model name = file stem)")
    ap.add_argument("--types", nargs="+", default=TYPES, help="LLAMA_FTYPE_MOSTLY_* suffixes")
    ap.add_argument("--texts", nargs="+", default=TEXTS)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "llamacpp_quality.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize-one", nargs=4, metavar=("SRC", "DST", "LOG", "TYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quantize_one:
        src, dst, log, qtype = args.quantize_one
        print(json.dumps(quantize(src, dst, log, NTHREAD_QUANTIZE, qtype)))
        return

    import llama_cpp
    records = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            records = json.load(f)
    os.makedirs(OUT_DIR, exist_ok=True)
    for src in args.gguf:
        model = catalog_name(src)
        ids = {}  # text basename -> token ids, from the source GGUF's tokenizer
        vocab = None
        for qtype in ["source"] + args.types:
            rec = next((r for r in records if r["model"] == model and r["type"] == qtype), None)
            todo = [t for t in args.texts if rec is None or
                    (rec["ok"] and os.path.basename(t) not in rec["ppl"])]
            if not todo:
                continue
            path = src if qtype == "source" else os.path.join(OUT_DIR, "%s-%s.gguf" % (model, qtype))
            made = info = None
            if qtype != "source" and not (os.path.exists(path) and os.path.getsize(path) > 0):
                # also for a recorded type whose file is gone: a new text needs the file again
                print("== quantize %s %s" % (model, qtype), flush=True)
                made, err = quantize_in_child(src, path, qtype)
                if err:
                    print("   failed: " + err, flush=True)
                    if rec is None:
                        records.append({"model": model, "type": qtype, "ok": False, "gguf": path, "error": err})
                        save(records, args.out)
                    continue
                info = bits(path)
                if rec is not None and info["bpw_linear"] != rec["bpw_linear"]:
                    sys.exit("%s: %.4f bpw, not the recorded %.4f: delete the record to measure it again"
                             % (path, info["bpw_linear"], rec["bpw_linear"]))
            if rec is None:
                rec = {"model": model, "type": qtype, "ok": True, "gguf": path}
                if made is not None:
                    rec["quantize"] = made
                records.append(rec)
                rec.update(info or bits(path))
                rec.update(ppl={}, threads=args.threads, window=WINDOW,
                           llama_cpp_python=llama_cpp.__version__, command=command_line())
                save(records, args.out)
            llm = load(path, args.threads)
            for text in todo:
                name = os.path.basename(text)
                if name not in ids:
                    vocab = vocab or load(src, args.threads, vocab_only=True)
                    with open(text, encoding="utf-8") as f:
                        ids[name] = tokenize_text(vocab, f.read())[0]
                t0 = time.time()
                nll, _ = window_nlls(llm, ids[name])
                ppl = math.exp(nll.mean())
                rec["ppl"][name] = {"ppl": round(ppl, 3), "n_scored": int(nll.size),
                                    "seconds": round(time.time() - t0, 1), "command": command_line()}
                save(records, args.out)
                print("%s %-8s bpw %.3f %-18s ppl %.3f (%d)" % (
                    model, qtype, rec["bpw_linear"], name, ppl, nll.size), flush=True)
            llm.close()


if __name__ == "__main__":
    main()
