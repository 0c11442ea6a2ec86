"""Real-size models without a real download: a llama GGUF with the shapes of Llama-3.2-1B or -3B,
Q4_K linear layers and a Q8_0 embedding of random values, then what a user would see with it
(issue 29's targets), each step under /usr/bin/time -v:

    python -m bench.synthetic_gguf --size 1b [--dir /tmp/synth] [--out bench/RESULTS.md]

conversion (the first `generate`: convert to the default format once, then one token), the
converted file's size, start to first token from the cached file, decode tok/s at 1 and 2
threads (`lutengine bench -p 0 -n 32`), and the peak RSS of a 64-token `generate`. The
tokenizer is SmolLM2's (pulled from the catalog), padded with unused tokens to the vocabulary
as llama.cpp pads; random weights make the text meaningless, which timing does not mind.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

SHAPES = {  # Llama-3.2's: hidden, layers, ffn, heads, kv heads, vocab
    "1b": dict(hidden=2048, layers=16, ffn=8192, heads=32, kv_heads=8, vocab=128256),
    "3b": dict(hidden=3072, layers=28, ffn=8192, heads=24, kv_heads=8, vocab=128256),
}
SECTION = "## Real-size models, synthetic (bench/synthetic_gguf)"


def _blocks(rng, rows, cols, qtype):
    """Random quantized rows: random quants, small positive block scales (a random half-float
    could be NaN or huge)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    data[:, :, 0:2] = scale  # d: both Q8_0 and Q4_K start with it
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        data[:, :, 2:4] = scale  # dmin
    return data.reshape(rows, cols // block * size)


def write(path, size, seed=0):
    import gguf

    from models import catalog
    from models.gguf_loader import read_gguf

    s = SHAPES[size]
    md, _ = read_gguf(catalog.model_path("smollm2-135m-instruct"))
    rng = np.random.default_rng(seed)
    d, hd = s["hidden"], s["hidden"] // s["heads"]
    w = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    w.add_name(f"synthetic-llama-{size}")
    w.add_block_count(s["layers"])
    w.add_context_length(8192)
    w.add_embedding_length(d)
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(s["vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    tokens = list(md["tokenizer.ggml.tokens"])
    pad = s["vocab"] - len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    w.add_token_list(tokens + [f"[PAD{len(tokens) + i}]" for i in range(pad)])
    w.add_token_types(list(md["tokenizer.ggml.token_type"]) + [gguf.TokenType.USER_DEFINED] * pad)
    w.add_token_merges(list(md["tokenizer.ggml.merges"]))
    w.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    q4k, q8 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", _blocks(rng, s["vocab"], d, q8), raw_dtype=q8)  # tied head
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    kv = s["kv_heads"] * hd
    for i in range(s["layers"]):
        for name, rows, cols in (("attn_q", d, d), ("attn_k", kv, d), ("attn_v", kv, d), ("attn_output", d, d),
                                 ("ffn_gate", s["ffn"], d), ("ffn_up", s["ffn"], d), ("ffn_down", d, s["ffn"])):
            w.add_tensor(f"blk.{i}.{name}.weight", _blocks(rng, rows, cols, q4k), raw_dtype=q4k)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".tmp", path)


def timed(cmd, env):
    """(wall seconds, peak RSS bytes, stdout) of cmd under /usr/bin/time -v."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return wall, rss, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dir", default="/tmp/lutengine-synthetic")
    ap.add_argument("--out", help="markdown file to append the table to (e.g. bench/RESULTS.md)")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    src = os.path.join(a.dir, f"synthetic-llama-{a.size}.gguf")
    conv = os.path.join(a.dir, f"converted-{a.size}")
    env = {**os.environ, "LUTENGINE_CONVERTED": conv}
    if not os.path.exists(src):
        t0 = time.perf_counter()
        write(src, a.size)
        print(f"wrote {src} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lut = [sys.executable, "-m", "engine"]
    gen = [*lut, "generate", "-m", src, "-p", "Hello", "--temp", "0", "--ignore-eos", "-c", "512"]
    if os.path.isdir(conv):
        for f in os.listdir(conv):
            os.unlink(os.path.join(conv, f))
    convert_s, convert_rss, _ = timed([*gen, "-n", "1"], env)
    files = [os.path.join(conv, f) for f in os.listdir(conv) if f.endswith(".safetensors")]
    packed = sum(os.path.getsize(f) for f in files)
    first_s, first_rss, _ = timed([*gen, "-n", "1"], env)
    gen_s, gen_rss, _ = timed([*gen, "-n", "64"], env)
    _, _, out = timed([*lut, "bench", "-m", src, "-p", "0", "-n", "32", "-t", "1,2", "-r", "2", "--json"], env)
    tg = {r["threads"]: r["tok_s_mean"] for r in json.loads(out)["rows"]}
    s = SHAPES[a.size]
    params = s["vocab"] * s["hidden"] + s["layers"] * (
        2 * s["hidden"] ** 2 + 2 * s["hidden"] * s["kv_heads"] * s["hidden"] // s["heads"] + 3 * s["hidden"] * s["ffn"])
    row = (f"| {a.size} ({params / 1e9:.2f} B weights: hidden {s['hidden']}, {s['layers']} layers, ffn {s['ffn']}, "
           f"vocab {s['vocab']}) | {os.path.getsize(src) / 2**30:.2f} GiB | {convert_s:.0f} s | "
           f"{convert_rss / 2**30:.2f} GiB | {packed / 2**30:.2f} GiB | {first_s:.1f} s | {tg[1]:.1f} | {tg[2]:.1f} | "
           f"{gen_rss / 2**30:.2f} GiB |")
    table = ["| model | source GGUF (Q4_K + Q8_0) | conversion | conversion peak RSS | converted file | "
             "start to first token (cached) | tg32 tok/s, 1 thread | 2 threads | peak RSS, generate -n 64 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|", row]
    print("\n".join(table))
    print(f"(first token run peak RSS {first_rss / 2**30:.2f} GiB; 64-token generate {gen_s:.1f} s)")
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(["", f"Command: `python -m bench.synthetic_gguf --size {a.size}`", ""] + table) + "\n")


if __name__ == "__main__":
    main()
