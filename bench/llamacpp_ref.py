"""Reference figures from llama.cpp (the peer engine) via llama-cpp-python.

Run with the llama venv's python (not lutengine's), e.g.

    /work/llama-venv/bin/python bench/llamacpp_ref.py ppl \
        --gguf /work/cache/models/smollm2-135m-instruct.gguf \
        --text /work/shared/data/wiki.txt \
        --out tests/data/llamacpp/smollm2-135m-instruct-wiki.json

    /work/llama-venv/bin/python bench/llamacpp_ref.py tokenize \
        --gguf /work/cache/models/smollm2-135m-instruct.gguf \
        --out tests/data/llamacpp/smollm2-135m-instruct-tokenize.json

`ppl` follows bench PROTOCOL.md "Perplexity" exactly: llama.cpp's own tokenizer
on the text from its start (no BOS, special tokens not parsed), first 8192
tokens, 16 windows of 512, each window evaluated from an empty KV cache with
one `eval` after `reset` (logits_all=True), NLL of every token after the first
in each window by float64 log-softmax, ppl = exp(mean NLL) over 8176 tokens.

`tokenize` records llama.cpp's tokenization of a fixed list of test strings.
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time

import numpy as np

N_TOKENS = 8192
WINDOW = 512

# (text, special) pairs; add_bos is always False.
TOKENIZE_CASES = [
    ("Hello world! This is a simple ASCII sentence.", False),
    ("Hello", False),
    (" Hello", False),
    ("I'm sure they'll say we've done it, don't you?", False),
    ("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", False),
    ("for (int i = 0; i < 10; ++i) { x[i] = y[i] * 2; }", False),
    ("Llamas 🦙 and parties 🎉!", False),
    ("🦙🎉", False),
    ("你好世界", False),
    ("Café naïve résumé Ångström über señor", False),
    ("a  b   c\n\n\nd\t\te    \n  f", False),
    ("\n\n\n\n", False),
    ("    indented\n\ttabbed\n", False),
    ("1234567", False),
    ("3.14159 and 2024-11-23, 100000 items", False),
    ("<|im_start|>user", False),
    ("<|im_start|>user", True),
    ("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", False),
    ("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", True),
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def catalog_name(gguf_path):
    return os.path.splitext(os.path.basename(gguf_path))[0]


def command_line():
    return " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)


def dump_json(obj, path, compact_keys=("token_ids",)):
    """Pretty JSON with the long id lists written compactly on one line."""
    lines = ["{"]
    items = list(obj.items())
    for i, (k, v) in enumerate(items):
        if k in compact_keys:
            s = json.dumps(v, separators=(",", ":"))
        elif k == "cases":
            s = "[\n" + ",\n".join(
                "  " + json.dumps(c, ensure_ascii=False) for c in v) + "\n ]"
        else:
            s = json.dumps(v, ensure_ascii=False)
        lines.append(" %s: %s%s" % (json.dumps(k), s, "," if i + 1 < len(items) else ""))
    lines.append("}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def load(gguf, threads, vocab_only=False):
    from llama_cpp import Llama
    return Llama(
        model_path=gguf,
        n_ctx=WINDOW,
        n_batch=WINDOW,
        n_ubatch=WINDOW,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        vocab_only=vocab_only,
        verbose=False,
    )


def log_softmax_nll(logits, targets):
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def tokenize_text(llm, text):
    """First N_TOKENS ids of the text by llama.cpp's tokenizer, and the text's token count."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if len(ids) < N_TOKENS:
        raise SystemExit("text has only %d tokens" % len(ids))
    return [int(t) for t in ids[:N_TOKENS]], len(ids)


def window_nlls(llm, ids):
    """NLL of every scored token (all windows concatenated) and each window's ppl."""
    nlls = []
    per_window = []
    for w in range(N_TOKENS // WINDOW):
        win = ids[w * WINDOW:(w + 1) * WINDOW]
        llm.reset()
        llm.eval(win)
        assert llm.n_tokens == WINDOW
        logits = np.array(llm.scores[:WINDOW], dtype=np.float32)
        nll = log_softmax_nll(logits[:-1], np.array(win[1:]))
        nlls.append(nll)
        per_window.append(float(math.exp(nll.mean())))
        print("window %2d ppl %.4f" % (w, per_window[-1]), file=sys.stderr, flush=True)
    return np.concatenate(nlls), per_window


def cmd_ppl(args):
    import llama_cpp
    t_start = time.time()
    with open(args.text, "r", encoding="utf-8") as f:
        text = f.read()
    llm = load(args.gguf, args.threads)
    ids, n_tokens_text = tokenize_text(llm, text)
    nll, per_window = window_nlls(llm, ids)
    ppl = float(math.exp(nll.mean()))
    out = {
        "model": args.model or catalog_name(args.gguf),
        "gguf_sha256": sha256_file(args.gguf),
        "text": os.path.basename(args.text),
        "ppl": round(ppl, 6),
        "ppl_3dp": "%.3f" % ppl,
        "n_scored": int(nll.size),
        "mean_nll": float(nll.mean()),
        "ppl_per_window": [round(p, 4) for p in per_window],
        "n_tokens_text": n_tokens_text,
        "window": WINDOW,
        "n_windows": N_TOKENS // WINDOW,
        "threads": args.threads,
        "llama_cpp_python": llama_cpp.__version__,
        "seconds": round(time.time() - t_start, 1),
        "command": command_line(),
        "token_ids": ids,
    }
    dump_json(out, args.out)
    print("%s %s ppl %.3f n_scored %d" % (out["model"], out["text"], ppl, nll.size))


def cmd_tokenize(args):
    import llama_cpp
    llm = load(args.gguf, args.threads, vocab_only=True)
    cases = []
    for text, special in TOKENIZE_CASES:
        ids = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)]
        pieces = [llm.detokenize([t], special=True).hex() for t in ids]
        cases.append({
            "text": text,
            "add_bos": False,
            "special": special,
            "ids": ids,
            "pieces_hex": pieces,
        })
    out = {
        "model": args.model or catalog_name(args.gguf),
        "gguf_sha256": sha256_file(args.gguf),
        "n_vocab": llm.n_vocab(),
        "token_bos": llm.token_bos(),
        "token_eos": llm.token_eos(),
        "llama_cpp_python": llama_cpp.__version__,
        "command": command_line(),
        "cases": cases,
    }
    dump_json(out, args.out)
    print("%s: %d cases -> %s" % (out["model"], len(cases), args.out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("ppl", "tokenize"):
        p = sub.add_parser(name)
        p.add_argument("--gguf", required=True)
        p.add_argument("--model", help="catalog name (default: GGUF file stem)")
        p.add_argument("--out", required=True)
        p.add_argument("--threads", type=int, default=2)
        if name == "ppl":
            p.add_argument("--text", required=True)
    args = ap.parse_args()
    {"ppl": cmd_ppl, "tokenize": cmd_tokenize}[args.mode](args)


if __name__ == "__main__":
    main()
